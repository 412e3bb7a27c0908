"""Evaluation: a one-shot measurement of candidates on the user's own questions.

Each candidate is a ModelDeployment (optionally one of its adapters, with or without its
knowledge-base retrieval) asked every sampled question through the gateway users hit, so
latency and cost are the real ones. Answers are scored (the matchers or APIBench's AST
metric), and the status holds, per candidate, the metric with a 95% bootstrap interval,
latency, tokens, cost per query in device-seconds and a paired McNemar test against the
baseline; with a target, a recommendation: the cheapest candidate whose interval's lower
bound meets it. Like a Job, an Evaluation runs once: its spec cannot change.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tailor.api.base import Rule, TailorModel
from tailor.api.common import (
    Artifact,
    DataSource,
    FreeForm,
    LocalObjectRef,
    Name,
    Resources,
    StatusBase,
    Teacher,
)
from tailor.api.promptprofile import ProfileRevisionRef, check_json_schema

ScoringType = Literal["exact", "contains", "regex", "jsonSchema", "apibench", "judge"]
APIBENCH_CORPORA = ("torchhub", "huggingface")
"""The APIBench API corpora packaged with Tailor (``tailor.data.apibench``)."""
METRICS: dict[str, tuple[str, ...]] = {
    "exact": ("accuracy",),
    "contains": ("accuracy",),
    "regex": ("accuracy",),
    "jsonSchema": ("accuracy",),
    "apibench": ("accuracy", "exact", "hallucination"),
    "judge": ("accuracy", "winRate"),
}
"""The metrics each scorer produces (hallucination: lower is better, never a target;
winRate: only against a baseline)."""


class Sample(TailorModel):
    """A seeded sample of the questions (the same seed asks the same questions)."""

    size: int = Field(ge=1, le=100000, description="Questions to ask (all when fewer).")
    seed: int = Field(default=42, ge=0, description="Seed of the sample.")


class Judge(Teacher):
    """An OpenAI-compatible model that grades answers: a ModelDeployment of this namespace,
    or an external URL (through the URL guard: https, no private address unless allowed)."""

    rubric: str = Field(
        min_length=1,
        max_length=4000,
        description="What a good answer is, in words: the judge grades each answer against "
        "it (and the record's answer, when it has one).",
    )


class Scoring(TailorModel):
    """How an answer is scored against its record."""

    type: ScoringType = Field(
        description="exact, contains or regex: the answer against the record's answer "
        "(SQuAD-normalised text; regex: the answer is a pattern searched ignoring case); "
        "jsonSchema: the answer parses as JSON and validates against schema; apibench: the "
        "answer's API call against the record's apiCall, as the RAFT paper scores APIBench "
        "(accuracy: a corpus API of the gold API's domain; exact: the gold API; "
        "hallucination: no corpus API)."
    )
    corpus: Literal["torchhub", "huggingface"] | None = Field(
        default=None, description="apibench: the packaged API corpus the calls are matched in."
    )
    judge: Judge | None = Field(
        default=None,
        description="judge: the model that grades. Each answer is graded pass or fail against "
        "the rubric (accuracy); with a baseline, each candidate's answer is also compared "
        "with the baseline's, asked in both orders (position bias): winRate and the "
        "judge's agreement with itself.",
    )
    json_schema: FreeForm | None = Field(
        default=None,
        description="jsonSchema: the JSON Schema every answer must validate against (checked "
        "against its metaschema when the Evaluation is applied).",
    )

    rules = (
        Rule(
            cel="self.type != 'apibench' || has(self.corpus)",
            message="apibench needs corpus: torchhub or huggingface (the API corpus the "
            "answers' calls are matched in)",
            field="corpus",
            check=lambda m: m.type != "apibench" or m.corpus is not None,
        ),
        Rule(
            cel="(self.type == 'judge') == has(self.judge)",
            message="judge is required when type is judge, and only then",
            field="judge",
            check=lambda m: (m.type == "judge") == (m.judge is not None),
        ),
        Rule(
            cel="self.type != 'jsonSchema' || has(self.jsonSchema)",
            message="jsonSchema needs jsonSchema: the schema answers must validate against",
            field="jsonSchema",
            check=lambda m: m.type != "jsonSchema" or m.json_schema is not None,
        ),
    )

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


class Candidate(TailorModel):
    """One system to measure: a ModelDeployment, one of its adapters, retrieval on or off."""

    name: Name = Field(description="The candidate's name in status and the report.")
    deployment_ref: LocalObjectRef = Field(description="The ModelDeployment that answers.")
    adapter: Name | None = Field(
        default=None, description="One of the deployment's adapters (unset: the base model)."
    )
    retrieval: bool = Field(
        default=True,
        description="Use the deployment's knowledge-base retrieval (false: the question alone).",
    )
    prompt_profile_ref: ProfileRevisionRef | None = Field(
        default=None,
        description="Answer under this PromptProfile revision instead of the one the "
        "deployment serves (sent with each request, as the profile's tests are).",
    )


class Target(TailorModel):
    """What good enough means: the recommendation's bar."""

    metric: Literal["accuracy", "exact", "winRate"] = Field(
        default="accuracy",
        description="accuracy (every scorer), exact (apibench only) or winRate (judge, "
        "against the baseline; the baseline itself is not recommended on winRate).",
    )
    min: float = Field(
        ge=0, le=1, description="The 95% interval's lower bound must reach this, 0-1."
    )


