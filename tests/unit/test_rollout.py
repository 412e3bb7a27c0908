"""The rollout's analysis and step machine (controllers/rollout.py), the gateway's
assignment of sessions (workloads/serving/rollout.py) and the rollout's API rules."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import pytest

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.rollout import Rollout
from tailor.api.workloads import Routing
from tailor.controllers import rollout as machine
from tailor.observability.serving import ServingMetrics
from tailor.workloads.serving.auth import ANONYMOUS, Caller
from tailor.workloads.serving.rollout import Rollouts

T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


def spec(**rollout: Any) -> ModelDeploymentSpec:
    body = {
        "baseModel": {"builtin": "smollm2-135m-instruct"},
        "adapters": [{"name": n, "pvc": {"claimName": "c", "path": n}} for n in ("v1", "v2")],
        "rollout": {"stable": {"adapter": "v1"}, "candidate": {"adapter": "v2"},
                    "steps": [{"weight": 10, "pauseSeconds": 60},
                              {"weight": 50, "pauseSeconds": 60}], **rollout},
    }  # fmt: skip
    parsed = parse_spec(KINDS["ModelDeployment"], body)
    assert isinstance(parsed, ModelDeploymentSpec)
    return parsed


def book(
    rated: int = 0, up: int = 0, requests: int = 0, errors: int = 0, **more: Any
) -> dict[str, Any]:
    answered = requests - errors
    return {"requests": requests, "errors": errors, "rated": rated, "ratedUp": up,
            "answered": answered, "tokens": 10 * answered,
            "latencies": more.get("latencies", [0.5] * answered), "judged": 0, "won": 0}  # fmt: skip


def report(key: str, stable: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    return {"rollout": {"key": key, "variants": {"stable": stable, "candidate": candidate}}}


def at(state: dict[str, Any], seconds: float, *reports: dict[str, Any], action: str | None = None,
       rollout: Rollout | None = None) -> tuple[dict[str, Any], Any]:  # fmt: skip
    rollout = rollout or spec().rollout
    assert rollout is not None
    key = machine.routing_key(state)
    assert key is not None
    measures = machine.measure(rollout, list(reports), key)
    return machine.advance(rollout, state, measures, T0 + dt.timedelta(seconds=seconds), action)


def test_a_rollout_walks_its_steps_holds_without_samples_and_promotes() -> None:
    rollout = spec().rollout
    assert rollout is not None
    state = machine.start(rollout, T0)
    assert (state["step"], state["weight"], state["phase"]) == (0, 10, "Progressing")
    good = report("{}:0:10".format(state["id"]), book(40, 30, 40), book(20, 15, 20))
    # within the pause: good numbers do not pass a step early
    waiting, moved = at(state, 30, good)
    assert waiting["phase"] == "Progressing" and waiting["step"] == 0 and moved is None
    # past the pause, a metric without its samples: the step holds (never a failure)
    few = report("{}:0:10".format(state["id"]), book(40, 30, 40), book(5, 0, 5))
    held, moved = at(state, 61, few)
    assert held["phase"] == "Holding" and held["step"] == 0
    assert "satisfaction 5/20 samples" in held["message"] and moved.reason == "RolloutHolding"
    again, moved = at(held, 90, few)
    assert again["phase"] == "Holding" and moved is None  # one Event per transition
    # samples in: the step passes, the next begins with fresh books
    nxt, moved = at(held, 120, good)
    assert (nxt["step"], nxt["weight"], nxt["phase"]) == (1, 50, "Progressing")
    assert nxt["stepStarted"] == machine.time_text(T0 + dt.timedelta(seconds=120))
    assert moved.reason == "RolloutStep"
    # books of the old step (a replica not yet moved) do not count for the new one
    stale, _ = at(nxt, 181, good)
    assert stale["phase"] == "Holding"
    done, moved = at(
        nxt, 181, report("{}:1:50".format(state["id"]), book(40, 30, 40), book(40, 29, 40))
    )
    assert (done["phase"], done["weight"], done["step"]) == ("Promoted", 100, 2)
    assert moved.reason == "RolloutPromoted"
    routing = machine.routing(rollout, done)
    assert routing is not None and routing.weight == 100


def test_a_worse_candidate_is_rolled_back_within_one_analysis() -> None:
    rollout = spec().rollout
    assert rollout is not None
    state = machine.start(rollout, T0)
    key = "{}:0:10".format(state["id"])
    # 0.75 up for stable, 0.55 for the candidate: more than 0.1 worse, mid-pause
    worse, moved = at(state, 15, report(key, book(20, 15, 20), book(20, 11, 20)))
    assert worse["phase"] == "RolledBack" and worse["weight"] == 0 and moved.warning
    assert "satisfaction 0.55 vs stable 0.75 (limit 0.65)" in worse["message"]
    assert machine.routing(rollout, worse) is None  # the stable answers everything
    # within the limit: no failure
    ok, _ = at(state, 15, report(key, book(20, 15, 20), book(20, 13, 20)))
    assert ok["phase"] == "Progressing"
    # an ended rollout stays ended
    still, moved = at(worse, 500, report(key, book(20, 20, 20), book(20, 20, 20)))
    assert still["phase"] == "RolledBack" and moved is None


def test_checks_carry_an_interval_and_with_a_confidence_fail_only_when_surely_worse() -> None:
    rollout = spec().rollout
    assert rollout is not None
    (satisfaction, _) = rollout.checks()
    stable, candidate = machine.measure(
        rollout, [report("k", book(20, 15, 20), book(20, 11, 20))], "k"
    )
    # 0.55 vs 0.75 with 20 ratings each: past the limit (0.65) by the point estimate ...
    quick = machine.check(satisfaction, stable, candidate)
    assert quick["verdict"] == "Fail"
    low, high = quick["interval"]  # Newcombe's 95% interval of 0.55 - 0.75
    assert -0.5 < low < -0.2 < 0.0 < high < 0.15
    # ... but not surely: with a confidence the check is undecided (the step holds)
    assert machine.check(satisfaction, stable, candidate, 0.95)["verdict"] == "Inconclusive"
    # ten times the ratings, the same shares: surely more than 0.1 worse
    many = machine.measure(rollout, [report("k", book(200, 150, 200), book(200, 90, 200))], "k")
    sure = machine.check(satisfaction, *many, 0.95)
    assert sure["verdict"] == "Fail" and sure["interval"][1] < -0.1
    # held, saying why
    confident = spec(analysis={"confidence": 0.95}).rollout
    assert confident is not None
    state = machine.start(confident, T0)
    key = "{}:0:10".format(state["id"])
    held, _ = at(state, 61, report(key, book(20, 15, 20), book(20, 11, 20)), rollout=confident)
    assert held["phase"] == "Holding" and "not surely: interval [" in held["message"]


def test_the_status_and_the_cli_say_what_each_variant_answers_with() -> None:
    from tailor.cli.rollout import table

    rollout = Rollout.model_validate({
        "stable": {"adapter": "v1"}, "steps": [{"weight": 10}],
        "candidate": {"adapter": "v1", "promptProfileRef": {"name": "p", "revision": 2},
                      "knowledgeBaseVersion": 3}})  # fmt: skip
    stable, candidate = machine.measure(rollout, [report("k", book(4, 3, 4), book(4, 1, 4))], "k")
    assert (candidate["promptProfile"], candidate["knowledgeBaseVersion"]) == ("p@2", 3)
    assert stable["promptProfile"] is None
    state, _ = machine.advance(rollout, machine.start(rollout, T0), [stable, candidate], T0)
    shown = table({"metadata": {"name": "md"}, "spec": {"rollout": rollout.wire()},
                   "status": {"rollout": state}})  # fmt: skip
    assert "v1 pp:p@2 kb:v3" in shown and "interval [" in shown


def test_replicas_are_summed_and_latency_and_cost_are_relative() -> None:
    rollout = spec(analysis={"metrics": [
        {"name": "p95Latency", "maxWorse": 0.5, "minSamples": 10},
        {"name": "costPerQuery", "maxWorse": 0.5, "minSamples": 10},
        {"name": "errorRate", "maxWorse": 0.05, "minSamples": 10},
    ]}).rollout  # fmt: skip
    assert rollout is not None
    state = machine.start(rollout, T0)
    key = "{}:0:10".format(state["id"])
    one = report(key, book(requests=10), book(requests=5, latencies=[1.0] * 5))
    two = report(key, book(requests=10), book(requests=6, errors=1, latencies=[0.6] * 5))
    other = report("old:0:10", book(requests=1000), book(requests=1000, errors=1000))
    measures = machine.measure(rollout, [one, two, other], key)
    stable, candidate = measures
    assert stable["requests"] == 20 and candidate["requests"] == 11 and candidate["errors"] == 1
    assert candidate["p95Latency"] == 1.0 and stable["p95Latency"] == 0.5
    checks = {c["metric"]: c for c in
              (machine.check(m, stable, candidate) for m in rollout.checks())}  # fmt: skip
    assert checks["p95Latency"]["limit"] == 0.75 and checks["p95Latency"]["verdict"] == "Fail"
    assert checks["costPerQuery"]["verdict"] == "Pass"  # 10 tokens each
    assert checks["errorRate"]["candidate"] == round(1 / 11, 4)
    assert checks["errorRate"]["verdict"] == "Fail"  # 0.09 > 0 + 0.05


def test_a_person_promotes_or_aborts_the_rollout_the_annotation_names() -> None:
    rollout = spec().rollout
    assert rollout is not None
    state = machine.start(rollout, T0)
    meta = {"annotations": {machine.ACTION_ANNOTATION: f"abort:{state['id']}"}}
    assert machine.requested_action(meta, state) == "abort"
    stale = {"annotations": {machine.ACTION_ANNOTATION: "abort:another-rollout"}}
    assert machine.requested_action(stale, state) is None
    aborted, _moved = at(state, 1, action="abort")
    assert aborted["phase"] == "Aborted" and machine.routing(rollout, aborted) is None
    promoted, _ = at(state, 1, action="promote")
    assert promoted["phase"] == "Promoted" and promoted["weight"] == 100
    # a changed rollout is a new one: its id changes
    assert machine.rollout_id(spec(mode="shadow").rollout) != state["id"]  # type: ignore[arg-type]


def test_sessions_stick_and_a_rising_weight_only_moves_them_to_the_candidate() -> None:
    rollout = spec().rollout
    assert rollout is not None
    router = Rollouts(ServingMetrics("t"))
    placed: dict[int, list[str]] = {}
    for weight in (10, 50, 100):
        router.apply(Routing(id="r", step=0, weight=weight, rollout=rollout))
        for user in range(400):
            session = router.session({"X-Session-Id": f"u{user}"}, None, ANONYMOUS)
            adapter, route = router.assign("v1", session, ["v1", "v2"])
            assert (
                route is not None and adapter == {"stable": "v1", "candidate": "v2"}[route.variant]
            )
            placed.setdefault(user, []).append(route.variant)
    shares = [Counter(p[i] for p in placed.values())["candidate"] / 400 for i in range(3)]
    assert 0.05 < shares[0] < 0.15 and 0.42 < shares[1] < 0.58 and shares[2] == 1
    for path in placed.values():  # once on the candidate, never back
        assert path == sorted(path, key=["stable", "candidate"].index)
    # not the stable's model, or a replica without the candidate yet: not the rollout's
    assert router.assign(None, "s", ["v1", "v2"]) == (None, None)
    assert router.assign("v1", "s", ["v1"]) == ("v1", None)
    # the session falls back to the user field, then the API key
    assert router.session({}, "alice", Caller("k1")) == "session:alice"
    assert router.session({}, None, Caller("k1")) == "key:k1"
    assert router.session({}, None, ANONYMOUS).startswith("random:")


@pytest.mark.parametrize(
    ("rollout", "field"),
    [
        ({"candidate": {"adapter": "v1"}}, "spec.rollout.candidate"),
        ({"candidate": {"adapter": "v9"}}, "spec.rollout.candidate.adapter"),
        ({"steps": [{"weight": 50}, {"weight": 10}]}, "spec.rollout.steps"),
        ({"analysis": {"metrics": [{"name": "winRate", "min": 0.5}]}}, "spec.rollout.analysis"),
        (
            {
                "mode": "shadow",
                "analysis": {"metrics": [{"name": "satisfaction", "maxWorse": 0.1}]},
            },
            "spec.rollout",
        ),
        (
            {"analysis": {"metrics": [{"name": "errorRate", "min": 0.5}]}},
            "spec.rollout.analysis.metrics[0]",
        ),
    ],
)
def test_rollout_rules_name_the_field(rollout: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as error:
        spec(**rollout)
    assert any(line.startswith(field) for line in error.value.lines), error.value.lines


def test_an_index_version_the_knowledge_base_does_not_keep_holds_the_rollout() -> None:
    from tailor.builders.modeldeployment import ResolvedRefs
    from tailor.controllers.modeldeployment import _rollout_blocked

    body = {**spec().wire(), "knowledgeBaseRef": {"name": "docs"}}
    body["rollout"]["candidate"] = {"adapter": "v2", "knowledgeBaseVersion": 1}
    deployment = parse_spec(KINDS["ModelDeployment"], body)
    assert isinstance(deployment, ModelDeploymentSpec)
    refs = ResolvedRefs(knowledge_base_kept=(3, 4))  # serving v4, keeping v3
    # no profile is named: the operator is not asked for anything
    _, blocked = _rollout_blocked(None, deployment, refs, "team")  # type: ignore[arg-type]
    assert blocked is not None and blocked[0] == "KnowledgeBaseVersionNotFound"
    assert blocked[1].startswith("spec.rollout.candidate.knowledgeBaseVersion: the ")
    assert "keeps versions 3 to 4" in blocked[1]
    refs.knowledge_base_kept = (1, 2)
    assert _rollout_blocked(None, deployment, refs, "team") == ({}, None)  # type: ignore[arg-type]
