"""Loading language models and tokenizers for training and serving.

A ModelSource becomes a transformers model: the builtin SmolLM2 GGUF (dequantized by
transformers' ``gguf_file=`` loader), a Hugging Face folder or ``.gguf`` file on a volume,
or a hub repository. Dequantizing a GGUF file takes tens of seconds on a small CPU, so the
first load saves the result as a safetensors folder in a cache keyed by the file's size
and modification time (``TAILOR_MODEL_CACHE``, default ``~/.cache/tailor/models``); later
loads read that folder directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tailor.api.common import ModelSource
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.sources import model_path, read_secret
from tailor.workloads.io.storage import cache_root

log = logging.getLogger("tailor.workloads.io.model_loading")


def _gguf_cache_dir(gguf: Path) -> Path:
    # Keyed by content, not by path: the same builtin file in another virtual environment (a fresh
    # clone, a new image layer) reuses the conversion (36 s for SmolLM2), and a file replaced in
    # place never serves the old weights. Hashing 100 MB takes ~0.15 s.
    with gguf.open("rb") as handle:
        key = hashlib.file_digest(handle, "blake2b").hexdigest()
    return cache_root() / f"{gguf.stem}-{key[:16]}"


def materialize_gguf(gguf: Path) -> Path:
    """A transformers folder (safetensors, fp32 weights, tokenizer) for a GGUF file, cached."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to float; drop the GGUF marker so they save.
    model.hf_quantizer = None  # type: ignore[assignment,unused-ignore]
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_dir(source: ModelSource, paths: Paths) -> tuple[str, dict[str, Any]]:
    """(name or path for ``from_pretrained``, extra keyword arguments) of a ModelSource."""
    location = model_path(source, paths)
    kwargs: dict[str, Any] = {}
    if hub := source.hub:
        kwargs["revision"] = hub.revision
        if hub.token_secret_ref:
            kwargs["token"] = read_secret(hub.token_secret_ref, paths)
        if hub.file:
            kwargs["gguf_file"] = hub.file
        return str(location), kwargs
    path = Path(location)
    if path.suffix == ".gguf":
        return str(materialize_gguf(path)), kwargs
    if not (path / "config.json").exists():
        raise WorkloadError(
            "ModelNotFound", f"{path} is neither a .gguf file nor a folder with config.json"
        )
    return str(path), kwargs


def load_tokenizer(source: ModelSource, paths: Paths) -> Any:
    """The tokenizer of a ModelSource, with a pad token."""
    from transformers import AutoTokenizer

    name, kwargs = resolve_model_dir(source, paths)
    kwargs.pop("gguf_file", None) if "gguf_file" not in kwargs else None
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: ModelSource, paths: Paths, **from_pretrained: Any) -> Any:
    """A ``AutoModelForCausalLM`` of a ModelSource; extra arguments go to ``from_pretrained``
    (dtype, device_map, quantization_config, attn_implementation...)."""
    from transformers import AutoModelForCausalLM

    name, kwargs = resolve_model_dir(source, paths)
    return AutoModelForCausalLM.from_pretrained(name, **kwargs, **from_pretrained)
