"""The fine-tuning workload: ``python -m tailor.workloads.training.trainer --spec FILE`` where FILE is the
JSON of a :class:`tailor.api.workloads.TrainRun`.

A recipe to read top to bottom: load the tokenizer and the data (every record validated
before anything trains), load the model (LoRA, QLoRA over a 4-bit NF4 base, or full),
resume from the newest checkpoint if a previous pod left one, then loop: forward and
backward over micro-batches (loss only on learned tokens, logits computed only there),
clip, step, schedule; evaluate each epoch; checkpoint every ``checkpoint.everySteps``
steps; report progress to the owner's status and to Prometheus. At the end the adapter
(or full weights) is written in safetensors with its tokenizer, a training log and a
``manifest.json`` of checksums and metrics, into a temporary folder renamed into place,
so a failed run never leaves an artifact that looks complete.

Exit codes: 0 success, 2 a problem the user can fix (``WorkloadError``: bad data, bad
spec, no GPU for qlora), 1 a crash. Either way the reason goes to the Kubernetes
termination log (``/dev/termination-log``) as ``{"reason", "message"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from tailor.api.common import Artifact
from tailor.api.finetunejob import FineTuneJobSpec, LoraConfig, Progress
from tailor.api.workloads import Paths, Reporter, TrainRun
from tailor.observability.training import TrainingMetrics, serve_metrics
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer
from tailor.workloads.io.storage import MARKER as STORE_MARKER
from tailor.workloads.io.storage import Store, artifact_uri, sha256_file, store_of
from tailor.workloads.program import limit_cpu_threads, run_main, write_termination_message
from tailor.workloads.progress import make_reporter
from tailor.workloads.training import distributed
from tailor.workloads.training.data import (
    IGNORE_INDEX,
    Batch,
    Datasets,
    Example,
    collate,
    epoch_batches,
    read_datasets,
    tokenize_datasets,
)
from tailor.workloads.training.distributed import World

log = logging.getLogger("tailor.workloads.training.trainer")

CHECKPOINT_PREFIX = "step-"
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


# --- the run's bookkeeping --------------------------------------------------------------


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint holds to continue exactly."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    fingerprint: str = ""
    global_batch: int = 0
    """Examples per optimizer step (batch x accumulation x processes) of the run that
    wrote the checkpoint; a resume at another world size keeps it."""
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int | None = None

    @property
    def recent_loss(self) -> float | None:
        recent = [h["loss"] for h in self.history[-10:]]
        return sum(recent) / len(recent) if recent else None

    @property
    def eval_loss(self) -> float | None:
        return self.evals[-1]["evalLoss"] if self.evals else None


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps the run has and how examples map onto them: each step takes
    the next ``global_batch`` examples of the epoch's shuffled order, and rank r of a world
    of n takes every n-th of them from the r-th, in micro-batches of ``batchSize``."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch: int = 1
    world_size: int = 1

    @classmethod
    def plan(
        cls, examples: int, spec: FineTuneJobSpec, world_size: int = 1, global_batch: int = 0
    ) -> Schedule:
        """``global_batch`` 0: the spec's (batchSize x gradientAccumulation x world size);
        else the one a checkpoint was written with."""
        cfg = spec.training
        size = global_batch or cfg.batch_size * cfg.gradient_accumulation * world_size
        per_epoch = math.ceil(examples / size)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
        return cls(per_epoch, total, math.ceil(cfg.warmup_ratio * total), size, world_size)

    def epoch_of(self, step: int) -> float:
        """Fractional epochs done after ``step`` optimizer steps."""
        return round(step / self.steps_per_epoch, 4)


# --- device, model and optimizer ---------------------------------------------------------


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
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False
        )
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
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
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
    weights: dict[str, torch.Tensor] = get_model_state_dict(model, options=options)  # type: ignore[assignment]
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


# --- the loss ------------------------------------------------------------------------------


def batch_loss(
    model: torch.nn.Module, batch: Batch, autocast: AbstractContextManager[Any]
) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets. Logits are computed only at target
    positions (``logits_to_keep``): with a 49k vocabulary the language-model head is a fifth
    of a small model's compute, and prompt tokens do not need it."""
    keep = batch.targets != IGNORE_INDEX
    with autocast:
        logits = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
    return F.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")


