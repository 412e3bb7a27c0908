"""The serving program (``python -m tailor.workloads.serving.app``): the OpenAI-compatible gateway
(``app``: routes; ``protocol``: wire models; ``gateway``: prompt profiles, RAG, cache, adapters,
auth) and the token engines behind it (``engine``)."""
