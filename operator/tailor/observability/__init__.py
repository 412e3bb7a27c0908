"""Metric definitions (operator and workloads) and log setup, shared by every layer."""
