"""FineTuneJob: parameter-efficient (LoRA, QLoRA) or full fine-tuning of a language model,
run as a Kubernetes Job that checkpoints, resumes, reports progress and publishes an artifact.

:class:`FineTuneRecipe` (model, method, hyperparameters, compute) is shared with RAFTJob,
whose training stage is a child FineTuneJob.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tailor.api.base import Rule, TailorModel
from tailor.api.common import (
    DATA_URI,
    Artifact,
    DataSource,
    ModelSource,
    PvcPath,
    Queueing,
    QueueStatus,
    Resources,
    StatusBase,
)
from tailor.api.evaluation import GatedEvaluation, GateStatus

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LoraConfig(TailorModel):
    """Low-rank adapter settings (PEFT LoraConfig)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator (alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=32,
        description="Module names to adapt, or [all-linear].",
    )


class Training(TailorModel):
    """Optimisation hyperparameters."""

    epochs: float = Field(default=3, gt=0, le=100, description="Passes over the training set.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(
        default=8,
        ge=1,
        le=4096,
        description="Sequences per device step, per process; the global batch of one "
        "optimizer step is batchSize x gradientAccumulation x processes (nodes x gpus).",
    )
    gradient_accumulation: int = Field(
        default=1, ge=1, le=1024, description="Device steps per optimizer step."
    )
    max_seq_length: int = Field(
        default=1024, ge=16, le=131072, description="Longest sequence, in tokens."
    )
    packing: bool = Field(
        default=True,
        description="Pack several examples into one sequence so little compute goes to padding.",
    )
    warmup_ratio: float = Field(default=0.03, ge=0, le=0.5, description="Share of warmup steps.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(default=42, ge=0, description="Seed for initialisation and data order.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 where the device supports it, else fp32."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="With more than one process: ddp (a full copy per process, gradients "
        "all-reduced) or fsdp (PyTorch FSDP2: parameters, gradients and optimizer state "
        "sharded per decoder layer; method full only, for models that do not fit one device).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, about a third "
        "more compute.",
    )


class Checkpointing(TailorModel):
    """Checkpoints a restarted pod resumes from."""

    every_steps: int = Field(default=200, ge=1, description="Save every N optimizer steps.")
    keep: int = Field(default=2, ge=1, le=100, description="Checkpoints kept (newest).")


LORA_METHODS = ("lora", "qlora")


class FineTuneRecipe(TailorModel):
    """What to train and how: model, method, hyperparameters and compute."""

    base_model: ModelSource = Field(description="The model to fine-tune.")
    method: Literal["lora", "qlora", "full"] = Field(
        default="lora",
        description="lora (PEFT adapter), qlora (adapter over a 4-bit NF4 base, CUDA only) or full.",
    )
    lora: LoraConfig | None = Field(
        default=None, description="Adapter settings (lora and qlora only; defaults apply)."
    )
    training: Training = Field(default_factory=Training, description="Hyperparameters.")
    checkpoint: Checkpointing = Field(
        default_factory=Checkpointing, description="Checkpoint cadence and retention."
    )
    resources: Resources = Field(default_factory=Resources, description="Compute for training.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.lora) || self.method in ['lora', 'qlora']",
            message="lora settings apply only to method lora or qlora; remove lora or change method",
            field="lora",
            check=lambda m: m.lora is None or m.method in LORA_METHODS,
        ),
        Rule(
            cel="self.method != 'qlora' || (has(self.resources) && self.resources.gpus > 0)",
            message="qlora needs a CUDA GPU: set resources.gpus >= 1 or use method lora",
            field="method",
            check=lambda m: m.method != "qlora" or m.resources.gpus > 0,
        ),
        Rule(
            cel="!has(self.training) || !has(self.training.strategy) || "
            "self.training.strategy != 'fsdp' || self.method == 'full'",
            message="training.strategy fsdp shards full fine-tuning; use method full, or "
            "strategy ddp for lora and qlora (adapters are small enough to copy)",
            field="training.strategy",
            check=lambda m: m.training.strategy != "fsdp" or m.method == "full",
        ),
    )