@dataclass
class StepWork:
    """This rank's share of one optimizer step, and what the whole step holds."""

    batches: list[Batch]
    num_targets: int
    """Learned tokens of the whole step, every rank's together."""
    num_tokens: int
    """Tokens of the whole step, every rank's together."""
    examples: list[int] = field(default_factory=list)
    """The indices of the examples this rank trains on in the step."""
    weights: list[float] = field(default_factory=list)
    """Per micro-batch: 1, or 0 for a stand-in that only keeps the ranks in step (a rank
    with no example in the epoch's last, short step; under FSDP, a rank with fewer
    micro-batches than another, since every forward gathers parameters from all)."""


def train_step(
    model: torch.nn.Module,
    work: StepWork,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    autocast: AbstractContextManager[Any],
    max_grad_norm: float,
    world_size: int = 1,
) -> float:
    """One optimizer step over gradient-accumulated micro-batches; the loss is the mean
    over every learned token of the step, every rank's (as transformers' Trainer
    normalises it). Under DDP gradients are all-reduced (averaged) on the last
    micro-batch only, so each rank's sum is scaled by the world size; the returned value
    is this rank's part of the step's loss (the parts add up to the loss)."""
    device = _device_of(model)
    scale = world_size / max(work.num_targets, 1)
    total = 0.0
    last = len(work.batches) - 1
    for i, (batch, weight) in enumerate(zip(work.batches, work.weights, strict=True)):
        syncing = i == last or not hasattr(model, "no_sync")
        with nullcontext() if syncing else model.no_sync():  # type: ignore[operator]
            loss = batch_loss(model, batch.to(device), autocast) * (scale * weight)
            (scaler.scale(loss) if scaler else loss).backward()  # type: ignore[no-untyped-call]
        total += loss.item() / world_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    spec: FineTuneJobSpec,
    pad_id: int,
    device: torch.device,
    autocast: AbstractContextManager[Any],
    world: World | None = None,
) -> float:
    """Mean loss per learned token over the validation set (in length order: the order does
    not matter here, and it leaves almost no padding). With several ranks each scores
    every n-th example and the sums are all-reduced."""
    world = world or World()
    model.eval()
    ordered = sorted(examples, key=len)[world.rank :: world.size]
    size = spec.training.batch_size
    total, count = 0.0, 0
    for start in range(0, len(ordered), size):
        batch = collate(ordered[start : start + size], pad_id, False, spec.training.max_seq_length)
        total += batch_loss(model, batch.to(device), autocast).item()
        count += batch.num_targets
    model.train()
    summed, counted = distributed.all_sum([total, count], device)
    return summed / max(counted, 1)


