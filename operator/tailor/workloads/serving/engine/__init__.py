"""The token engines behind the gateway, one protocol (``base.TokenEngine``): the builtin
scheduler on transformers (``builtin``, CPU or one GPU; its model loading in ``loading``, its KV
caches in ``kvcache``, constrained decoding in ``grammar``) and vLLM over HTTP (``upstream``)."""
