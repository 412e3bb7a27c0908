"""A ModelDeployment's rollout (``spec.rollout``): a candidate (an adapter, a prompt-profile
revision, a knowledge-base version, or several of them) against the stable one, measured
inside the gateway on live traffic and promoted or rolled back by itself.

Requests for the stable's model name are split by session: each session (a header, else
the request's ``user``, else the API key) falls in a fixed bucket of 10,000, and buckets
below the step's weight are answered by the candidate (``canary``), so a conversation stays
on one variant and a rising weight only moves sessions to the candidate. In ``shadow`` mode
users always get the stable's answer; the weight is the share of requests the candidate
also answers in the background, compared with the stable's answer by a judge model.

Each step's analysis compares the variants' own measurements over the step (satisfaction
from POST /v1/feedback, error rate, p95 latency, tokens per query, the judge's win rate):
a step passes when its pause is over and every metric has its samples and is within its
limit; a metric past its limit (with its samples) rolls the rollout back at once; a step
without enough samples holds. The last step passed promotes: the candidate answers all of
the stable's traffic until ``spec.rollout`` changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tailor.api.base import Rule, TailorModel
from tailor.api.promptprofile import ProfileRevisionRef

ADAPTER_NAME = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
RATE_METRICS = ("satisfaction", "errorRate")
"""Metrics whose ``maxWorse`` is absolute (shares); the others' is relative (a ratio)."""


class Variant(TailorModel):
    """What one side of a rollout answers with."""

    adapter: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=ADAPTER_NAME,
        description="An adapter of spec.adapters; unset: the base model.",
    )
    prompt_profile_ref: ProfileRevisionRef | None = Field(
        default=None,
        description="Answer under this PromptProfile of the namespace (a revision in its "
        "status.history, or the one it serves) instead of the deployment's "
        "spec.promptProfileRef: a prompt revision rolled out like an adapter.",
    )
    knowledge_base_version: int | None = Field(
        default=None,
        ge=1,
        description="Retrieve from this version N of the deployment's KnowledgeBase (its "
        "collection <alias>-v<N>: the one serving now or one of the store.keepCollections "
        "it keeps) instead of the one it serves: a rebuilt or re-tuned index rolled out.",
    )


class RolloutStep(TailorModel):
    """One weight of the rollout and the least time spent at it."""

    weight: int = Field(
        ge=1,
        le=100,
        description="Percent of the stable's sessions the candidate answers (canary: below "
        "100, the stable is measured beside it), or of its requests the candidate also "
        "answers unseen (shadow).",
    )
    pause_seconds: int = Field(
        default=60,
        ge=0,
        le=7 * 86400,
        description="Least time at this weight before its analysis may pass it (a failing "
        "metric rolls back without waiting).",
    )


class MetricCheck(TailorModel):
    """One measurement of the candidate against the stable's, over the step."""

    name: Literal["satisfaction", "errorRate", "p95Latency", "costPerQuery", "winRate"] = Field(
        description="satisfaction: share of rated answers rated up (POST /v1/feedback); "
        "errorRate: share of requests that failed; p95Latency: seconds per answer; "
        "costPerQuery: prompt + completion tokens per answer (what a shared server's "
        "time scales with); winRate: share of the judge's comparisons the candidate won "
        "(shadow mode with analysis.judge; a tie counts half)."
    )
    max_worse: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="How much worse than the stable the candidate may be: absolute for "
        "satisfaction and errorRate (0.05: five points), relative for p95Latency and "
        "costPerQuery (0.5: 1.5x the stable's). Not for winRate.",
    )
    min: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="winRate only: the least share of comparisons the candidate must win.",
    )
    min_samples: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Samples each variant needs in the step before this metric decides "
        "(ratings for satisfaction, judged pairs for winRate, answers otherwise); fewer: "
        "the step holds.",
    )

    rules = (
        Rule(
            cel="self.name == 'winRate' ? (has(self.min) && !has(self.maxWorse)) : "
            "(has(self.maxWorse) && !has(self.min))",
            message="winRate takes min (the least share won); every other metric takes "
            "maxWorse (how much worse than stable it may be)",
            field="maxWorse",
            check=lambda m: (
                (m.min is not None and m.max_worse is None)
                if m.name == "winRate"
                else (m.max_worse is not None and m.min is None)
            ),
        ),
    )


class ShadowJudge(TailorModel):
    """The model that compares the candidate's shadow answer with the stable's, asked by
    the gateway itself (both orders, an enforced JSON answer) on its own engine."""

    adapter: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=ADAPTER_NAME,
        description="An adapter of spec.adapters to judge with; unset: the base model.",
    )
    rubric: str = Field(
        default="The better answer is correct, answers the question asked and invents nothing.",
        min_length=1,
        max_length=2000,
        description="What makes one answer better than the other.",
    )