class DatasetSpec(TailorModel):
    """Training data and how to hold some out for evaluation."""

    train: DataSource = Field(
        description=(
            "Training records: OpenAI chat JSONL ({messages: [...]}), prompt/completion JSONL "
            "or plain text."
        )
    )
    validation: DataSource | None = Field(default=None, description="Validation records.")
    validation_split: float | None = Field(
        default=None,
        gt=0,
        le=0.5,
        description="Share of train held out for validation when validation is not given.",
    )
    format: Literal["auto", "chat", "completion", "text"] = Field(
        default="auto", description="Record format; auto detects it from the first record."
    )

    rules = (
        Rule(
            cel="!(has(self.validation) && has(self.validationSplit))",
            message="set validation or validationSplit, not both",
            field="validationSplit",
            check=lambda m: m.validation is None or m.validation_split is None,
        ),
    )


class RunOutput(TailorModel):
    """Which artifact store a run writes to."""

    store: Literal["pvc", "s3"] | None = Field(
        default=None,
        description="This run's artifact store, overriding the cluster's (Helm: "
        "artifacts.store): pvc, the namespace's artifacts claim; s3, the operator's S3 "
        "connection (artifacts.s3; each pod works in a scratch folder, so the pods of a "
        "multi-node run mount no shared claim). Unset: the cluster's store.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.store) == has(oldSelf.store) && "
            "(!has(self.store) || self.store == oldSelf.store)",
            message="store is immutable; create a new run to write elsewhere",
            field="store",
            transition=True,
            check=lambda new, old: new.store == old.store,
        ),
    )


class Output(RunOutput):
    """Where the artifact is written."""

    pvc: PvcPath | None = Field(
        default=None,
        description="Volume and path; default the namespace's artifacts volume "
        "under finetunejob/<name>/<uid>/ (or the bucket's, with the s3 store).",
    )

    rules = RunOutput.rules + (
        Rule(
            cel="!has(self.pvc) || !has(self.store) || self.store == 'pvc'",
            message="pvc names a claim to write to: drop store, or drop pvc to write to s3",
            field="store",
            check=lambda m: m.pvc is None or m.store in (None, "pvc"),
        ),
    )


class Reference(TailorModel):
    """The adapter a run continues (and kto and dpo measure against)."""

    uri: str = Field(
        max_length=1024,
        pattern=DATA_URI,
        description="A LoRA adapter (a FineTuneJob's status.artifact.uri: s3://... or "
        "pvc://claim/path): training continues from it (any objective), and for kto and "
        "dpo it is the reference, so a deployed adapter is improved in place.",
    )


class Preference(TailorModel):
    """Settings of the kto and dpo objectives."""

    beta: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="How far the trained model may move from the reference (TRL's beta).",
    )
    desirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="kto: weight of desirable examples."
    )
    undesirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="kto: weight of undesirable examples."
    )
    reference: Reference | None = Field(
        default=None,
        description="Continue this adapter (and, for kto and dpo, compare with it); unset: "
        "a new adapter, the base model as the reference.",
    )


