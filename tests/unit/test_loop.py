"""The AdaptationLoop's trigger (controllers/adaptationloop.py) and what a rung creates
(builders/adaptationloop.py)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.adaptationloop import AdaptationLoopSpec
from tailor.api.common import ModelSource
from tailor.api.rollout import Variant
from tailor.builders.adaptationloop import rung_evaluation, rung_fine_tune, winner_rollout
from tailor.builders.common import Parent
from tailor.controllers.adaptationloop import trigger_reason

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
BODY = {"metadata": {"creationTimestamp": "2026-12-07T11:00:00Z"}}


def spec(**trigger: Any) -> AdaptationLoopSpec:
    parsed = parse_spec(KINDS["AdaptationLoop"], {
        "deploymentRef": {"name": "md"}, "adapter": "live", "trigger": trigger,
        "evaluation": {"questions": {"configMap": {"name": "frozen", "key": "eval.jsonl"}},
                       "scoring": {"type": "contains"}},
        "gate": {"metric": "accuracy", "min": 0.5},
        "ladder": {"target": {"metric": "accuracy", "min": 0.6},
                   "rungs": [{"name": "kto", "fineTune": {"objective": "kto"}}]},
    })  # fmt: skip
    assert isinstance(parsed, AdaptationLoopSpec)
    return parsed


def test_new_ratings_count_from_the_last_iteration_and_a_restarted_replica_from_zero() -> None:
    loop = spec(newRatings=100)
    status = {"ratingsSeen": {"a": 500, "b": 80}}
    counts = {"a": {"total": 560}, "b": {"total": 30}}  # b restarted: its 30 are all new
    assert trigger_reason(loop, status, [], BODY, counts, NOW) is None  # 60 + 30
    counts["c"] = {"total": 10}  # a new replica
    fired = trigger_reason(loop, status, [], BODY, counts, NOW)
    assert fired == "100 new ratings (trigger.newRatings 100)"


def test_satisfaction_below_its_threshold_over_the_window() -> None:
    loop = spec(satisfactionBelow={"threshold": 0.6, "windowSeconds": 600, "minRatings": 10})
    now = NOW.timestamp()
    old = [[now - 3600, 0]] * 50  # outside the window: never counts
    few = {"a": {"recent": old + [[now - 10, 0]] * 9}}
    assert trigger_reason(loop, {}, [], BODY, few, NOW) is None  # 9 < minRatings
    low = {"a": {"recent": old + [[now - 10, 0]] * 6}, "b": {"recent": [[now - 5, 1]] * 4}}
    assert "satisfaction 0.4 over 10 ratings" in (
        trigger_reason(loop, {}, [], BODY, low, NOW) or ""
    )
    high = {"a": {"recent": [[now - 10, 1]] * 10}}
    assert trigger_reason(loop, {}, [], BODY, high, NOW) is None


def test_a_schedule_counts_from_the_last_iteration_or_the_creation() -> None:
    loop = spec(everySeconds=3600)
    assert trigger_reason(loop, {}, [], BODY, {}, NOW) == "schedule (every 3600 s)"
    recent = [{"number": 1, "started": "2026-12-07T11:30:00Z"}]
    assert trigger_reason(loop, {}, recent, BODY, {}, NOW) is None


def test_a_rung_trains_on_the_feedback_window_continuing_the_champion_gated_against_it() -> None:
    loop = spec(newRatings=10)
    parent = Parent("AdaptationLoop", "improve", "team", "uid-1")
    since = dt.datetime(2026, 12, 7, 11, 0, tzinfo=dt.UTC)
    ftj = rung_fine_tune(loop, parent, 2, loop.ladder.rungs[0],
                         ModelSource(builtin="smollm2-135m-instruct"), "pvc://a/live", since)  # fmt: skip
    assert ftj["metadata"]["name"] == "improve-i2-kto"
    assert ftj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec_ = ftj["spec"]
    feedback = spec_["dataset"]["train"]["feedback"]
    assert feedback["format"] == "kto" and feedback["since"].startswith("2026-12-07T11:00:00")
    assert feedback["excludeQuestions"] == {"name": "frozen", "key": "eval.jsonl"}
    assert spec_["preference"]["reference"] == {"uri": "pvc://a/live"}
    gate = spec_["evaluation"]
    assert gate["deploymentRef"] == {"name": "md"} and gate["baselineAdapter"] == "live"
    assert gate["gate"] == {"metric": "accuracy", "min": 0.5}
    rollout = winner_rollout(loop, Variant(adapter="improve-i2-kto"))
    assert rollout.stable.adapter == "live" and rollout.candidate.adapter == "improve-i2-kto"
    assert rollout.mode == "canary" and [s.weight for s in rollout.steps] == [10, 50]


def test_a_prompt_rung_evaluates_the_champion_under_the_profile_and_rolls_it_out() -> None:
    loop = parse_spec(KINDS["AdaptationLoop"], {
        **spec(newRatings=10).wire(),
        "ladder": {"target": {"metric": "accuracy", "min": 0.5}, "rungs": [
            {"name": "few-shot", "prompt": {"profileRef": {"name": "similar"}}},
            {"name": "kto", "fineTune": {}}]}})  # fmt: skip
    assert isinstance(loop, AdaptationLoopSpec)
    parent = Parent("AdaptationLoop", "improve", "team", "uid-1")
    ev = rung_evaluation(loop, parent, 3, loop.ladder.rungs[0])
    assert ev["kind"] == "Evaluation" and ev["metadata"]["name"] == "improve-i3-few-shot"
    assert ev["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    baseline, candidate = ev["spec"]["candidates"]
    champion = {"deploymentRef": {"name": "md"}, "adapter": "live", "retrieval": True}
    assert baseline == {"name": "baseline", **champion}
    assert candidate == {"name": "candidate", **champion, "promptProfileRef": {"name": "similar"}}
    assert ev["spec"]["baseline"] == "baseline"
    assert ev["spec"]["questions"]["configMap"] == {"name": "frozen", "key": "eval.jsonl"}
    rollout = winner_rollout(loop, Variant(adapter="live", prompt_profile_ref={"name": "similar"}))
    assert rollout.stable.adapter == rollout.candidate.adapter == "live"
    assert rollout.candidate.prompt_profile_ref is not None


def test_a_rung_is_a_prompt_or_a_fine_tune() -> None:
    with pytest.raises(ManifestError) as both:
        parse_spec(KINDS["AdaptationLoop"], {
            **spec(newRatings=10).wire(),
            "ladder": {"target": {"metric": "accuracy", "min": 0.5}, "rungs": [
                {"name": "x", "prompt": {"profileRef": {"name": "p"}}, "fineTune": {}}]}})  # fmt: skip
    assert "exactly one of prompt or fineTune" in str(both.value)
