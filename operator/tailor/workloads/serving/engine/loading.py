"""Loading the builtin engine's model: the base model (quantized as the spec says), its LoRA
adapters attached through PEFT, and the checks that fail fast before any weights load.

Quantization: ``int8`` on CPU is PyTorch's dynamic int8 quantization of the base model's
linear layers (LoRA layers, and the two kinds of layer in :data:`INT8_KEEP_FLOAT`, stay in
float); on CUDA ``int8`` and ``nf4`` load the base model through bitsandbytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import Paths, ServedAdapter
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer

log = logging.getLogger("tailor.workloads.serving.engine.loading")


def load_model(
    spec: ModelDeploymentSpec, adapters: Sequence[ServedAdapter], paths: Paths
) -> tuple[Any, Any, dict[str, str]]:
    """(model in eval mode, tokenizer, served adapter name -> PEFT adapter name)."""
    check_adapters(adapters)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if spec.quantization == "nf4" and not cuda:
        raise WorkloadError(
            "QuantizationNeedsGPU",
            "quantization nf4 needs a CUDA GPU (bitsandbytes 4-bit) and this replica has none: "
            "set resources.gpus >= 1, or use quantization int8 (dynamic int8 on CPU)",
        )
    if cuda and spec.quantization in ("int8", "nf4"):
        kwargs["quantization_config"] = bitsandbytes_config(spec.quantization)
        kwargs["device_map"] = {"": 0}
    elif cuda:
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": 0}
    elif spec.quantization == "int8":
        kwargs["disable_mmap"] = True  # so the replaced float weights can really be freed
    log.info(
        "loading the base model (quantization %s, %s)", spec.quantization, "cuda" if cuda else "cpu"
    )
    tokenizer = load_tokenizer(spec.base_model, paths)  # first: its memory never moves
    model = load_causal_lm(spec.base_model, paths, **kwargs)
    adapter_map: dict[str, str] = {}
    if adapters:
        model, adapter_map = attach_adapters(model, adapters)
    if spec.quantization == "int8" and not cuda:
        quantize_int8_dynamic(model)
    model.eval()
    return model, tokenizer, adapter_map


def check_adapters(adapters: Sequence[ServedAdapter]) -> None:
    """Fail fast, before loading any weights, when an adapter folder is not there."""
    for adapter in adapters:
        if not (Path(adapter.path) / "adapter_config.json").is_file():
            raise WorkloadError(
                "AdapterNotFound",
                f"adapter {adapter.name}: no PEFT adapter (adapter_config.json) in "
                f"{adapter.path}; check that its FineTuneJob succeeded and its volume is mounted",
            )


def bitsandbytes_config(quantization: str) -> Any:
    """The transformers BitsAndBytesConfig for int8 or nf4 on CUDA."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise WorkloadError(
            "MissingDependency",
            f"quantization {quantization} on GPU needs bitsandbytes: pip install bitsandbytes",
        ) from exc
    from transformers import BitsAndBytesConfig

    config_class: Any = BitsAndBytesConfig  # untyped
    if quantization == "int8":
        return config_class(load_in_8bit=True)
    return config_class(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def attach_adapter(model: Any, path: str, peft_name: str) -> Any:
    """``model`` with the PEFT adapter at ``path`` loaded as ``peft_name`` (the first one
    wraps the model in a PeftModel)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(model, path, adapter_name=peft_name)
    model.load_adapter(path, adapter_name=peft_name)
    return model


def attach_adapters(model: Any, adapters: Sequence[ServedAdapter]) -> tuple[Any, dict[str, str]]:
    """Load every adapter into one PeftModel (adapter_0, adapter_1, ...: served names may
    contain dots, which module names may not)."""
    names: dict[str, str] = {}
    for index, adapter in enumerate(adapters):
        peft_name = f"adapter_{index}"
        log.info("loading adapter %s from %s", adapter.name, adapter.path)
        try:
            model = attach_adapter(model, adapter.path, peft_name)
        except Exception as exc:
            raise WorkloadError(
                "AdapterLoadFailed", f"adapter {adapter.name} at {adapter.path}: {exc}"
            ) from exc
        names[adapter.name] = peft_name
    return model, names


INT8_KEEP_FLOAT = ("down_proj", "lm_head")
"""Base linear layers that dynamic int8 leaves in float. ``down_proj`` reads the MLP's
outlier activations, which per-tensor int8 activation quantization destroys (SmolLM2-135M:
perplexity x3.6 with it quantized, +18% without); ``lm_head`` is usually tied to the
embedding, so quantizing it adds a copy instead of saving memory, and costs quality."""


def quantize_int8_dynamic(model: Any) -> None:
    """Dynamic int8 quantization (int8 weights, activations quantized on the fly) of the
    base model's linear layers, in place, except :data:`INT8_KEEP_FLOAT`. LoRA weights
    stay in float. The float weights it replaces are returned to the operating system."""
    targets = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(part.startswith("lora_") or part in INT8_KEEP_FLOAT for part in name.split("."))
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantize: Any = torch.ao.quantization.quantize_dynamic  # untyped
        quantize(model, targets, dtype=torch.qint8, inplace=True)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
