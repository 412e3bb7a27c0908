"""AdaptationLoop: keep a ModelDeployment's adapter improving from its own use.

When its trigger fires (a count of new ratings, satisfaction below a threshold over a
window, or a schedule), an iteration climbs the ladder: for each rung in order it creates a
FineTuneJob on the deployment's captured feedback (the frozen evaluation set's questions
left out) with an evaluation gate against the champion (the adapter users call today),
served beside it to the gate's Evaluation only. The first rung whose adapter passes the
gate and meets the target ends the climb (else the best that passed). With ``promotion:
Auto`` the winner is rolled out as a canary through the deployment's ``spec.rollout``;
once promoted, the adapter users call is repointed at it in place. With ``Recommend`` the
status says what would be rolled out. Each iteration is kept in the status with its
lineage: the dataset, the children, the numbers, the gate's verdict and the rollout's
outcome. Everything it makes is an ordinary, owned object visible with kubectl.

Rungs built: ``prompt`` (a PromptProfile the team prepared, tried as it serves: an
Evaluation of the champion adapter under it against the champion, no training; promoted,
it becomes the deployment's profile) and ``fineTune`` (sft, kto or dpo on the feedback).
The loop does not write prompt revisions itself, and retrieval adaptation and RAFT are not
rungs yet: a KnowledgeBase's spec.adaptation and a RAFTJob do them by hand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tailor.api.base import Rule, TailorModel, cel_exactly_one, exactly_one
from tailor.api.common import LocalObjectRef, Name, Resources, StatusBase
from tailor.api.evaluation import Gate, Measurement, Target
from tailor.api.finetunejob import LoraConfig, Training
from tailor.api.rollout import ADAPTER_NAME, Analysis, RolloutStep, Sticky


class SatisfactionTrigger(TailorModel):
    """Fire when the share of answers rated up falls below a threshold."""

    threshold: float = Field(gt=0, le=1, description="Least share of ratings that are up.")
    window_seconds: int = Field(
        default=3600, ge=60, le=30 * 86400, description="Ratings of this long ago count."
    )
    min_ratings: int = Field(
        default=20, ge=1, le=1_000_000, description="Fewer ratings in the window: no verdict."
    )


class Trigger(TailorModel):
    """When an iteration starts (any one that fires; never while one is running)."""

    new_ratings: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Ratings (POST /v1/feedback) the deployment's replicas counted since the "
        "last iteration began.",
    )
    satisfaction_below: SatisfactionTrigger | None = Field(
        default=None, description="Satisfaction over a window below a threshold."
    )
    every_seconds: int | None = Field(
        default=None,
        ge=60,
        le=365 * 86400,
        description="A schedule: this long after the last iteration began (or the loop's "
        "creation).",
    )

    rules = (
        Rule(
            cel="has(self.newRatings) || has(self.satisfactionBelow) || has(self.everySeconds)",
            message="a trigger needs newRatings, satisfactionBelow or everySeconds",
            field="newRatings",
            check=lambda m: (
                m.new_ratings is not None
                or m.satisfaction_below is not None
                or m.every_seconds is not None
            ),
        ),
    )


class FeedbackDataset(TailorModel):
    """The training data: the deployment's captured exchanges and their ratings, in the
    format of each rung's objective."""

    min_records: int = Field(
        default=20,
        ge=1,
        le=10_000_000,
        description="Fewer records: the iteration ends (FeedbackTooSmall) without training.",
    )
    held_out_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of questions kept out (by their hash)."
    )
    window: Literal["sinceLastIteration", "all"] = Field(
        default="sinceLastIteration",
        description="sinceLastIteration: exchanges since the previous iteration began (the "
        "champion learned the older ones); all: everything captured.",
    )
    dedup_against_evaluation: bool = Field(
        default=True,
        description="Leave out the evaluation set's questions (evaluation.questions must be "
        "a configMap).",
    )


class Dataset(TailorModel):
    """Where an iteration's training data comes from."""

    from_feedback: FeedbackDataset = Field(
        default_factory=FeedbackDataset, description="The deployment's feedback."
    )


class FineTuneRung(TailorModel):
    """Fine-tune the champion adapter further on the feedback (a new adapter when the
    champion is not a LoRA artifact)."""

    objective: Literal["sft", "kto", "dpo"] = Field(
        default="kto",
        description="sft: up-rated answers and corrections; kto: answers labelled by their "
        "rating; dpo: pairs (a correction or an up-rated answer against a down-rated one).",
    )
    training: Training = Field(default_factory=Training, description="Hyperparameters.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter's shape.")
    resources: Resources = Field(default_factory=Resources, description="Compute for training.")