class Measurement(TailorModel):
    """What is asked and how it is scored: an Evaluation's, or a gate's."""

    questions: DataSource = Field(
        description="JSON lines or a JSON array of {question, answer?, apiCall?, id?} records, "
        "or chat records {messages} (the last user turn is the question, the last assistant "
        "turn the answer), e.g. a feedback source's heldOut split with format sft."
    )
    sample: Sample | None = Field(default=None, description="Ask a seeded sample (unset: all).")
    scoring: Scoring = Field(description="How answers are scored.")
    concurrency: int = Field(
        default=8, ge=1, le=64, description="Requests in flight to a candidate."
    )
    max_tokens: int = Field(
        default=128, ge=1, le=4096, description="Longest answer per question (greedy)."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Compute of the evaluation Job."
    )


class EvaluationSpec(Measurement):
    """A measurement of candidates on a question set."""

    candidates: list[Candidate] = Field(
        min_length=1, max_length=8, description="The systems measured, one after another."
    )
    baseline: Name | None = Field(
        default=None,
        description="The candidate the others are compared with (paired McNemar test).",
    )
    target: Target | None = Field(
        default=None, description="The bar of the recommendation (unset: no recommendation)."
    )

    rules = (
        Rule(
            cel="self.candidates.all(c, self.candidates.filter(d, d.name == c.name).size() == 1)",
            message="candidate names must be unique",
            field="candidates",
            check=lambda m: len({c.name for c in m.candidates}) == len(m.candidates),
        ),
        Rule(
            cel="!has(self.baseline) || self.candidates.exists(c, c.name == self.baseline)",
            message="baseline must be the name of one of the candidates",
            field="baseline",
            check=lambda m: m.baseline is None or any(c.name == m.baseline for c in m.candidates),
        ),
        Rule(
            cel="!has(self.target) || self.target.metric != 'exact' || "
            "self.scoring.type == 'apibench'",
            message="target.metric exact is produced only by scoring.type apibench; use accuracy",
            field="target.metric",
            check=lambda m: (
                m.target is None or m.target.metric != "exact" or m.scoring.type == "apibench"
            ),
        ),
        Rule(
            cel="!has(self.target) || self.target.metric != 'winRate' || "
            "(self.scoring.type == 'judge' && has(self.baseline))",
            message="target.metric winRate needs scoring.type judge and a baseline",
            field="target.metric",
            check=lambda m: (
                m.target is None
                or m.target.metric != "winRate"
                or (m.scoring.type == "judge" and m.baseline is not None)
            ),
        ),
        Rule(
            cel="self == oldSelf",
            message="an Evaluation runs once: its spec cannot change; create a new Evaluation",
            transition=True,
            check=lambda new, old: new == old,
        ),
    )