class Analysis(TailorModel):
    """How each step is judged."""

    interval_seconds: int = Field(
        default=15, ge=2, le=3600, description="How often the operator measures a step."
    )
    metrics: list[MetricCheck] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Checks of the candidate against the stable. Default: canary, "
        "satisfaction at most 0.1 and errorRate at most 0.05 worse; shadow, errorRate at "
        "most 0.05 worse and, with a judge, winRate at least 0.5; 20 samples each.",
    )
    judge: ShadowJudge | None = Field(
        default=None,
        description="shadow mode: the model comparing both answers (needed by winRate).",
    )
    confidence: float | None = Field(
        default=None,
        ge=0.5,
        le=0.999,
        description="Decide satisfaction, errorRate and winRate by an interval at this "
        "confidence instead of the point estimate: a check fails only when the whole "
        "interval (of candidate - stable; of the win rate) is past its limit, and passes "
        "only when the point estimate is within it; in between the step holds. Unset: the "
        "point estimate decides (fastest rollback), the 95% interval is still reported.",
    )

    rules = (
        Rule(
            cel="!has(self.metrics) || "
            "self.metrics.all(m, self.metrics.exists_one(o, o.name == m.name))",
            message="each metric may be listed once",
            field="metrics",
            check=lambda m: len({c.name for c in m.metrics or []}) == len(m.metrics or []),
        ),
        Rule(
            cel="!has(self.metrics) || !self.metrics.exists(m, m.name == 'winRate') || "
            "has(self.judge)",
            message="winRate needs analysis.judge (the model comparing the answers)",
            field="judge",
            check=lambda m: (
                m.judge is not None or all(c.name != "winRate" for c in m.metrics or [])
            ),
        ),
    )


class Sticky(TailorModel):
    """What keeps a user on one variant."""

    by: Literal["session", "apiKey"] = Field(
        default="session",
        description="session: the header below, else the request's `user` field, else the "
        "API key; apiKey: the caller's API key (without auth every caller is one session).",
    )
    header: str = Field(
        default="X-Session-Id",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9-]+$",
        description="The request header naming the session (by: session).",
    )


class Rollout(TailorModel):
    """A candidate rolled out against the stable, step by step (see the module doc)."""

    stable: Variant = Field(
        default_factory=Variant,
        description="What users get today; requests for its model name are split.",
    )
    candidate: Variant = Field(description="What may replace it.")
    mode: Literal["canary", "shadow"] = Field(
        default="canary",
        description="canary: the candidate answers some users; shadow: it answers copies of "
        "their requests, never shown to them.",
    )
    steps: list[RolloutStep] = Field(
        min_length=1,
        max_length=20,
        description="Weights in order, each held at least its pauseSeconds; after the last "
        "passes the candidate is promoted.",
    )
    sticky: Sticky = Field(default_factory=Sticky, description="Assignment of users.")
    analysis: Analysis = Field(default_factory=Analysis, description="How a step passes.")

    rules = (
        Rule(
            cel="(has(self.stable) && has(self.stable.adapter) ? self.stable.adapter : '') != "
            "(has(self.candidate.adapter) ? self.candidate.adapter : '') || "
            "has(self.candidate.promptProfileRef) != "
            "(has(self.stable) && has(self.stable.promptProfileRef)) || "
            "(has(self.candidate.promptProfileRef) && "
            "(self.candidate.promptProfileRef.name != self.stable.promptProfileRef.name || "
            "(has(self.candidate.promptProfileRef.revision) ? "
            "self.candidate.promptProfileRef.revision : 0) != "
            "(has(self.stable.promptProfileRef.revision) ? "
            "self.stable.promptProfileRef.revision : 0))) || "
            "has(self.candidate.knowledgeBaseVersion) != "
            "(has(self.stable) && has(self.stable.knowledgeBaseVersion)) || "
            "(has(self.candidate.knowledgeBaseVersion) && "
            "self.candidate.knowledgeBaseVersion != self.stable.knowledgeBaseVersion)",
            message="candidate must differ from stable",
            field="candidate",
            check=lambda m: m.stable != m.candidate,
        ),
        Rule(
            cel="(has(self.mode) && self.mode == 'shadow') || self.steps.all(s, s.weight < 100)",
            message="a canary step's weight must be below 100 (the stable needs traffic to be "
            "compared with; passing the last step promotes the candidate to all of it)",
            field="steps",
            check=lambda m: m.mode == "shadow" or all(s.weight < 100 for s in m.steps),
        ),
        Rule(
            cel="self.steps.map(s, s.weight).isSorted()",
            message="step weights must not decrease",
            field="steps",
            check=lambda m: all(
                a.weight <= b.weight for a, b in zip(m.steps, m.steps[1:], strict=False)
            ),
        ),
        Rule(
            cel="(has(self.mode) && self.mode == 'shadow') || !has(self.analysis) || "
            "(!has(self.analysis.judge) && (!has(self.analysis.metrics) || "
            "!self.analysis.metrics.exists(m, m.name == 'winRate')))",
            message="analysis.judge and winRate are for mode shadow (a canary's users rate "
            "its answers: use satisfaction)",
            field="mode",
            check=lambda m: (
                m.mode == "shadow"
                or (
                    m.analysis.judge is None
                    and all(c.name != "winRate" for c in m.analysis.metrics or [])
                )
            ),
        ),
        Rule(
            cel="!has(self.mode) || self.mode != 'shadow' || !has(self.analysis) || "
            "!has(self.analysis.metrics) || "
            "!self.analysis.metrics.exists(m, m.name == 'satisfaction')",
            message="in shadow mode users never see the candidate's answers, so nobody rates "
            "them: compare with winRate (analysis.judge) instead of satisfaction",
            field="analysis.metrics",
            check=lambda m: (
                m.mode != "shadow"
                or all(c.name != "satisfaction" for c in m.analysis.metrics or [])
            ),
        ),
    )

    def checks(self) -> list[MetricCheck]:
        """The analysis's metrics, or the mode's defaults (see Analysis.metrics)."""
        if self.analysis.metrics:
            return self.analysis.metrics
        if self.mode == "canary":
            return [
                MetricCheck(name="satisfaction", max_worse=0.1),
                MetricCheck(name="errorRate", max_worse=0.05),
            ]
        judged = [MetricCheck(name="winRate", min=0.5)] if self.analysis.judge else []
        return [MetricCheck(name="errorRate", max_worse=0.05), *judged]


