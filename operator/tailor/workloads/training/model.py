"""The device, the model to train and its optimizer: CUDA or CPU and the compute dtype
(bf16 where the hardware has it natively), the base model with LoRA adapters (over a 4-bit
NF4 base for qlora) or whole, FSDP2 sharding and the gathering of a sharded model's state,
and AdamW over the trainable parameters."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from tailor.api.common import ModelSource
from tailor.api.finetunejob import FineTuneJobSpec, LoraConfig
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_causal_lm
from tailor.workloads.io.sources import model_path
from tailor.workloads.training.distributed import World

log = logging.getLogger(__name__)


def choose_device(
    spec: FineTuneJobSpec, world: World | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device (this rank's ``LOCAL_RANK`` GPU, or the CPU) and the compute dtype
    (float32 means no autocast). GPUs asked for and not visible fail here, never a silent
    fall back to the CPU.

    ``auto`` is bf16 where the hardware has it: a CUDA GPU that supports it, or a CPU with
    native bf16 instructions (AVX512-BF16, AMX), where it was measured 1.7x faster than
    float32 for LoRA on SmolLM2 at the same loss.
    """
    world = world or World()
    cuda = torch.cuda.is_available()
    visible = torch.cuda.device_count() if cuda else 0
    asked = spec.resources.gpus
    if spec.method == "qlora" and not cuda:
        raise WorkloadError(
            "QLoRANeedsGPU",
            "method qlora trains over a 4-bit NF4 base (bitsandbytes), which needs a CUDA GPU, "
            "and this node has none: request resources.gpus >= 1 or use method lora",
        )
    if asked > visible:
        raise WorkloadError(
            "GPUNotVisible",
            f"spec.resources.gpus is {asked} but this pod sees {visible} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run on "
            "nodes whose GPUs the device plugin exposes, the CUDA workloads image, or set "
            "spec.resources.gpus to 0 to train on CPU",
        )
    device = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = spec.training.precision
    if precision == "fp16" and not cuda:
        raise WorkloadError(
            "UnsupportedPrecision", "precision fp16 needs a CUDA GPU; use bf16, fp32 or auto"
        )
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
        precision = "bf16" if native else "fp32"
    elif precision == "bf16" and not cuda and not cpu_has_native_bf16():
        # Emulated bf16 is not a little slower but ~20x (SmolLM2 LoRA step on an AVX2 EPYC:
        # 37 s against 1.6 s in float32): say so where the user will look for the reason.
        log.warning(
            "precision bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): each step runs "
            "about 20x slower than fp32; set spec.training.precision to auto or fp32"
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return device, dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", cpuinfo) is not None


FP32_ATTENTION = "tailor_sdpa_fp32"


def _sdpa_in_fp32(module: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA attention computed in float32, returned in the caller's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), *args, **kwargs
        )
    return out.to(query.dtype), weights


def register_fp32_attention() -> str:
    """Register :func:`_sdpa_in_fp32` with transformers' attention and mask interfaces.

    Used for bf16 on CPU: PyTorch's CPU flash-attention backward is several times slower
    in bf16 than in float32 (measured 1.5 s against 0.34 s per SmolLM2 step), while the
    matrix products gain from bf16.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
    return FP32_ATTENTION


def load_model(
    spec: FineTuneJobSpec, paths: Paths, device: torch.device, dtype: torch.dtype
) -> Any:
    """The model to train: a PEFT LoRA model over the base (4-bit for qlora), or the base."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if spec.method in ("lora", "qlora") and dtype != torch.float32:
        kwargs["dtype"] = dtype  # the frozen base in half precision; adapters stay float32
    if device.type == "cpu" and dtype == torch.bfloat16:
        kwargs["attn_implementation"] = register_fp32_attention()
    if spec.method == "qlora":
        kwargs["quantization_config"] = _nf4_config(dtype)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = load_causal_lm(spec.base_model, paths, **kwargs)
    except (OSError, ValueError) as exc:
        raise WorkloadError("ModelLoadFailed", f"cannot load the base model: {exc}") from exc
    if spec.method != "qlora":
        model.to(device)
    if spec.method == "full":
        return model
    if spec.method == "qlora":  # norms to float32, inputs that carry gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.preference.reference:  # continue the named adapter (and compare with it)
        from peft import PeftModel

        uri = spec.preference.reference.uri
        try:
            folder = model_path(ModelSource(uri=uri), paths)
            return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        except (OSError, ValueError) as exc:
            raise WorkloadError(
                "ModelLoadFailed", f"preference.reference.uri {uri}: not a LoRA adapter: {exc}"
            ) from exc
    lora = spec.lora or LoraConfig()
    targets = lora.target_modules
    try:
        return get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules="all-linear" if targets == ["all-linear"] else targets,
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as exc:  # e.g. target modules the architecture does not have
        raise WorkloadError("InvalidSpec", f"lora: {exc}") from exc


def _nf4_config(dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise WorkloadError(
            "MissingDependency", "method qlora needs bitsandbytes in the training image"
        ) from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def shard(model: torch.nn.Module) -> None:
    """FSDP2 in place: each decoder layer a unit (its parameters gathered for its forward
    and backward only), the rest (embeddings, norm, head) the root unit."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)


def full_states(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights and the optimizer state of a sharded model, gathered whole on
    the CPU of every rank (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights: dict[str, torch.Tensor] = get_model_state_dict(model, options=options)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable = {k: v.contiguous() for k, v in weights.items() if k in names}
    if optimizer is None:
        return weights, {}
    return trainable, get_optimizer_state_dict(model, optimizer, options=options)


def make_optimizer(model: torch.nn.Module, spec: FineTuneJobSpec) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in trainable if p.ndim >= 2],
            "weight_decay": spec.training.weight_decay,
        },
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in trainable)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=spec.training.learning_rate, fused=fused
    )


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
