"""Where workloads execute: the Kubernetes runtime (Jobs, Deployments) and the local one."""
