"""The run's bookkeeping: the plan of its optimizer steps (:class:`Schedule`) and what it
has done so far (:class:`TrainState`), which a checkpoint saves and the manifest reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tailor.api.finetunejob import FineTuneJobSpec


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
    reference: list[list[float]] = field(default_factory=list)
    """kto, dpo: the reference log-probabilities of each train then validation example,
    computed before the first step (a resumed run compares with the same reference)."""

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