class PairedTest(TailorModel):
    """A paired test of candidate against baseline on the same questions (exact McNemar)."""

    alpha: float = Field(
        default=0.05, gt=0, lt=1, description="The candidate must be better at this level."
    )


class VsBaseline(TailorModel):
    """How the candidate must compare with the baseline (MLflow's validation thresholds)."""

    min_absolute_change: float = Field(
        default=0.0,
        ge=-1,
        le=1,
        description="Least (candidate - baseline) in the metric (0.05: five points better).",
    )
    paired_test: PairedTest | None = Field(
        default=None,
        description="Also require a significant improvement: the exact McNemar test of the "
        "Evaluation, on accuracy (gate.metric accuracy only).",
    )


class Gate(TailorModel):
    """What a candidate must reach to pass, in the shape of MLflow's MetricThreshold."""

    metric: Literal["accuracy", "exact", "winRate"] = Field(
        description="The metric gated on (exact: scoring apibench; winRate: scoring judge, "
        "the share of comparisons with the baseline the candidate won)."
    )
    min: float | None = Field(
        default=None, ge=0, le=1, description="The least value of the metric."
    )
    vs_baseline: VsBaseline | None = Field(
        default=None, description="How it must compare with the baseline."
    )

    rules = (
        Rule(
            cel="has(self.min) || has(self.vsBaseline)",
            message="a gate needs min, vsBaseline or both",
            field="min",
            check=lambda m: m.min is not None or m.vs_baseline is not None,
        ),
        Rule(
            cel="self.metric != 'winRate' || !has(self.vsBaseline)",
            message="winRate is already measured against the baseline: gate it with min",
            field="vsBaseline",
            check=lambda m: m.metric != "winRate" or m.vs_baseline is None,
        ),
        Rule(
            cel="self.metric == 'accuracy' || !has(self.vsBaseline) || "
            "!has(self.vsBaseline.pairedTest)",
            message="vsBaseline.pairedTest tests accuracy (McNemar on right and wrong answers): "
            "use metric accuracy, or leave pairedTest out",
            field="vsBaseline.pairedTest",
            check=lambda m: (
                m.metric == "accuracy" or m.vs_baseline is None or m.vs_baseline.paired_test is None
            ),
        ),
    )


class GatedEvaluation(Measurement):
    """An Evaluation run when training succeeds: the new adapter, served beside the
    baseline by a ModelDeployment (to the Evaluation only, until it passes), against it."""

    deployment_ref: LocalObjectRef = Field(
        description="The ModelDeployment that serves this job's adapter (an entry of its "
        "spec.adapters with fineTuneJobRef naming this job) beside the baseline."
    )
    baseline_adapter: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="The adapter of that deployment to beat (unset: its base model).",
    )
    gate: Gate = Field(description="What the new adapter must reach.")

    rules = (
        Rule(
            cel="self.gate.metric != 'exact' || self.scoring.type == 'apibench'",
            message="gate.metric exact is produced only by scoring.type apibench",
            field="gate.metric",
            check=lambda m: m.gate.metric != "exact" or m.scoring.type == "apibench",
        ),
        Rule(
            cel="self.gate.metric != 'winRate' || self.scoring.type == 'judge'",
            message="gate.metric winRate needs scoring.type judge",
            field="gate.metric",
            check=lambda m: m.gate.metric != "winRate" or m.scoring.type == "judge",
        ),
    )


