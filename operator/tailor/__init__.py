"""Tailor: a Kubernetes operator for LLM customization (prompts, RAG, LoRA/QLoRA, RAFT, serving)."""

__version__ = "0.1.0"