class PromptRung(TailorModel):
    """Try a prompt revision, no training: a PromptProfile of this namespace, as it serves
    (for instance one whose fewShotSelection picks similar examples from a pool of good
    answers), with the champion adapter, against the champion under the deployment's
    profile. Promoted, it becomes the deployment's ``spec.promptProfileRef``."""

    profile_ref: LocalObjectRef = Field(description="The PromptProfile to try.")


class Rung(TailorModel):
    """One rung of the ladder: a prompt revision or a fine-tune."""

    name: Name = Field(description="The rung's name (in children's names and the status).")
    prompt: PromptRung | None = Field(
        default=None, description="Try a prompt revision (an Evaluation, no training)."
    )
    fine_tune: FineTuneRung | None = Field(default=None, description="Fine-tune on the feedback.")

    rules = (
        Rule(
            cel=cel_exactly_one("prompt", "fineTune"),
            message="a rung is exactly one of prompt or fineTune",
            check=lambda m: exactly_one(m, "prompt", "fine_tune"),
        ),
    )


class Ladder(TailorModel):
    """Rungs tried in order, until one meets the target."""

    target: Target = Field(description="Where the climb stops (the gate's metric, a minimum).")
    rungs: list[Rung] = Field(min_length=1, max_length=8, description="In order.")

    rules = (
        Rule(
            cel="self.rungs.all(r, self.rungs.filter(s, s.name == r.name).size() == 1)",
            message="rung names must be unique",
            field="rungs",
            check=lambda m: len({r.name for r in m.rungs}) == len(m.rungs),
        ),
    )


class RolloutTemplate(TailorModel):
    """The canary a winner is rolled out with (spec.rollout of the deployment)."""

    steps: list[RolloutStep] = Field(
        default_factory=lambda: [RolloutStep(weight=10), RolloutStep(weight=50)],
        min_length=1,
        max_length=20,
        description="Canary weights (each below 100) and pauses.",
    )
    sticky: Sticky = Field(default_factory=Sticky, description="Assignment of users.")
    analysis: Analysis = Field(default_factory=Analysis, description="How a step passes.")

    rules = (
        Rule(
            cel="self.steps.all(s, s.weight < 100)",
            message="a canary step's weight must be below 100 (the last passed step promotes)",
            field="steps",
            check=lambda m: all(s.weight < 100 for s in m.steps),
        ),
    )


class AdaptationLoopSpec(TailorModel):
    """A loop that improves a deployment's adapter from its use."""

    deployment_ref: LocalObjectRef = Field(
        description="The ModelDeployment (with spec.feedback capture on)."
    )
    adapter: str = Field(
        min_length=1,
        max_length=63,
        pattern=ADAPTER_NAME,
        description="The adapter of that deployment users call: the champion, repointed in "
        "place at each promoted winner.",
    )
    trigger: Trigger = Field(description="When an iteration starts.")
    dataset: Dataset = Field(default_factory=Dataset, description="The training data.")
    evaluation: Measurement = Field(
        description="The frozen evaluation set and its scoring: every candidate and the "
        "champion are measured on it."
    )
    gate: Gate = Field(description="What a candidate must reach against the champion.")
    ladder: Ladder = Field(description="What is tried, in order.")
    promotion: Literal["Auto", "Recommend"] = Field(
        default="Recommend",
        description="Auto: roll the winner out as a canary, then repoint the adapter; "
        "Recommend: say so in the status only.",
    )
    rollout: RolloutTemplate = Field(
        default_factory=RolloutTemplate, description="The canary of promotion Auto."
    )
    max_iterations: int = Field(
        default=100, ge=1, le=10_000, description="Iterations after which the loop stops."
    )
    suspend: bool = Field(default=False, description="Start no new iteration.")

    rules = (
        Rule(
            cel="(has(self.dataset) && has(self.dataset.fromFeedback) && "
            "has(self.dataset.fromFeedback.dedupAgainstEvaluation) && "
            "!self.dataset.fromFeedback.dedupAgainstEvaluation) || "
            "has(self.evaluation.questions.configMap)",
            message="dedupAgainstEvaluation reads the evaluation set from a ConfigMap: give "
            "evaluation.questions a configMap, or set dedupAgainstEvaluation: false",
            field="evaluation.questions",
            check=lambda m: (
                not m.dataset.from_feedback.dedup_against_evaluation
                or m.evaluation.questions.config_map is not None
            ),
        ),
        Rule(
            cel="self.ladder.target.metric == self.gate.metric",
            message="ladder.target.metric must be the gate's metric (one measurement decides)",
            field="ladder.target.metric",
            check=lambda m: m.ladder.target.metric == m.gate.metric,
        ),
        Rule(
            cel="self.gate.metric != 'exact' || self.evaluation.scoring.type == 'apibench'",
            message="gate.metric exact is produced only by scoring.type apibench",
            field="gate.metric",
            check=lambda m: m.gate.metric != "exact" or m.evaluation.scoring.type == "apibench",
        ),
        Rule(
            cel="self.gate.metric != 'winRate' || self.evaluation.scoring.type == 'judge'",
            message="gate.metric winRate needs scoring.type judge",
            field="gate.metric",
            check=lambda m: m.gate.metric != "winRate" or m.evaluation.scoring.type == "judge",
        ),
    )


