"""The token engines behind the gateway: the builtin scheduler on transformers (CPU) and vLLM
(GPUs), with model loading, the KV slab and constrained decoding."""