# --- checkpoints ---------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: Path,
    keep: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``step-NNNNNNNN`` atomically (temporary folder, then rename) and keep the
    newest ``keep`` checkpoints. ``gathered``: the weights and optimizer state of a sharded
    model (:func:`full_states`)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    tmp = directory / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights, optimizer_state = gathered or (trainable_state(model), optimizer.state_dict())
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "state.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resume(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    fingerprint: str,
    sharded: bool = False,
) -> TrainState:
    """Load the newest checkpoint into the model, optimizer, scheduler and RNG; a fresh
    state when there is none. Checkpoints of another spec or dataset are removed."""
    from safetensors.torch import load_file

    checkpoints = list_checkpoints(directory)
    for tmp in directory.glob(".tmp-*") if directory.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a pod killed while saving
    if not checkpoints:
        return TrainState(fingerprint=fingerprint)
    newest = checkpoints[-1]
    state = TrainState(**json.loads((newest / "trainer_state.json").read_text()))
    if state.fingerprint != fingerprint:
        log.warning(
            "checkpoints in %s were written for another spec or dataset; starting over",
            directory,
        )
        for old in checkpoints:
            shutil.rmtree(old, ignore_errors=True)
        return TrainState(fingerprint=fingerprint)
    device = "cpu" if sharded else str(_device_of(model))
    weights = load_file(str(newest / "trainable.safetensors"), device=device)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(weights)
    if missing:
        raise WorkloadError("CheckpointInvalid", f"{newest} lacks {sorted(missing)[:3]}")
    tensors = torch.load(newest / "state.pt", weights_only=True)
    if sharded:  # every rank reads the whole state and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=weights,  # type: ignore[arg-type]
            optim_state_dict=tensors["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    if scaler and tensors["scaler"]:
        scaler.load_state_dict(tensors["scaler"])
    torch.set_rng_state(tensors["rng"])
    if tensors["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    state.resumed_from_step = state.step
    log.info("resumed from checkpoint %s (step %d)", newest.name, state.step)
    return state


def pull_newest_checkpoint(store: Store, directory: Path, world: World) -> None:
    """With an object store: the newest complete checkpoint in the bucket, downloaded into
    this pod's checkpoint folder (once per node, by its local rank 0) unless already there.
    An upload that never finished has no marker and is not a checkpoint."""
    if world.local_rank == 0:
        names = [
            n for n in store.complete_children(store.relative(directory))
            if n.startswith(CHECKPOINT_PREFIX)
        ]  # fmt: skip
        if names:
            newest = max(names, key=lambda n: int(n.removeprefix(CHECKPOINT_PREFIX)))
            store.pull(f"{store.relative(directory)}/{newest}")
            log.info(
                "checkpoint %s downloaded from %s", newest, store.uri(store.relative(directory))
            )
    distributed.barrier()


def push_checkpoint(store: Store, path: Path, keep: int) -> None:
    """Upload a checkpoint (marker last), then remove the bucket's checkpoints beyond the
    newest ``keep``, as on the volume."""
    store.push(path)
    parent = store.relative(path.parent)
    names = sorted(
        (n for n in store.complete_children(parent) if n.startswith(CHECKPOINT_PREFIX)),
        key=lambda n: int(n.removeprefix(CHECKPOINT_PREFIX)),
    )
    for old in names[:-keep]:
        store.delete(f"{parent}/{old}")


def saved_global_batch(directory: Path, fingerprint: str) -> int:
    """The examples per step of the newest checkpoint of this recipe, or 0 without one."""
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return 0
    saved = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return int(saved.get("global_batch", 0)) if saved.get("fingerprint") == fingerprint else 0


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def fingerprint_of(spec: FineTuneJobSpec, data: Datasets) -> str:
    """What a checkpoint must match to be resumed: the training recipe and the data."""
    digest = hashlib.sha256()
    recipe = spec.model_dump(
        mode="json", include={"base_model", "method", "lora", "training", "dataset"}
    )
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for example in data.train:
        digest.update(torch.tensor(example.input_ids + example.targets).numpy().tobytes())
    return digest.hexdigest()


# --- progress ------------------------------------------------------------------------------


class Progression:
    """Progress reports (status patches and Prometheus gauges) of one run."""

    def __init__(self, run: TrainRun, schedule: Schedule, state: TrainState):
        self.reporter = make_reporter(run.reporter, run.owner)
        self.metrics = TrainingMetrics(run.owner.namespace, run.owner.name)
        self.schedule = schedule
        self.state = state
        self.session_seconds = 0.0
        self.session_tokens = 0
        self.session_steps = 0
        self.metrics.total_steps.set(schedule.total_steps)

    def progress(self) -> Progress:
        state, total = self.state, self.schedule.total_steps
        elapsed = self.session_seconds
        rate = self.session_tokens / elapsed if elapsed > 0 else None
        eta = (
            int(elapsed / self.session_steps * (total - state.step)) if self.session_steps else None
        )
        return Progress(
            step=state.step,
            total_steps=total,
            epoch=self.schedule.epoch_of(state.step),
            percent=int(100 * state.step / total),
            loss=_rounded(state.recent_loss),
            eval_loss=_rounded(state.eval_loss),
            tokens_per_second=None if rate is None else round(rate, 1),
            eta_seconds=eta,
            updated=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def step_done(self, tokens: int, seconds: float) -> None:
        """Count a finished optimizer step (this pod's throughput) and report."""
        self.session_seconds += seconds
        self.session_tokens += tokens
        self.session_steps += 1
        progress = self.progress()
        self.metrics.step.set(self.state.step)
        if progress.loss is not None:
            self.metrics.loss.set(progress.loss)
        if progress.eval_loss is not None:
            self.metrics.eval_loss.set(progress.eval_loss)
        if progress.tokens_per_second is not None:
            self.metrics.tokens_per_second.set(progress.tokens_per_second)
        if torch.cuda.is_available():
            self.metrics.gpu_memory_bytes.set(torch.cuda.max_memory_allocated())
        self.reporter.report({"progress": _wire(progress)})

    def finished(self, artifact: Artifact) -> None:
        self.reporter.report(
            {"artifact": _wire(artifact), "progress": _wire(self.progress())},
            final=True,
        )


def _wire(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class StopRequested:
    """Set by SIGTERM (pod deletion, suspend): the loop checkpoints after its step and stops."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> Any:
        """Handle SIGTERM from now on; returns the previous handler."""
        return signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.requested = True


# --- the artifact --------------------------------------------------------------------------


def publish(
    run: TrainRun,
    model: Any,
    tokenizer: Any,
    state: TrainState,
    data: Datasets,
    schedule: Schedule,
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[Artifact, dict[str, Any]]:
    """Write the adapter (or weights), tokenizer, training log and manifest.json (last) into
    ``<output_dir>.tmp-*`` and rename it to ``output_dir``. ``weights``: a sharded model's,
    gathered."""
    output = Path(run.output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{output}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        with (tmp / "trainer_log.jsonl").open("w") as fh:
            fh.writelines(json.dumps(entry) + "\n" for entry in state.history)
        manifest = build_manifest(run, tmp, state, data, schedule)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if output.exists():  # leftovers of an attempt that died before its manifest
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return artifact_of(run, output), manifest


def build_manifest(
    run: TrainRun, folder: Path, state: TrainState, data: Datasets, schedule: Schedule
) -> dict[str, Any]:
    """Checksums, base model, method, hyperparameters and final metrics of an artifact."""
    import peft
    import transformers

    spec = run.spec
    files = [
        {
            "path": str(p.relative_to(folder)),
            "sha256": sha256_file(p),
            "sizeBytes": p.stat().st_size,
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    eval_loss = state.eval_loss
    return {
        "kind": "FineTuneJob",
        "owner": {"namespace": run.owner.namespace, "name": run.owner.name, "uid": run.owner.uid},
        "format": "transformers" if spec.method == "full" else "peft-lora",
        "baseModel": _wire(spec.base_model),
        "method": spec.method,
        "lora": None if spec.method == "full" else _wire(spec.lora or LoraConfig()),
        "training": _wire(spec.training),
        "dataset": {
            "format": data.format,
            "train": asdict(data.train_stats),
            "validation": asdict(data.validation_stats),
        },
        "metrics": {
            "steps": state.step,
            "epochs": schedule.epoch_of(state.step),
            "trainLoss": state.recent_loss,
            "evalLoss": eval_loss,
            "perplexity": None if eval_loss is None else math.exp(min(eval_loss, 50.0)),
            "evals": state.evals,
            "tokens": state.tokens,
            "trainSeconds": round(state.train_seconds, 2),
            "tokensPerSecond": round(state.tokens / max(state.train_seconds, 1e-9), 1),
            "resumedFromStep": state.resumed_from_step,
            "losses": [h["loss"] for h in state.history],
        },
        "distributed": {
            "worldSize": schedule.world_size,
            "strategy": spec.training.strategy if schedule.world_size > 1 else "none",
            "globalBatch": schedule.global_batch,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }


def artifact_of(run: TrainRun, output: Path) -> Artifact:
    manifest = output / "manifest.json"
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return Artifact(
        uri=artifact_uri(output, run.paths), sha256=sha256_file(manifest), size_bytes=size
    )


# --- the recipe ----------------------------------------------------------------------------


def train(run: TrainRun, stop: StopRequested | None = None) -> Artifact:
    """Fine-tune as ``run`` says and publish the artifact; returns what was published.
    ``stop`` (set by SIGTERM in :func:`main`) makes the loop checkpoint and exit early.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this, each on its shard of
    every step; rank 0 alone reports, serves metrics, checkpoints and publishes."""
    world = World.from_env()
    device, dtype = choose_device(run.spec, world)
    distributed.start(world, device)
    try:
        return _train(run, stop or StopRequested(), world, device, dtype)
    finally:
        distributed.stop()


def _train(
    run: TrainRun, stop: StopRequested, world: World, device: torch.device, dtype: torch.dtype
) -> Artifact:
    spec, cfg = run.spec, run.spec.training
    output = Path(run.output_dir)
    store = store_of(run.paths)
    # the artifact goes to the bucket unless spec.output names a claim of the user's
    publish_to = store if store and store.holds(output) else None
    if publish_to and world.main:
        uploaded = publish_to.marker(publish_to.relative(output)) is not None
        if uploaded and not (output / "manifest.json").exists():  # an earlier pod published it
            publish_to.pull(publish_to.relative(output))
        elif not uploaded and (output / "manifest.json").exists():  # its upload did not finish
            publish_to.push(output)
    if (output / "manifest.json").exists():  # a retried pod after the artifact was published
        log.info("artifact %s is already published", output)
        artifact = artifact_of(run, output)
        if world.main:
            make_reporter(run.reporter, run.owner).report({"artifact": _wire(artifact)}, final=True)
        return artifact
    if world.main:
        for stale in output.parent.glob(f"{output.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if run.metrics_port:
            serve_metrics(run.metrics_port)
    else:  # one reporter and one metrics port per run: rank 0's
        run = run.model_copy(update={"reporter": Reporter(kind="none")})
    torch.manual_seed(cfg.seed)

    # 1. Data: read and validate every record, then tokenize with the chat template.
    records = read_datasets(spec.dataset, run.paths, cfg.seed)
    try:
        tokenizer = load_tokenizer(spec.base_model, run.paths)
    except (OSError, ValueError) as exc:
        raise WorkloadError("ModelLoadFailed", f"cannot load the tokenizer: {exc}") from exc
    data = tokenize_datasets(records, tokenizer, cfg.max_seq_length)
    checkpoints = Path(run.checkpoint_dir)
    if store:  # each pod has its own scratch: bring the newest complete checkpoint there
        pull_newest_checkpoint(store, checkpoints, world)
    fingerprint = fingerprint_of(spec, data)
    schedule = Schedule.plan(
        len(data.train), spec, world.size, saved_global_batch(checkpoints, fingerprint)
    )
    if schedule.global_batch % (cfg.batch_size * world.size):
        raise WorkloadError(
            "CheckpointIncompatible",
            f"the checkpoints in {checkpoints} were written with {schedule.global_batch} "
            f"examples per step, which {world.size} processes of spec.training.batchSize "
            f"{cfg.batch_size} cannot split evenly: resume with a world size (nodes x gpus) "
            "that divides it, or delete the checkpoints to start over",
        )
    log.info(
        "data: %d train / %d validation examples (%s), %d train tokens, %d truncated; "
        "%d steps (%d per epoch) of %d examples over %d process(es)",
        len(data.train),
        len(data.validation),
        data.format,
        data.train_stats.tokens,
        data.train_stats.truncated,
        schedule.total_steps,
        schedule.steps_per_epoch,
        schedule.global_batch,
        world.size,
    )

    # 2. Model, optimizer, schedule.
    from transformers import get_scheduler

    core = load_model(spec, run.paths, device, dtype)
    core.train()
    if cfg.gradient_checkpointing:
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.method != "full":
            core.enable_input_require_grads()
    model = core
    sharded = world.distributed and cfg.strategy == "fsdp"
    if sharded:
        shard(core)
    elif world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(core, spec)
    scheduler = get_scheduler(
        SCHEDULERS[cfg.scheduler], optimizer, schedule.warmup_steps, schedule.total_steps
    )
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    autocast: AbstractContextManager[Any] = (
        nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    )
    log.info(
        "model: %s on %s, %s, %d trainable of %d parameters",
        spec.method,
        device,
        dtype,
        sum(p.numel() for p in core.parameters() if p.requires_grad),
        sum(p.numel() for p in core.parameters()),
    )

    # 3. Resume from the newest checkpoint a previous pod left (every rank reads it).
    state = resume(checkpoints, core, optimizer, scheduler, scaler, fingerprint, sharded)
    # under FSDP every forward is a collective: every rank evaluates every example
    eval_world = World() if sharded else world
    state.global_batch = schedule.global_batch
    if world.distributed:  # dropout masks differ per rank, reproducibly
        torch.manual_seed(cfg.seed + 1000 * world.rank + state.step)
    progression = Progression(run, schedule, state)
    pad_id = tokenizer.pad_token_id
    if data.validation and not state.evals:
        eval_loss = evaluate(core, data.validation, spec, pad_id, device, autocast, eval_world)
        state.evals.append(_eval_entry(0, 0.0, eval_loss))
        log.info("eval before training: loss %.4f", eval_loss)

    # 4. The loop: one optimizer step over gradient-accumulated micro-batches.
    # A step's time includes collating its batches (the generator collates lazily), so
    # tokensPerSecond counts everything a step costs, as a Trainer's train_runtime does.
    works = step_work(data.train, spec, schedule, state.step, pad_id, world.rank, sharded)
    while True:
        started = time.monotonic()
        work = next(works, None)
        if work is None:
            break
        loss = train_step(model, work, optimizer, scaler, autocast, cfg.max_grad_norm, world.size)
        scheduler.step()
        if world.distributed:  # every rank's part, and whether any rank was told to stop
            loss = distributed.all_sum([loss], device)[0]
            stop.requested = bool(distributed.all_max(int(stop.requested), device))

        tokens = work.num_tokens
        seconds = time.monotonic() - started
        state.step += 1
        state.tokens += tokens
        state.train_seconds += seconds
        state.history.append(
            {
                "step": state.step,
                "epoch": schedule.epoch_of(state.step),
                "loss": round(loss, 6),
                "learningRate": scheduler.get_last_lr()[0],
                "tokens": tokens,
            }
        )
        log.debug(
            "step %d loss %.4f (%d tokens, %.2fs); rank %d trained on examples %s",
            state.step, loss, tokens, seconds, world.rank, work.examples,
        )  # fmt: skip

        last = state.step == schedule.total_steps
        if data.validation and (state.step % schedule.steps_per_epoch == 0 or last):
            eval_loss = evaluate(core, data.validation, spec, pad_id, device, autocast, eval_world)
            state.evals.append(_eval_entry(state.step, schedule.epoch_of(state.step), eval_loss))
            log.info("eval at step %d: loss %.4f", state.step, eval_loss)
        if not last and (state.step % spec.checkpoint.every_steps == 0 or stop.requested):
            gathered = full_states(core, optimizer) if sharded else None
            if world.main:
                path = save_checkpoint(
                    checkpoints, spec.checkpoint.keep, core, optimizer, scheduler, scaler, state,
                    gathered,
                )  # fmt: skip
                log.info("checkpoint %s", path.name)
                if store:
                    push_checkpoint(store, path, spec.checkpoint.keep)
            distributed.barrier()
        progression.step_done(tokens, seconds)
        if stop.requested and not last:
            progression.reporter.flush()
            raise SystemExit(143)

    # 5. Publish the adapter (or weights) with its manifest (rank 0); report success.
    weights = full_states(core, None)[0] if sharded else None
    if not world.main:
        distributed.barrier()  # until rank 0 has published
        return Artifact(uri=artifact_uri(output, run.paths))
    artifact, manifest = publish(run, core, tokenizer, state, data, schedule, weights)
    if publish_to:  # files first, the completion marker last: never half an artifact
        publish_to.push(output)
    distributed.barrier()
    log.info(
        "published %s: train loss %s, eval loss %s, %.1f tokens/s",
        artifact.uri,
        manifest["metrics"]["trainLoss"],
        manifest["metrics"]["evalLoss"],
        manifest["metrics"]["tokensPerSecond"],
    )
    progression.finished(artifact)
    return artifact


def step_work(
    examples: list[Example],
    spec: FineTuneJobSpec,
    schedule: Schedule,
    start: int,
    pad_id: int,
    rank: int = 0,
    even: bool = False,
) -> Iterator[StepWork]:
    """This rank's micro-batches of each optimizer step from ``start`` on, epoch after
    epoch. Each epoch's order depends only on the seed and the epoch, and each step's
    examples only on the order and the global batch, so a resumed run continues it at any
    world size, and the ranks' shards of a step are disjoint and cover it. ``even``: every
    rank runs as many micro-batches as the busiest (FSDP), stand-ins weighted 0."""
    cfg = spec.training
    order: list[list[int]] = []
    order_epoch = -1
    for step in range(start, schedule.total_steps):
        epoch, within = divmod(step, schedule.steps_per_epoch)
        if epoch != order_epoch:
            order = epoch_batches(len(examples), schedule.global_batch, cfg.seed, epoch)
            order_epoch = epoch
        chosen = order[within]
        mine = chosen[rank :: schedule.world_size]
        groups = [mine[at : at + cfg.batch_size] for at in range(0, len(mine), cfg.batch_size)]
        weights = [1.0] * len(groups)
        busiest = math.ceil(math.ceil(len(chosen) / schedule.world_size) / cfg.batch_size)
        while not groups or (even and len(groups) < busiest):
            groups.append(chosen[:1])
            weights.append(0.0)
        yield StepWork(
            batches=[
                collate([examples[i] for i in g], pad_id, cfg.packing, cfg.max_seq_length)
                for g in groups
            ],
            num_targets=sum(examples[i].num_targets for i in chosen),
            num_tokens=sum(len(examples[i]) for i in chosen),
            examples=mine,
            weights=weights,
        )


def _eval_entry(step: int, epoch: float, loss: float) -> dict[str, float]:
    return {
        "step": step,
        "epoch": epoch,
        "evalLoss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50.0)), 4),
    }


# --- the program ---------------------------------------------------------------------------


def verify_artifact(output: Path, store: Store | None = None) -> dict[str, Any]:
    """Re-read a published artifact against its manifest: every listed file present with
    its size and sha256; with an object store, also its upload complete in the bucket with
    the same checksums. Returns what the operator needs to call the run Succeeded."""
    manifest_path = output / "manifest.json"
    if store:
        marker = store.marker(store.relative(output))
        uploaded = {e["path"]: e["sha256"] for e in (marker or {}).get("files") or []}
        local = {
            p.relative_to(output).as_posix(): sha256_file(p)
            for p in output.rglob("*")
            if p.is_file() and p.name != STORE_MARKER
        }
        if uploaded != local:
            raise WorkloadError(
                "ArtifactIncomplete",
                f"{store.uri(store.relative(output))} does not hold the artifact's files "
                f"completely ({len(uploaded)} of {len(local)} uploaded with matching sha256)",
            )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise WorkloadError("ArtifactMissing", f"{manifest_path}: {exc}") from exc
    for entry in manifest.get("files") or []:
        path = output / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["sizeBytes"]:
            raise WorkloadError("ArtifactCorrupt", f"{path}: missing or of the wrong size")
        if sha256_file(path) != entry["sha256"]:
            raise WorkloadError("ArtifactCorrupt", f"{path}: sha256 differs from the manifest")
    return {
        "sha256": sha256_file(manifest_path),
        "files": len(manifest.get("files") or []),
    }


def main(argv: list[str] | None = None) -> int:
    limit_cpu_threads()

    def work(run: TrainRun) -> None:
        stop = StopRequested()
        previous = stop.install()
        try:
            artifact = train(run, stop)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if World.from_env().main:  # rank 0 published it; it alone vouches for it
            store = store_of(run.paths)
            output = Path(run.output_dir)
            verified = verify_artifact(output, store if store and store.holds(output) else None)
            write_termination_message("ArtifactPublished", artifact.uri, artifact=verified)

    return run_main(TrainRun, work, argv, failure_reason="TrainingFailed")


if __name__ == "__main__":
    sys.exit(main())