class RungResult(TailorModel):
    """One rung tried in an iteration."""

    rung: str = Field(description="The rung.")
    fine_tune_job: str | None = Field(default=None, description="Its FineTuneJob.")
    adapter: str | None = Field(default=None, description="Its adapter on the deployment.")
    prompt_profile: str | None = Field(
        default=None, description="The PromptProfile it tried (a prompt rung)."
    )
    phase: str = Field(description="Training, Gating (the gate's Evaluation), Passed, Failed.")
    evaluation: str | None = Field(default=None, description="The gate's Evaluation.")
    candidate: float | None = Field(default=None, description="Its metric.")
    champion: float | None = Field(default=None, description="The champion's metric.")
    message: str = Field(default="", description="Why.")


class Iteration(TailorModel):
    """One iteration, with its lineage."""

    model_config = TailorModel.model_config | {"extra": "ignore"}

    number: int = Field(description="1, 2, ...")
    trigger: str = Field(description="What started it.")
    started: str = Field(description="When (RFC 3339).")
    finished: str | None = Field(default=None, description="When it ended.")
    phase: Literal["Training", "RollingOut", "Done"] = Field(description="Where it is.")
    champion: str | None = Field(default=None, description="What users got when it began.")
    dataset_hash: str | None = Field(
        default=None,
        description="sha256 of the training records (the first rung's, as "
        "its FineTuneJob's status.feedback.train reports them).",
    )
    records: int | None = Field(default=None, description="Training records.")
    rungs: list[RungResult] = Field(default_factory=list, description="What was tried.")
    winner: str | None = Field(
        default=None, description="The FineTuneJob that won (a prompt rung: its PromptProfile)."
    )
    winner_kind: Literal["FineTuneJob", "PromptProfile"] | None = Field(
        default=None, description="What the winner is."
    )
    target_met: bool | None = Field(default=None, description="The winner met the target.")
    rollout: str | None = Field(
        default=None, description="Promoted, RolledBack, Aborted, Recommended or None."
    )
    outcome: str = Field(default="", description="What the iteration did, in a line.")
    seconds: dict[str, float] = Field(
        default_factory=dict, description="Wall time of each phase (training, rollout)."
    )
    phase_started: str | None = Field(
        default=None, description="When the phase in progress began (RFC 3339)."
    )
    rollout_id: str | None = Field(
        default=None, description="The deployment's status.rollout.id of the winner's canary."
    )


class AdaptationLoopStatus(StatusBase):
    """Observed state of an AdaptationLoop."""

    phase: (
        Literal["Waiting", "Training", "RollingOut", "Suspended", "Finished", "Failed"] | None
    ) = Field(
        default=None,
        description="Waiting (for its trigger), Training (a rung's job and gate), "
        "RollingOut, Suspended, Finished (maxIterations) or Failed (invalid spec).",
    )
    champion: str | None = Field(
        default=None, description="The FineTuneJob whose adapter users get (None: the first)."
    )
    ratings_seen: dict[str, int] = Field(
        default_factory=dict,
        description="Per replica, the ratings it had counted when the last iteration began.",
    )
    iterations: list[Iteration] = Field(
        default_factory=list, description="The latest iterations (up to 20), oldest first."
    )
