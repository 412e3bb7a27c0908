"""AdaptationLoop controller: wait for the trigger, climb the ladder, roll the winner out.

One reconcile moves the current iteration (the last of ``status.iterations`` not Done) as
far as it can; everything it needs is in the status, so an operator that restarts goes on
where it was, and each child has a fixed name (``<loop>-i<n>-<rung>``): a child already
there is never created twice.

1. **Waiting**: the trigger is read from the deployment's replicas (``GET /adapters``:
   ratings counted since each replica started, the latest with their times) and the time
   of the last iteration. When it fires, an iteration begins (Training).
2. **Training**, rung by rung (the first once the deployment's capture has published the
   ratings that fired the trigger: ``spec.feedback.rotate.maxSeconds`` after it). A prompt
   rung is one Evaluation (``<loop>-i<n>-<rung>``: the champion adapter under the rung's
   PromptProfile against it as served), decided by the loop's gate. A fine-tune rung's
   FineTuneJob (feedback, champion continued, gate against the champion) is applied; once
   trained, its adapter is added to the deployment's ``spec.adapters`` (served to the
   gate's Evaluation only until it passes). A rung whose
   job fails (FeedbackTooSmall, ...) or whose gate fails is recorded and its adapter entry
   removed; the artifact stays (lineage). The first passing rung that meets
   ``ladder.target`` wins; else, after the last rung, the best passing one.
3. **RollingOut** (promotion Auto): the deployment's ``spec.rollout`` is set to a canary of
   the winner against the adapter users call. Promoted: that adapter is repointed at the
   winner's FineTuneJob in place (a prompt winner: the deployment's ``promptProfileRef``
   becomes its profile) and the rollout removed; rolled back or aborted: the
   winner's entry and the rollout are removed. With promotion Recommend the iteration ends
   with the recommendation in its status.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.adaptationloop import AdaptationLoopSpec, Rung
from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.promptprofile import ProfileRevisionRef
from tailor.api.rollout import Variant
from tailor.builders.adaptationloop import (
    rung_evaluation,
    rung_fine_tune,
    rung_name,
    served_by,
    winner_rollout,
)
from tailor.builders.common import Parent
from tailor.controllers import rollout as rollouts
from tailor.controllers.children import is_owned_by
from tailor.controllers.context import Operator, condition, condition_of, syncer
from tailor.controllers.gate import verdict
from tailor.controllers.modeldeployment import resolve

KIND = "AdaptationLoop"
POLL_SECONDS = 5.0
"""How often a loop in an iteration looks at its children."""
WAIT_SECONDS = 15.0
"""How often a waiting loop reads its trigger."""
KEPT_ITERATIONS = 20


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@syncer(KIND)
def sync_adaptation_loop(op: Operator, body: dict[str, Any]) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
    except ManifestError as error:
        message = "; ".join(error.lines)
        op.patch_status(
            body,
            {
                "phase": "Failed",
                "observedGeneration": generation,
                "conditions": condition(
                    status.get("conditions"), "Ready", False, "InvalidSpec", message
                ),
            },
        )
        return
    assert isinstance(spec, AdaptationLoopSpec)
    parent = Parent.from_body(body)
    iterations = [dict(i) for i in status.get("iterations") or []]
    current = iterations[-1] if iterations and iterations[-1]["phase"] != "Done" else None
    md = op.get("ModelDeployment", parent.namespace, spec.deployment_ref.name)
    new: dict[str, Any] = {"observedGeneration": generation}
    if md is None:
        message = (
            f"spec.deploymentRef.name: ModelDeployment {spec.deployment_ref.name} does "
            f"not exist in {parent.namespace}"
        )
        new.update(
            phase="Waiting",
            conditions=condition(
                status.get("conditions"), "Ready", False, "DeploymentNotFound", message, generation
            ),
        )
    elif current is None:
        new.update(_between(op, body, spec, status, iterations, md))
    else:
        loop = Loop(op, body, spec, parent, status, md)
        iterations[-1] = loop.advance(current)
        new.update(loop.changes, iterations=iterations[-KEPT_ITERATIONS:])
        new["phase"] = {"Training": "Training", "RollingOut": "RollingOut"}.get(
            iterations[-1]["phase"], "Waiting"
        )
    op.patch_status(body, new)
    if new.get("phase") in ("Training", "RollingOut"):
        op.queue.add_after((KIND, parent.namespace, parent.name), POLL_SECONDS)
    elif new.get("phase") == "Waiting":
        op.queue.add_after((KIND, parent.namespace, parent.name), WAIT_SECONDS)


def _between(
    op: Operator,
    body: dict[str, Any],
    spec: AdaptationLoopSpec,
    status: dict[str, Any],
    iterations: list[dict[str, Any]],
    md: dict[str, Any],
) -> dict[str, Any]:
    """No iteration running: suspended, finished, waiting, or a new iteration begun."""
    conditions = status.get("conditions")
    generation = body["metadata"].get("generation")
    if spec.suspend:
        return {
            "phase": "Suspended",
            "conditions": condition(
                conditions, "Ready", True, "Suspended", "spec.suspend: no new iteration", generation
            ),
        }
    if len(iterations) >= spec.max_iterations or (
        iterations and iterations[-1]["number"] >= spec.max_iterations
    ):
        return {
            "phase": "Finished",
            "conditions": condition(
                conditions,
                "Ready",
                True,
                "Finished",
                f"{spec.max_iterations} iterations done",
                generation,
            ),
        }
    ns, name = md["metadata"]["namespace"], md["metadata"]["name"]
    counts = {
        r.replica: (r.report.get("ratings") or {})
        for r in op.runtime.replica_reports(ns, name)
        if r.report is not None
    }
    fired = trigger_reason(spec, status, iterations, body, counts, _now())
    if fired is None:
        return {
            "phase": "Waiting",
            "conditions": condition(
                conditions, "Ready", True, "Waiting", "waiting for the trigger", generation
            ),
        }
    number = (iterations[-1]["number"] + 1) if iterations else 1
    iteration: dict[str, Any] = {
        "number": number,
        "trigger": fired,
        "started": rollouts.time_text(_now()),
        "phase": "Training",
        "champion": status.get("champion"),
        "rungs": [],
        "outcome": "",
    }
    op.event(body, "Normal", "IterationStarted", f"iteration {number}: {fired}")
    seen = {replica: int(c.get("total") or 0) for replica, c in counts.items()}
    return {
        "phase": "Training",
        "ratingsSeen": seen,
        "iterations": (iterations + [iteration])[-KEPT_ITERATIONS:],
        "conditions": condition(
            conditions, "Ready", True, "Iterating", f"iteration {number}: {fired}", generation
        ),
    }


def trigger_reason(
    spec: AdaptationLoopSpec,
    status: dict[str, Any],
    iterations: list[dict[str, Any]],
    body: dict[str, Any],
    counts: dict[str, dict[str, Any]],
    now: dt.datetime,
) -> str | None:
    """Why an iteration starts now (None: it does not). ``counts``: by replica, the
    ``ratings`` its report gave (total since it started, the latest with their times)."""
    trigger = spec.trigger
    if trigger.new_ratings is not None:
        seen = status.get("ratingsSeen") or {}
        # a replica that restarted (fewer than seen) or is new counts from zero
        new = sum(
            int(c.get("total") or 0)
            - (seen.get(r, 0) if int(c.get("total") or 0) >= seen.get(r, 0) else 0)
            for r, c in counts.items()
        )
        if new >= trigger.new_ratings:
            return f"{new} new ratings (trigger.newRatings {trigger.new_ratings})"
    low = trigger.satisfaction_below
    if low is not None:
        since = now.timestamp() - low.window_seconds
        recent = [up for c in counts.values() for t, up in c.get("recent") or [] if t >= since]
        if len(recent) >= low.min_ratings and sum(recent) / len(recent) < low.threshold:
            share = round(sum(recent) / len(recent), 3)
            return (
                f"satisfaction {share} over {len(recent)} ratings in "
                f"{low.window_seconds} s, below {low.threshold}"
            )
    if trigger.every_seconds is not None:
        last = iterations[-1]["started"] if iterations else body["metadata"]["creationTimestamp"]
        if (now - rollouts.parse_time(last)).total_seconds() >= trigger.every_seconds:
            return f"schedule (every {trigger.every_seconds} s)"
    return None


class Loop:
    """One reconcile of an iteration in progress: ``advance`` moves it, ``changes`` holds
    the loop's other status fields that moved (the champion)."""

    def __init__(
        self,
        op: Operator,
        body: dict[str, Any],
        spec: AdaptationLoopSpec,
        parent: Parent,
        status: dict[str, Any],
        md: dict[str, Any],
    ):
        self.op, self.body, self.spec, self.parent, self.md = op, body, spec, parent, md
        self.status = status
        self.changes: dict[str, Any] = {}

    def advance(self, it: dict[str, Any]) -> dict[str, Any]:
        it = {**it, "rungs": [dict(r) for r in it.get("rungs") or []]}
        if it["phase"] == "Training":
            self._train(it)
        if it["phase"] == "RollingOut":
            self._roll_out(it)
        return it

    # -- Training
    def _train(self, it: dict[str, Any]) -> None:
        rungs = self.spec.ladder.rungs
        results = it["rungs"]
        if results and results[-1]["phase"] in ("Training", "Gating"):
            self._follow(it, results[-1])
            if results[-1]["phase"] in ("Training", "Gating"):
                return
        last = results[-1] if results else None
        if last and last["phase"] == "Passed" and self._meets_target(last):
            self._won(it, last, target_met=True)
        elif not results and self._publishing(it):
            return  # the ratings that fired the trigger are not all published yet
        elif len(results) < len(rungs):
            self._start_rung(it, rungs[len(results)])
        elif passed := [r for r in results if r["phase"] == "Passed"]:
            self._won(it, max(passed, key=lambda r: r.get("candidate") or 0.0), target_met=False)
        else:
            why = "; ".join(f"{r['rung']}: {r['message']}" for r in results)
            self._seconds(it, "training")
            self._done(it, None, f"no rung passed its gate ({why}); no rollout")

    def _publishing(self, it: dict[str, Any]) -> bool:
        """Whether the iteration is younger than the deployment's capture rotation
        (spec.feedback.rotate.maxSeconds): an open segment is published at most that long
        after it opened, and the ratings that fired the trigger belong in the dataset."""
        md_spec = ModelDeploymentSpec.model_validate(self.md["spec"])
        if md_spec.feedback is None:
            return False
        age = (_now() - rollouts.parse_time(it["started"])).total_seconds()
        return age < md_spec.feedback.rotate.max_seconds

    def _meets_target(self, result: dict[str, Any]) -> bool:
        value = result.get("candidate")
        return value is not None and value >= self.spec.ladder.target.min

    def _start_rung(self, it: dict[str, Any], rung: Rung) -> None:
        name = rung_name(self.parent, it["number"], rung)
        ns = self.parent.namespace
        kind = "Evaluation" if rung.prompt else "FineTuneJob"
        child = {"evaluation": name} if rung.prompt else {"fineTuneJob": name}
        existing = self.op.get(kind, ns, name)
        if it.get("phaseStarted") is None:
            it["phaseStarted"] = rollouts.time_text(_now())
        if existing is not None and not is_owned_by(existing, self.parent.uid):
            it["rungs"].append(
                {
                    "rung": rung.name,
                    **child,
                    "phase": "Failed",
                    "message": f"{kind} {name} exists and was not created by "
                    "this loop: rename or delete it",
                }
            )
            return
        if rung.prompt is not None:
            if existing is None:
                self.op.runtime.apply(rung_evaluation(self.spec, self.parent, it["number"], rung))
            profile = rung.prompt.profile_ref.name
            it["rungs"].append(
                {
                    "rung": rung.name,
                    **child,
                    "promptProfile": profile,
                    "phase": "Gating",
                    "message": f"Evaluation {name}: {self.spec.adapter} under PromptProfile "
                    f"{profile} against the champion",
                }
            )
            return
        md_spec = ModelDeploymentSpec.model_validate(self.md["spec"])
        if existing is None:
            self.op.runtime.apply(
                rung_fine_tune(
                    self.spec,
                    self.parent,
                    it["number"],
                    rung,
                    md_spec.base_model,
                    self._champion_uri(md_spec),
                    self._previous_start(it),
                )
            )
        it["rungs"].append(
            {
                "rung": rung.name,
                "fineTuneJob": name,
                "adapter": name,
                "phase": "Training",
                "message": "training on feedback",
            }
        )

    def _previous_start(self, it: dict[str, Any]) -> dt.datetime | None:
        """When the iteration before ``it`` began (its feedback window's start)."""
        earlier = [i for i in self.status.get("iterations") or [] if i["number"] < it["number"]]
        return rollouts.parse_time(earlier[-1]["started"]) if earlier else None

    def _champion_uri(self, md_spec: ModelDeploymentSpec) -> str | None:
        """The artifact of the adapter users call (what a rung continues)."""
        refs, _ = resolve(self.op, md_spec, self.parent.namespace)
        return dict(refs.adapters).get(self.spec.adapter)

    def _follow(self, it: dict[str, Any], result: dict[str, Any]) -> None:
        """A rung's FineTuneJob and gate, read into its result."""
        if result.get("promptProfile"):
            self._follow_prompt(result)
            return
        ftj = self.op.get("FineTuneJob", self.parent.namespace, result["fineTuneJob"]) or {}
        status = ftj.get("status") or {}
        train = (status.get("feedback") or {}).get("train") or {}
        if train.get("records") is not None and it.get("records") is None:
            it["records"], it["datasetHash"] = train["records"], train.get("sha256")
        if status.get("phase") == "Failed":
            ready = condition_of(status, "Ready")
            result.update(
                phase="Failed",
                message=f"training failed: {ready.get('reason')}: "
                f"{str(ready.get('message') or '')[:300]}",
            )
            self._drop_adapter(result["adapter"])
            return
        if status.get("phase") != "Succeeded":
            return
        name = result["adapter"]  # trained: served beside the champion (to its gate only)
        self._set_adapters(
            lambda adapters: (
                adapters
                if any(a["name"] == name for a in adapters)
                else [*adapters, served_by(result["fineTuneJob"], name)]
            )
        )
        gate = status.get("evaluation") or {}
        result["evaluation"] = gate.get("evaluation")
        result["candidate"], result["champion"] = gate.get("candidate"), gate.get("baseline")
        if gate.get("phase") in ("Passed", "Failed"):
            result.update(phase=gate["phase"], message=gate.get("message") or "")
            if gate["phase"] == "Failed":
                self._drop_adapter(result["adapter"])  # kept as an artifact, not served
        else:
            result.update(phase="Gating", message=gate.get("message") or "evaluating")

    def _follow_prompt(self, result: dict[str, Any]) -> None:
        """A prompt rung's Evaluation, decided by the loop's gate."""
        ev = self.op.get("Evaluation", self.parent.namespace, result["evaluation"]) or {}
        status = ev.get("status") or {}
        if status.get("phase") == "Failed":
            ready = condition_of(status, "Ready")
            result.update(phase="Failed", message=f"its Evaluation failed: {ready.get('message')}")
        elif status.get("phase") == "Succeeded":
            found = {c["name"]: c for c in status.get("candidates") or []}
            decided = verdict(
                self.spec.gate, found.get("candidate") or {}, found.get("baseline") or {}
            )
            result.update(
                phase=decided["phase"],
                message=decided["message"],
                candidate=decided.get("candidate"),
                champion=decided.get("baseline"),
            )

    def _won(self, it: dict[str, Any], result: dict[str, Any], target_met: bool) -> None:
        profile = result.get("promptProfile")
        it["targetMet"] = target_met
        it["winner"] = profile or result["fineTuneJob"]
        it["winnerKind"] = "PromptProfile" if profile else "FineTuneJob"
        self._seconds(it, "training")
        numbers = (
            f"{self.spec.gate.metric} {result.get('candidate')} vs champion "
            f"{result.get('champion')}"
        )
        what = f"PromptProfile {profile}" if profile else f"adapter {result['adapter']}"
        if self.spec.promotion == "Recommend":
            it["rollout"] = "Recommended"
            self._done(
                it,
                None,
                f"recommended: {what} ({numbers}); set the deployment's spec.rollout to "
                "roll it out",
            )
            return
        candidate = (
            Variant(adapter=self.spec.adapter, prompt_profile_ref=ProfileRevisionRef(name=profile))
            if profile
            else Variant(adapter=result["adapter"])
        )
        rollout = winner_rollout(self.spec, candidate)
        it.update(
            phase="RollingOut",
            rolloutId=rollouts.rollout_id(rollout),
            outcome=f"rolling out {what} ({numbers})",
            phaseStarted=rollouts.time_text(_now()),
        )
        self._patch_md({"rollout": rollout.wire()})
        self.op.event(self.body, "Normal", "RolloutRequested", it["outcome"])

    # -- RollingOut
    def _roll_out(self, it: dict[str, Any]) -> None:
        state = (self.md.get("status") or {}).get("rollout") or {}
        if state.get("id") != it.get("rolloutId") or state.get("phase") not in rollouts.ENDED:
            return
        winner = it["winner"]
        it["rollout"] = state["phase"]
        self._seconds(it, "rollout")
        if it.get("winnerKind") == "PromptProfile":
            promoted = state["phase"] == "Promoted"
            # the deployment serves the winner's profile from now on (the adapter as it was)
            changes = {"promptProfileRef": {"name": winner}} if promoted else {}
            self._patch_md({**changes, "rollout": None})
            self._done(
                it,
                winner if promoted else None,
                f"promoted PromptProfile {winner}: {state.get('message', '')}"
                if promoted
                else f"the canary was {state['phase']}: {state.get('message', '')}",
            )
            return
        if state["phase"] == "Promoted":
            # the adapter users call now serves the winner's artifact, in place
            self._set_adapters(
                lambda adapters: [
                    served_by(winner, self.spec.adapter) if a["name"] == self.spec.adapter else a
                    for a in adapters
                    if a["name"] != winner
                ],
                rollout=None,
            )
            self.changes["champion"] = winner
            self._done(it, winner, f"promoted {winner}: {state.get('message', '')}")
        else:
            self._set_adapters(
                lambda adapters: [a for a in adapters if a["name"] != winner], rollout=None
            )
            self._done(it, None, f"the canary was {state['phase']}: {state.get('message', '')}")

    # -- helpers
    def _done(self, it: dict[str, Any], champion: str | None, outcome: str) -> None:
        it.update(phase="Done", finished=rollouts.time_text(_now()), outcome=outcome[:1000])
        it.pop("phaseStarted", None)
        warning = champion is None and it.get("rollout") not in ("Recommended",)
        self.op.event(
            self.body,
            "Warning" if warning else "Normal",
            "IterationDone",
            f"iteration {it['number']}: {outcome}"[:1000],
        )

    def _seconds(self, it: dict[str, Any], phase: str) -> None:
        started = it.get("phaseStarted")
        if started:
            seconds = round((_now() - rollouts.parse_time(started)).total_seconds(), 1)
            it["seconds"] = {**(it.get("seconds") or {}), phase: seconds}

    def _drop_adapter(self, name: str | None) -> None:
        if name:
            self._set_adapters(lambda adapters: [a for a in adapters if a["name"] != name])

    def _set_adapters(self, change: Any, **spec: Any) -> None:
        adapters = list((self.md.get("spec") or {}).get("adapters") or [])
        wanted = change(adapters)
        if wanted != adapters or any(
            (self.md.get("spec") or {}).get(k) != v for k, v in spec.items()
        ):
            self._patch_md({"adapters": wanted, **spec})

    def _patch_md(self, spec: dict[str, Any]) -> None:
        self.md = self.op.patch_spec(self.md, spec)