class GateStatus(TailorModel):
    """The gate's verdict on a trained artifact (kept, passed or not: lineage)."""

    model_config = TailorModel.model_config | {"extra": "ignore"}

    phase: Literal["Waiting", "Evaluating", "Passed", "Failed"] = Field(
        description="Waiting (for the deployment to serve the adapter), Evaluating, Passed or "
        "Failed (a failed artifact is kept but not served to users unless the deployment's "
        "adapter sets serveWithoutGate)."
    )
    evaluation: str | None = Field(default=None, description="The Evaluation it ran.")
    metric: str | None = Field(default=None, description="The metric gated on.")
    candidate: float | None = Field(default=None, description="The new adapter's value.")
    baseline: float | None = Field(default=None, description="The baseline's value.")
    change: float | None = Field(default=None, description="candidate - baseline.")
    p_value: float | None = Field(default=None, description="McNemar p, candidate vs baseline.")
    message: str = Field(default="", description="Why it passed, failed or waits.")


class Interval(TailorModel):
    """A share with its 95% bootstrap interval, 0-1."""

    value: float = Field(description="The share measured.")
    low: float = Field(description="Lower bound of the 95% interval.")
    high: float = Field(description="Upper bound of the 95% interval.")


class CandidateResult(TailorModel):
    """One candidate's measurement."""

    name: str = Field(description="The candidate.")
    scored: int = Field(description="Questions answered and scored (failed requests excluded).")
    errors: int = Field(default=0, description="Requests that failed for good (not scored).")
    accuracy: Interval | None = Field(default=None, description="Share of correct answers.")
    exact: Interval | None = Field(default=None, description="apibench: share naming the gold API.")
    hallucination: Interval | None = Field(
        default=None, description="apibench: share naming no API of the corpus."
    )
    win_rate: Interval | None = Field(
        default=None,
        description="judge with a baseline: the share of questions the judge preferred this "
        "candidate's answer in both orders (a tie or a disagreement counts a half).",
    )
    judge_agreement: float | None = Field(
        default=None,
        description="judge with a baseline: the share of questions on which the judge gave "
        "the same preference in both orders (1: no position bias seen).",
    )
    latency_p50_seconds: float | None = Field(default=None, description="Median request time.")
    latency_p95_seconds: float | None = Field(default=None, description="95th percentile.")
    completion_tokens: float | None = Field(default=None, description="Mean tokens per answer.")
    cost_per_query: float | None = Field(
        default=None,
        description="Device-seconds per question: the candidate's wall time while it alone "
        "was asked, times the devices its deployment held (GPUs, else CPU cores), over scored.",
    )
    devices: float | None = Field(default=None, description="Devices the deployment held.")
    p_value: float | None = Field(
        default=None,
        description="Exact McNemar test against the baseline on the questions both "
        "answered (accuracy); unset for the baseline.",
    )


class Recommendation(TailorModel):
    """The cheapest candidate that meets the target."""

    candidate: str | None = Field(default=None, description="Unset when none meets the target.")
    message: str = Field(description="Why, in words.")


class EvaluationProgress(TailorModel):
    """How far the run is."""

    answered: int = Field(description="Questions answered over all candidates.")
    total: int = Field(description="Questions times candidates.")
    candidate: str | None = Field(default=None, description="The candidate being asked.")


class EvaluationStatus(StatusBase):
    """Observed state of an Evaluation."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = Field(
        default=None, description="Pending, Running, Succeeded or Failed."
    )
    questions: int | None = Field(default=None, description="Questions asked of each candidate.")
    questions_hash: str | None = Field(
        default=None,
        description="sha256 of the asked questions' ids in order: two Evaluations with the "
        "same hash asked the same questions (tailor eval compare pairs them).",
    )
    outcomes: dict[str, str] | None = Field(
        default=None,
        description="Per candidate, one character per question in order: 1 correct, 0 wrong, "
        "- not answered (what a paired comparison needs); kept up to "
        "2000 questions.",
    )
    progress: EvaluationProgress | None = Field(default=None, description="While running.")
    candidates: list[CandidateResult] | None = Field(default=None, description="The results.")
    recommendation: Recommendation | None = Field(default=None, description="With a target.")
    report: Artifact | None = Field(
        default=None, description="report.json, answers.jsonl and report.png."
    )
