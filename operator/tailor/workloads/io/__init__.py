"""Inputs and artifacts every program shares: sources (builtin models, mounted volumes, secrets,
data-source listing), records (JSON lines, chat and text files), the artifact store (claims and S3,
markers, hashes, the model cache), the outgoing-URL guard, and language-model loading."""