class VariantMeasure(TailorModel):
    """One variant's measurements over the current step, summed over the replicas."""

    name: Literal["stable", "candidate"] = Field(description="stable or candidate.")
    adapter: str | None = Field(default=None, description="What it answers with.")
    prompt_profile: str | None = Field(
        default=None, description="Its promptProfileRef (name, @revision when pinned)."
    )
    knowledge_base_version: int | None = Field(
        default=None, description="Its knowledgeBaseVersion."
    )
    requests: int = Field(default=0, description="Requests it answered or failed.")
    errors: int = Field(default=0, description="Requests that failed.")
    rated: int = Field(default=0, description="Answers rated (POST /v1/feedback).")
    rated_up: int = Field(default=0, description="Answers rated up.")
    satisfaction: float | None = Field(default=None, description="ratedUp / rated.")
    error_rate: float | None = Field(default=None, description="errors / requests.")
    p95_latency: float | None = Field(default=None, description="Seconds, 95th percentile.")
    cost_per_query: float | None = Field(default=None, description="Tokens per answer.")
    judged: int = Field(default=0, description="Shadow pairs the judge compared.")
    win_rate: float | None = Field(default=None, description="Share of comparisons won.")


class CheckResult(TailorModel):
    """One metric check of the current step."""

    metric: str = Field(description="The metric.")
    stable: float | None = Field(default=None, description="The stable's value.")
    candidate: float | None = Field(default=None, description="The candidate's value.")
    limit: float | None = Field(default=None, description="The candidate's worst allowed.")
    samples: int = Field(default=0, description="The fewer of the two variants' samples.")
    interval: list[float] | None = Field(
        default=None,
        description="satisfaction, errorRate: [low, high] of candidate - stable; winRate: "
        "of the candidate's win rate; at analysis.confidence (else 95%): Newcombe's "
        "interval of a difference of proportions, Wilson's of one.",
    )
    verdict: Literal["Pass", "Fail", "Inconclusive"] = Field(description="The check's outcome.")


class RolloutStatus(TailorModel):
    """Where the rollout is, the numbers per variant and why."""

    model_config = TailorModel.model_config | {"extra": "ignore"}

    id: str = Field(description="Digest of spec.rollout: a changed rollout starts again.")
    phase: Literal["Progressing", "Holding", "Promoted", "RolledBack", "Aborted"] = Field(
        description="Progressing (in a step), Holding (a step without enough samples), "
        "Promoted, RolledBack (a check failed) or Aborted (tailor rollout abort)."
    )
    step: int = Field(description="The current step (0-based).")
    weight: int = Field(description="The candidate's weight now (percent).")
    step_started: str = Field(description="When the current step began (RFC 3339).")
    message: str = Field(default="", description="Why it is where it is.")
    variants: list[VariantMeasure] = Field(
        default_factory=list, description="Measurements over the current step."
    )
    checks: list[CheckResult] = Field(default_factory=list, description="The step's analysis.")