class FineTuneJobSpec(FineTuneRecipe, Queueing):
    """A fine-tuning run."""

    objective: Literal["sft", "kto", "dpo"] = Field(
        default="sft",
        description="sft: learn the answers of chat, completion or text records; kto: "
        "learn from answers labelled desirable or not ({prompt, completion, label}); dpo: "
        "learn from pairs ({prompt, chosen, rejected}). Separate from method (lora, "
        "qlora, full): any objective with any method.",
    )
    preference: Preference = Field(
        default_factory=Preference, description="Settings of the kto and dpo objectives."
    )
    dataset: DatasetSpec = Field(description="Training and validation data.")
    output: Output = Field(default_factory=Output, description="Where the artifact goes.")
    suspend: bool = Field(default=False, description="Pause the run (pods are removed).")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the run after this many seconds."
    )
    backoff_limit: int = Field(
        default=2, ge=0, le=100, description="Retries (resuming from the newest checkpoint)."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished Job (not the artifact) after this."
    )
    evaluation: GatedEvaluation | None = Field(
        default=None,
        description="Once trained, evaluate the adapter against a baseline on a deployment "
        "that serves both, and gate it: status.evaluation says Passed or Failed; until it "
        "passes, the deployment serves it to Evaluations only.",
    )

    rules = FineTuneRecipe.rules + (
        Rule(
            cel="self.objective == 'sft' || !has(self.dataset.format) || "
            "self.dataset.format == 'auto'",
            message="objective kto and dpo read their own record formats: set dataset.format "
            "to auto (or leave it out)",
            field="dataset.format",
            check=lambda m: m.objective == "sft" or m.dataset.format == "auto",
        ),
        Rule(
            cel="!has(self.preference) || !has(self.preference.reference) || "
            "self.method in ['lora', 'qlora']",
            message="preference.reference continues a LoRA adapter: use method lora or "
            "qlora, or remove it",
            field="preference.reference",
            check=lambda m: m.preference.reference is None or m.method in LORA_METHODS,
        ),
        Rule(
            cel="self.baseModel == oldSelf.baseModel",
            message="baseModel is immutable; create a new FineTuneJob to train another model",
            field="baseModel",
            transition=True,
            check=lambda new, old: new.base_model == old.base_model,
        ),
        Rule(
            cel="self.method == oldSelf.method",
            message="method is immutable; create a new FineTuneJob to change it",
            field="method",
            transition=True,
            check=lambda new, old: new.method == old.method,
        ),
    )


class Progress(TailorModel):
    """Training progress, reported by the trainer itself."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps in the run.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    percent: int | None = Field(default=None, description="Percent complete.")
    loss: float | None = Field(default=None, description="Recent training loss.")
    eval_loss: float | None = Field(default=None, description="Last evaluation loss.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds left.")
    updated: str | None = Field(default=None, description="When this was reported.")


class FeedbackUse(TailorModel):
    """What a feedback DataSource was made of (reported by the trainer when it reads it)."""

    exchanges: int = Field(description="Captured exchanges in the time window.")
    rated: int = Field(description="Of those, exchanges with a rating.")
    records: int = Field(description="Records used, after the held-out split and duplicates.")
    sha256: str | None = Field(
        default=None, description="sha256 of the records used (sorted): the dataset's identity."
    )
    skipped: dict[str, int] = Field(
        default_factory=dict,
        description="Skipped, by reason: notRated, conflictingRatings, otherSplit, "
        "duplicate, downWithoutCorrection (sft), noPair (dpo), noUsefulSource (retrieval), "
        "exchangeNotCaptured, notAChat.",
    )


class FineTuneJobStatus(StatusBase):
    """Observed state of a FineTuneJob."""

    phase: (
        Literal["Pending", "Queued", "Admitted", "Running", "Succeeded", "Failed", "Suspended"]
        | None
    ) = Field(
        default=None,
        description="Pending, Queued (waiting for quota in Kueue, or for a node), Admitted "
        "(Kueue admitted it; pods starting), Running, Succeeded, Failed, Suspended.",
    )
    queue: QueueStatus | None = Field(
        default=None, description="Where the run stands in its Kueue queue (with a queue)."
    )
    progress: Progress | None = Field(default=None, description="Progress of the run.")
    feedback: dict[str, FeedbackUse] | None = Field(
        default=None,
        description="By dataset (train, validation): what a feedback DataSource gave.",
    )
    artifact: Artifact | None = Field(default=None, description="The published adapter/weights.")
    job_name: str | None = Field(default=None, description="The training Job.")
    evaluation: GateStatus | None = Field(
        default=None, description="The gate's verdict on the artifact (spec.evaluation)."
    )
    job_spec_hash: str | None = Field(
        default=None,
        description="Hash of the spec (without suspend) the training Job was created from.",
    )
    start_time: str | None = Field(default=None, description="When training started.")
    completion_time: str | None = Field(default=None, description="When it finished.")
    attempts: int | None = Field(default=None, description="Pods started so far.")
