"""The serving program (``python -m tailor.workloads.serving.app``): the OpenAI-compatible gateway
(routes, wire protocol, prompt profiles, RAG, cache, adapters) and the token engines behind it."""
