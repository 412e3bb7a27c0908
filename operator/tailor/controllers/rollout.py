"""A ModelDeployment's rollout (``spec.rollout``), step by step, from the gateway's own
measurements.

Each reconcile of a deployment with a rollout reads its replicas' books (``GET /adapters``,
``rollout``: per variant, over the current step), sums those of the replicas routing by
the current step, checks each metric against the stable's and moves the rollout: a failed
check rolls back at once; a step whose pause is over and whose checks all pass goes on
(after the last: promoted); a step without the samples a check needs holds. The state is
``status.rollout`` (id, step, when the step began): an operator that restarts resumes the
same step, and what the replicas route by is written into the serving ConfigMap (applied
in place, no new pod). ``tailor rollout promote|abort`` set the annotation
``tailor.dev/rollout-action: <action>:<id>``, which names the rollout it was meant for.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from dataclasses import dataclass
from typing import Any

from tailor.api.rollout import RATE_METRICS, MetricCheck, Rollout, Variant
from tailor.api.workloads import Routing
from tailor.builders.common import content_hash

ACTION_ANNOTATION = "tailor.dev/rollout-action"
ACTIONS = ("promote", "abort")
ENDED = ("Promoted", "RolledBack", "Aborted")


def rollout_id(rollout: Rollout) -> str:
    """The rollout's id: a changed spec.rollout is a new rollout, started from step 0."""
    return content_hash(rollout.wire())[:12]


