"""The GGUF files the llama.cpp engine serves: the base model at the quantization the spec
asks for, and each PEFT LoRA adapter in llama.cpp's GGUF LoRA format. Each is made once and
cached in the model cache (``TAILOR_MODEL_CACHE``), keyed by the content of what it was made
from (the same file in a new image or virtual environment reuses it; a file replaced in
place never serves the old one); writes go to a temporary name, then one rename.

- Float: every tensor of the source GGUF dequantized to float32 with the ``gguf`` package
  (its metadata, tokenizer and chat template copied as they are). It is the reference the
  quantizations are measured against, and what they are made from.
- ``f16``, ``q8_0``, ``q4_k_m``, ``q4_0``: llama.cpp's own quantizer
  (``llama_model_quantize``) over the float file. Tensors whose rows do not divide into
  k-quant blocks of 256 (SmolLM2's width is 576) fall back to a legacy type, as llama.cpp's
  quantize tool does. ``q4_0`` is the type llama.cpp's CPU backend repacks for its batched
  kernels: the fastest at 16 sequences here (``tests/bench/bench_serve.py``).
- A LoRA adapter: PEFT's ``lora_A``/``lora_B`` under llama.cpp's tensor names
  (``blk.N.attn_q.weight.lora_a``...), ``lora_B`` of the query and key projections permuted
  like the base weights (llama.cpp's GGUF stores q/k rows in its own rotary order), alpha
  in the metadata (llama.cpp scales by alpha / rank, as PEFT does; rsLoRA's alpha /
  sqrt(rank) is written as the alpha that gives the same scale). What
  ``convert_lora_to_gguf.py`` writes, without needing the base model's transformers folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.storage import cache_root

log = logging.getLogger("tailor.workloads.serving.engine.gguf_files")

QUANTIZATIONS = {"f16": 1, "q8_0": 7, "q4_k_m": 15, "q4_0": 2}
"""GGUF types a deployment may ask for -> llama.cpp's ``LLAMA_FTYPE_MOSTLY_*``."""

PEFT_TO_GGUF = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
"""Llama-family module names (PEFT's targets) -> llama.cpp's tensor names."""


def digest(*paths: Path) -> str:
    """A content key of files (blake2b, 16 hex digits)."""
    hasher = hashlib.blake2b()
    for path in paths:
        with path.open("rb") as handle:
            hasher.update(hashlib.file_digest(handle, "blake2b").digest())
    return hasher.hexdigest()[:16]


def _cached(target: Path, make: Callable[[Path], None]) -> Path:
    """``target``, made by ``make(temporary path)`` unless it exists."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=target.parent)
    os.close(handle)
    try:
        make(Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _cache_dir() -> Path:
    return cache_root() / "gguf"


def model_file(source: Path, quantization: str) -> Path:
    """The GGUF to serve for ``source`` at ``quantization``: ``none`` the file as it is,
    ``float`` its float32 copy, else a llama.cpp quantization of that (all cached)."""
    if quantization == "none":
        return source
    key = f"{source.stem}-{digest(source)}"
    floated = _cached(_cache_dir() / f"{key}-float.gguf", lambda out: _dequantize(source, out))
    if quantization == "float":
        return floated
    if quantization not in QUANTIZATIONS:
        raise WorkloadError(
            "InvalidSpec",
            f"quantization {quantization}: the llama.cpp engine takes none, "
            f"{', '.join(QUANTIZATIONS)}",
        )
    return _cached(
        _cache_dir() / f"{key}-{quantization}.gguf",
        lambda out: _quantize(floated, out, QUANTIZATIONS[quantization]),
    )


def _copy_metadata(reader: Any, writer: Any, skip: set[str]) -> None:
    import gguf

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)


def _dequantize(source: Path, out: Path) -> None:
    import gguf
    import numpy as np

    log.info("writing a float32 copy of %s (once)", source.name)
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    _copy_metadata(reader, writer, skip={"general.file_type"})
    writer.add_file_type(0)  # LLAMA_FTYPE_ALL_F32
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize(source: Path, out: Path, ftype: int) -> None:
    import ctypes

    import llama_cpp

    log.info("quantizing %s to llama.cpp type %d (once)", source.name, ftype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = len(os.sched_getaffinity(0))
    failed = llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    )
    if failed:
        raise WorkloadError("QuantizationFailed", f"llama.cpp could not quantize {source.name}")


def lora_file(adapter_dir: Path, base: Path) -> Path:
    """The GGUF LoRA of the PEFT adapter in ``adapter_dir`` for the GGUF model ``base``
    (cached by the adapter's content); WorkloadError naming what cannot be converted."""
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise WorkloadError(
            "AdapterNotFound",
            f"no PEFT adapter (adapter_config.json and adapter_model.safetensors) in {adapter_dir}",
        )
    key = digest(config_path, weights, base)
    return _cached(
        _cache_dir() / "lora" / f"{key}.gguf",
        lambda out: _write_lora(json.loads(config_path.read_text()), weights, base, out),
    )


def _write_lora(config: dict[str, Any], weights: Path, base: Path, out: Path) -> None:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise WorkloadError(
            "AdapterNotSupported",
            "the llama.cpp engine serves plain LoRA adapters (not DoRA or other PEFT types): "
            "use engine builtin for this adapter",
        )
    reader = gguf.GGUFReader(base)
    arch = reader.fields["general.architecture"].contents()
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # llama.cpp scales by alpha / r: same scale
    pairs: dict[str, dict[str, Any]] = {}
    for name, array in load_file(str(weights)).items():
        parts = name.split(".")
        if "lora_A" not in parts and "lora_B" not in parts:
            raise WorkloadError(
                "AdapterNotSupported",
                f"adapter tensor {name} is not a LoRA matrix (trained embeddings or heads are "
                "not served by the llama.cpp engine): use engine builtin for this adapter",
            )
        side = "a" if "lora_A" in parts else "b"
        module = parts[parts.index(f"lora_{side.upper()}") - 1]
        layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else None
        if module not in PEFT_TO_GGUF or layer is None:
            raise WorkloadError(
                "AdapterNotSupported",
                f"adapter tensor {name}: the llama.cpp engine maps LoRA on the attention and "
                f"MLP projections ({', '.join(PEFT_TO_GGUF)}) only",
            )
        target = f"blk.{layer}.{PEFT_TO_GGUF[module]}.weight"
        data = array.astype(np.float32)
        if side == "b" and module in ("q_proj", "k_proj"):
            data = _permute_rows(data, heads if module == "q_proj" else kv_heads)
        pairs.setdefault(target, {})[side] = data
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for target, sides in sorted(pairs.items()):
        if set(sides) != {"a", "b"}:
            raise WorkloadError("AdapterNotSupported", f"{target}: lora_A or lora_B is missing")
        writer.add_tensor(f"{target}.lora_a", sides["a"])
        writer.add_tensor(f"{target}.lora_b", sides["b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute_rows(rows: Any, heads: int) -> Any:
    """Hugging Face's q/k output rows in llama.cpp's rotary order (``LlamaModel.permute`` of
    convert_hf_to_gguf.py): each head's two halves interleaved."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )
