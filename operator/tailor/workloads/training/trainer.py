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

This module is the recipe and its loop; the parts it calls live beside it: ``data``
(records, chat template, batches), ``model`` (device, model, optimizer), ``state`` (the
schedule and the bookkeeping a checkpoint holds), ``checkpoints``, ``artifact`` (publish and
verify) and ``distributed`` (torchrun).

Exit codes: 0 success, 2 a problem the user can fix (``WorkloadError``: bad data, bad
spec, no GPU for qlora), 1 a crash. Either way the reason goes to the Kubernetes
termination log (``/dev/termination-log``) as ``{"reason", "message"}``.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tailor.api.common import Artifact
from tailor.api.finetunejob import FineTuneJobSpec, Progress
from tailor.api.workloads import Reporter, TrainRun
from tailor.observability.training import TrainingMetrics, serve_metrics
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_tokenizer
from tailor.workloads.io.storage import artifact_uri, store_of
from tailor.workloads.program import limit_cpu_threads, run_main, write_termination_message
from tailor.workloads.progress import make_reporter
from tailor.workloads.training import distributed
from tailor.workloads.training.artifact import artifact_of, publish, published, verify_artifact
from tailor.workloads.training.checkpoints import (
    fingerprint_of,
    pull_newest_checkpoint,
    push_checkpoint,
    resume,
    save_checkpoint,
    saved_global_batch,
)
from tailor.workloads.training.data import (
    IGNORE_INDEX,
    Batch,
    Example,
    collate,
    epoch_batches,
    read_datasets,
    tokenize_datasets,
)
from tailor.workloads.training.distributed import World
from tailor.workloads.training.model import (
    choose_device,
    device_of,
    full_states,
    load_model,
    make_optimizer,
    shard,
)
from tailor.workloads.training.preference import (
    check_objective,
    preference_loss,
    reference_logps,
)
from tailor.workloads.training.state import Schedule, TrainState

log = logging.getLogger("tailor.workloads.training.trainer")

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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
    if published(run, output):  # a retried pod after the artifact was published
        log.info("artifact %s is already published", output)
        artifact = artifact_of(run, output)
        if world.main:
            make_reporter(run.reporter, run.owner).report({"artifact": artifact.wire()}, final=True)
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
    check_objective(spec.objective, records.format)
    if records.feedback and world.main:  # what the feedback sources gave, in the status
        make_reporter(run.reporter, run.owner).report({"feedback": records.feedback}, final=True)
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
    if spec.objective != "sft" and not state.reference:  # the model before any step
        # only the training examples the schedule reaches (maxSteps may stop short of an
        # epoch), and every validation example
        needed = scheduled(len(data.train), schedule, cfg.seed) + [
            len(data.train) + i for i in range(len(data.validation))
        ]
        every = data.train + data.validation
        values = reference_logps(
            core, [every[i] for i in needed], pad_id, cfg.max_seq_length, autocast,
            cfg.batch_size,
        )  # fmt: skip
        state.reference = [[] for _ in every]
        for i, value in zip(needed, values, strict=True):
            state.reference[i] = value
        log.info("reference log-probabilities of %d examples computed", len(needed))
    loss_of = _loss_function(spec, data.train, state.reference, pad_id, autocast)

    def validate() -> float:
        held = state.reference[len(data.train) :]  # kto, dpo: the validation examples'
        return float(
            evaluate(core, data.validation, spec, pad_id, device, autocast, eval_world, held)
        )

    if data.validation and not state.evals:
        eval_loss = validate()
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
        loss = train_step(model, work, optimizer, scaler, loss_of, cfg.max_grad_norm, world.size)
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
            eval_loss = validate()
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


# --- one step: its examples, loss and update; evaluation -----------------------------------


def scheduled(num_examples: int, schedule: Schedule, seed: int) -> list[int]:
    """The training examples the run's steps take, in index order."""
    used: set[int] = set()
    for epoch in range(math.ceil(schedule.total_steps / schedule.steps_per_epoch)):
        batches = epoch_batches(num_examples, schedule.global_batch, seed, epoch)
        first = epoch * schedule.steps_per_epoch
        for within in range(min(schedule.steps_per_epoch, schedule.total_steps - first)):
            used.update(batches[within])
    return sorted(used)


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
            num_targets=sum(examples[i].units for i in chosen),
            num_tokens=sum(len(examples[i]) for i in chosen),
            examples=mine,
            weights=weights,
            groups=groups,
        )


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
    groups: list[list[int]] = field(default_factory=list)
    """Per micro-batch: the indices of its examples."""


LossOf = Callable[[torch.nn.Module, Batch, list[int]], torch.Tensor]
"""The summed loss of a micro-batch (its collated batch and its examples' indices)."""


def _loss_function(
    spec: FineTuneJobSpec,
    examples: list[Example],
    reference: list[list[float]],
    pad_id: int,
    autocast: AbstractContextManager[Any],
) -> LossOf:
    """sft: cross-entropy of the collated batch; kto and dpo: :mod:`.preference`."""
    if spec.objective == "sft":
        return lambda model, batch, _: batch_loss(model, batch, autocast)

    def loss(model: torch.nn.Module, _: Batch, indices: list[int]) -> torch.Tensor:
        group = [examples[i] for i in indices]
        refs = [reference[i] for i in indices]
        return preference_loss(model, group, refs, spec, pad_id, autocast)[0]

    return loss


def train_step(
    model: torch.nn.Module,
    work: StepWork,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loss_of: LossOf,
    max_grad_norm: float,
    world_size: int = 1,
) -> float:
    """One optimizer step over gradient-accumulated micro-batches; the loss is the mean
    over every learned token of the step (sft) or every example (kto, dpo), every rank's
    (as transformers' Trainer normalises it). Under DDP gradients are all-reduced (averaged) on the last
    micro-batch only, so each rank's sum is scaled by the world size; the returned value
    is this rank's part of the step's loss (the parts add up to the loss)."""
    device = device_of(model)
    scale = world_size / max(work.num_targets, 1)
    total = 0.0
    last = len(work.batches) - 1
    for i, (batch, weight) in enumerate(zip(work.batches, work.weights, strict=True)):
        syncing = i == last or not hasattr(model, "no_sync")
        with nullcontext() if syncing else model.no_sync():
            loss = loss_of(model, batch.to(device), work.groups[i]) * (scale * weight)
            (scaler.scale(loss) if scaler else loss).backward()
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


@torch.no_grad()  # type: ignore[untyped-decorator]
def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    spec: FineTuneJobSpec,
    pad_id: int,
    device: torch.device,
    autocast: AbstractContextManager[Any],
    world: World | None = None,
    reference: list[list[float]] | None = None,
) -> float:
    """Mean loss per learned token (sft) or per example (kto, dpo: ``reference`` holds the
    examples' reference log-probabilities) over the validation set, in length order (the
    order does not matter here, and it leaves almost no padding). With several ranks each
    scores every n-th example and the sums are all-reduced."""
    world = world or World()
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))[world.rank :: world.size]
    size = spec.training.batch_size
    total, count = 0.0, 0
    for start in range(0, len(order), size):
        indices = order[start : start + size]
        group = [examples[i] for i in indices]
        if spec.objective != "sft":
            assert reference is not None
            refs = [reference[i] for i in indices]
            total += preference_loss(model, group, refs, spec, pad_id, autocast)[0].item()
            count += len(group)
            continue
        batch = collate(group, pad_id, False, spec.training.max_seq_length)
        total += batch_loss(model, batch.to(device), autocast).item()
        count += batch.num_targets
    model.train()
    summed, counted = distributed.all_sum([total, count], device)
    return summed / max(counted, 1)


def _eval_entry(step: int, epoch: float, loss: float) -> dict[str, float]:
    return {
        "step": step,
        "epoch": epoch,
        "evalLoss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50.0)), 4),
    }


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
        self.reporter.report({"progress": progress.wire()})

    def finished(self, artifact: Artifact) -> None:
        self.reporter.report(
            {"artifact": artifact.wire(), "progress": self.progress().wire()},
            final=True,
        )


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


# --- the program ---------------------------------------------------------------------------


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