def time_text(now: dt.datetime) -> str:
    """A status time (RFC 3339, seconds, UTC)."""
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """A status time read back."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def routing_key(state: dict[str, Any] | None) -> str | None:
    """What replicas key their books by (the gateway's ``Rollouts.key``)."""
    if not state:
        return None
    return f"{state['id']}:{state['step']}:{state['weight']}"


def routing(
    rollout: Rollout | None,
    state: dict[str, Any] | None,
    profiles: dict[str, dict[str, Any]] | None = None,
) -> Routing | None:
    """What the replicas route by: the step in progress, or the promoted candidate; None
    once rolled back or aborted (the stable answers everything). ``profiles``: the
    rendered profile of each variant that names a promptProfileRef."""
    if rollout is None or not state or state["phase"] in ("RolledBack", "Aborted"):
        return None
    return Routing(
        id=state["id"],
        step=state["step"],
        weight=state["weight"],
        rollout=rollout,
        profiles=profiles or {},
    )


# ------------------------------------------------------------------ measurements
def measure(rollout: Rollout, reports: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """``status.rollout.variants``: the books of the replicas routing by ``key``, summed."""
    totals: dict[str, dict[str, Any]] = {}
    for report in reports:
        book = (report or {}).get("rollout") or {}
        if book.get("key") != key:
            continue  # a replica not yet routing by this step, or one restarted
        for name, counts in (book.get("variants") or {}).items():
            total = totals.setdefault(name, {"latencies": []})
            for field, value in counts.items():
                if field == "latencies":
                    total["latencies"].extend(value)
                else:
                    total[field] = total.get(field, 0) + value
    measures = []
    for name, variant in (("stable", rollout.stable), ("candidate", rollout.candidate)):
        t = totals.get(name) or {"latencies": []}
        requests, answered = t.get("requests", 0), t.get("answered", 0)
        rated, judged = t.get("rated", 0), t.get("judged", 0)
        measures.append(
            {
                "name": name,
                "adapter": variant.adapter,
                "promptProfile": _profile_text(variant),
                "knowledgeBaseVersion": variant.knowledge_base_version,
                "requests": requests,
                "errors": t.get("errors", 0),
                "rated": rated,
                "ratedUp": t.get("ratedUp", 0),
                "satisfaction": _share(t.get("ratedUp", 0), rated),
                "errorRate": _share(t.get("errors", 0), requests),
                "p95Latency": _p95(t["latencies"]),
                "costPerQuery": _share(t.get("tokens", 0), answered),
                "judged": judged,
                "winRate": _share(t.get("won", 0), judged) if name == "candidate" else None,
                "answered": answered,
            }
        )
    return measures


def _profile_text(variant: Variant) -> str | None:
    ref = variant.prompt_profile_ref
    if ref is None:
        return None
    return ref.name if ref.revision is None else f"{ref.name}@{ref.revision}"


def _share(part: float, whole: int) -> float | None:
    return None if not whole else round(part / whole, 4)


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 4)


SAMPLES = {"satisfaction": "rated", "winRate": "judged"}
"""The count each metric's samples are (the rest: answers)."""


def wilson(successes: float, trials: int, z: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion (good with few trials and shares near 0
    or 1, where the normal approximation is not)."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


def difference(a: tuple[float, int], b: tuple[float, int], z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p_a - p_b from (successes, trials) of each."""
    pa, pb = a[0] / a[1], b[0] / b[1]
    (la, ua), (lb, ub) = wilson(*a, z), wilson(*b, z)
    d = pa - pb
    return d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt(
        (ua - pa) ** 2 + (pb - lb) ** 2
    )


COUNTS = {"satisfaction": ("ratedUp", "rated"), "errorRate": ("errors", "requests")}
"""(successes, trials) of the rate metrics' proportions."""


def interval(
    name: str, stable: dict[str, Any], candidate: dict[str, Any], confidence: float
) -> tuple[float, float] | None:
    """The interval ``CheckResult.interval`` reports (None: no samples, or a metric
    without one: p95Latency, costPerQuery)."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    if name == "winRate":
        judged = candidate["judged"]
        return wilson(candidate.get("won") or 0.0, judged, z) if judged else None
    if name not in COUNTS:
        return None
    hits, trials = COUNTS[name]
    if not stable[trials] or not candidate[trials]:
        return None
    return difference((candidate[hits], candidate[trials]), (stable[hits], stable[trials]), z)


def check(
    metric: MetricCheck,
    stable: dict[str, Any],
    candidate: dict[str, Any],
    confidence: float | None = None,
) -> dict[str, Any]:
    """One ``status.rollout.checks`` item: the candidate's value against its limit, and
    its interval; with ``confidence`` (analysis.confidence) a rate fails only when its
    whole interval is past the limit."""
    name = metric.name
    samples_of = SAMPLES.get(
        name, "answered" if name in ("p95Latency", "costPerQuery") else "requests"
    )
    if name == "winRate":
        samples = candidate["judged"]
        value, base, limit = candidate["winRate"], None, metric.min
        worse = value is not None and limit is not None and value < limit
    else:
        samples = min(stable[samples_of], candidate[samples_of])
        value, base = candidate[name], stable[name]
        assert metric.max_worse is not None
        if base is None:
            limit = None
        elif name == "satisfaction":
            limit = round(base - metric.max_worse, 4)
        elif name in RATE_METRICS:
            limit = round(base + metric.max_worse, 4)
        else:
            limit = round(base * (1 + metric.max_worse), 4)
        if value is None or limit is None:
            worse = False
        else:
            worse = value < limit if name == "satisfaction" else value > limit
    spread = interval(name, stable, candidate, confidence or 0.95)
    if samples < metric.min_samples or value is None or limit is None:
        verdict = "Inconclusive"
    elif worse and confidence is not None and spread is not None:
        # worse for sure: the interval's most favourable end is still past the limit
        if name == "winRate":
            sure = spread[1] < (metric.min or 0.0)
        elif name == "satisfaction":
            sure = spread[1] < -(metric.max_worse or 0.0)
        else:
            sure = spread[0] > (metric.max_worse or 0.0)
        verdict = "Fail" if sure else "Inconclusive"
    else:
        verdict = "Fail" if worse else "Pass"
    return {
        "metric": name,
        "stable": base,
        "candidate": value,
        "limit": limit,
        "samples": samples,
        "interval": [round(spread[0], 4), round(spread[1], 4)] if spread else None,
        "verdict": verdict,
    }


# ------------------------------------------------------------------ the state machine
@dataclass
class Transition:
    """What changed in a reconcile, for an Event."""

    reason: str
    message: str
    warning: bool = False


def start(rollout: Rollout, now: dt.datetime) -> dict[str, Any]:
    """``status.rollout`` of a rollout just begun: its first step."""
    first = rollout.steps[0]
    return {
        "id": rollout_id(rollout),
        "phase": "Progressing",
        "step": 0,
        "weight": first.weight,
        "stepStarted": time_text(now),
        "message": f"step 1/{len(rollout.steps)}: weight {first.weight}%",
        "variants": [],
        "checks": [],
    }


def advance(
    rollout: Rollout,
    state: dict[str, Any],
    measures: list[dict[str, Any]],
    now: dt.datetime,
    action: str | None = None,
) -> tuple[dict[str, Any], Transition | None]:
    """The next ``status.rollout`` from this one and the step's measurements, and what
    changed (None: nothing worth an Event)."""
    if state["phase"] in ENDED:  # kept as decided: its numbers are why it ended
        return state, None
    new = {**state, "variants": [_public(m) for m in measures]}
    total = len(rollout.steps)
    if action == "abort":
        return _ended(new, "Aborted", 0, "aborted by tailor rollout abort: the stable "
                      "answers everything", now), Transition("RolloutAborted", "aborted by "
                                                             "a person", True)  # fmt: skip
    if action == "promote":
        done = _ended(new, "Promoted", 100, "promoted by tailor rollout promote: the "
                      "candidate answers all of the stable's traffic", now, step=total)  # fmt: skip
        return done, Transition("RolloutPromoted", "promoted by a person")
    stable, candidate = measures[0], measures[1]
    confidence = rollout.analysis.confidence
    checks = [check(m, stable, candidate, confidence) for m in rollout.checks()]
    new["checks"] = checks
    failed = [c for c in checks if c["verdict"] == "Fail"]
    if failed:
        why = "; ".join(_line(c) for c in failed)
        message = f"rolled back at step {state['step'] + 1}/{total}: {why}"
        return _ended(new, "RolledBack", 0, message, now), Transition(
            "RolloutRolledBack", message, True
        )
    step = rollout.steps[state["step"]]
    waited = (now - parse_time(state["stepStarted"])).total_seconds()
    waiting = [c for c in checks if c["verdict"] == "Inconclusive"]
    if waited < step.pause_seconds:
        new["phase"] = "Progressing"
        new["message"] = (
            f"step {state['step'] + 1}/{total}: weight {state['weight']}%, "
            f"{int(step.pause_seconds - waited)} s of its pause left"
        )
        return new, None
    if waiting:
        lacking = ", ".join(_undecided(rollout, c) for c in waiting)
        message = (
            f"holding at step {state['step'] + 1}/{total} (weight {state['weight']}%): {lacking}"
        )
        moved = state["phase"] != "Holding"
        new.update(phase="Holding", message=message)
        return new, Transition("RolloutHolding", message) if moved else None
    passed = "; ".join(_line(c) for c in checks)
    if state["step"] + 1 >= total:
        message = f"promoted after {total} steps: {passed}"
        return _ended(new, "Promoted", 100, message, now, step=total), Transition(
            "RolloutPromoted", message
        )
    following = rollout.steps[state["step"] + 1]
    message = f"step {state['step'] + 2}/{total}: weight {following.weight}% (step {state['step'] + 1} passed: {passed})"
    new.update(
        phase="Progressing",
        step=state["step"] + 1,
        weight=following.weight,
        stepStarted=time_text(now),
        message=message,
        checks=[],
        variants=[],
    )
    return new, Transition("RolloutStep", message)


def _undecided(rollout: Rollout, result: dict[str, Any]) -> str:
    """Why a check is inconclusive: its samples, or an interval across its limit."""
    needed = _needed(rollout, result["metric"])
    if result["samples"] < needed or result["interval"] is None:
        return f"{result['metric']} {result['samples']}/{needed} samples"
    low, high = result["interval"]
    return (
        f"{result['metric']} {result['candidate']} past its limit {result['limit']}, but not "
        f"surely: interval [{low}, {high}] at confidence {rollout.analysis.confidence}"
    )


def _ended(
    state: dict[str, Any],
    phase: str,
    weight: int,
    message: str,
    now: dt.datetime,
    step: int | None = None,
) -> dict[str, Any]:
    return {
        **state,
        "phase": phase,
        "weight": weight,
        "message": message,
        "step": state["step"] if step is None else step,
        "stepStarted": time_text(now),
    }


def _public(measure: dict[str, Any]) -> dict[str, Any]:
    """A measure as ``status.rollout.variants`` shows it (unset values left out)."""
    return {k: v for k, v in measure.items() if v is not None and k != "answered"}


def _needed(rollout: Rollout, metric: str) -> int:
    return next(m.min_samples for m in rollout.checks() if m.name == metric)


def _line(result: dict[str, Any]) -> str:
    if result["metric"] == "winRate":
        return f"winRate {result['candidate']} (least {result['limit']})"
    return (
        f"{result['metric']} {result['candidate']} vs stable {result['stable']} "
        f"(limit {result['limit']})"
    )


def requested_action(meta: dict[str, Any], state: dict[str, Any] | None) -> str | None:
    """The person's action for this rollout (the annotation names its id), if any."""
    value = ((meta.get("annotations") or {}).get(ACTION_ANNOTATION) or "").strip()
    action, _, target = value.partition(":")
    if not state or action not in ACTIONS or target != state["id"]:
        return None
    return action
