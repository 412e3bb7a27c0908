"""ModelDeployment controller: wait for every reference, then roll out the server.

References must be ready first (adapters' jobs Succeeded, the KnowledgeBase Ready, the
PromptProfile Valid); until then the phase is Pending and the ``ReferencesReady``
condition says what it waits for. A new prompt revision or index version changes the
pod template's revision annotation, which rolls the Deployment. A changed adapter list
does not: the spec ConfigMap is updated and every replica loads and unloads adapters in
place; ``status.replicaAdapters`` says what each ready replica serves, and the
``AdaptersLoaded`` condition whether all serve ``spec.adapters``.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from typing import Any

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.knowledgebase import KnowledgeBaseSpec
from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import ServeRun
from tailor.builders.common import Parent
from tailor.builders.knowledgebase import retriever_config
from tailor.builders.modeldeployment import (
    ResolvedRefs,
    build_serving,
    served_models,
    test_key_secret,
)
from tailor.controllers import rollout as rollouts
from tailor.controllers.context import Operator, condition, condition_of, syncer
from tailor.controllers.promptprofile import profile_revision
from tailor.controllers.storage import unreadable
from tailor.runtime.base import ReplicaReport

KIND = "ModelDeployment"
ADAPTER_POLL_SECONDS = 5.0
"""How often a deployment whose replicas do not all serve its adapters yet is looked at."""


def resolve(
    op: Operator, spec: ModelDeploymentSpec, namespace: str
) -> tuple[ResolvedRefs, list[str]]:
    """What the references point at, and a line for each one not ready yet."""
    refs, waiting = ResolvedRefs(), []
    for adapter in spec.adapters:
        if adapter.pvc:
            refs.adapters.append(
                (adapter.name, f"pvc://{adapter.pvc.claim_name}/{adapter.pvc.path}")
            )
            continue
        kind, ref = (
            ("FineTuneJob", adapter.fine_tune_job_ref)
            if adapter.fine_tune_job_ref
            else ("RAFTJob", adapter.raft_job_ref)
        )
        assert ref is not None
        body = op.get(kind, namespace, ref.name)
        status = (body or {}).get("status") or {}
        uri = (status.get("artifact") or {}).get("uri")
        if status.get("phase") != "Succeeded" or not uri:
            waiting.append(
                f"{kind} {ref.name} ({status.get('phase') or 'not found' if body is None else status.get('phase') or 'Pending'})"
            )
        elif outside := unreadable(uri, op.settings, namespace):
            waiting.append(f"{kind} {ref.name} (its status.artifact.uri: {outside})")
        else:
            refs.adapters.append((adapter.name, uri))
            sha256 = (status.get("artifact") or {}).get("sha256")
            if sha256:
                refs.adapter_sha256[adapter.name] = sha256
            gate = (status.get("evaluation") or {}).get("phase")
            # a FineTuneJob's spec.evaluation is its gate (a RAFTJob's is its RAG-vs-RAFT
            # comparison, which gates nothing)
            has_gate = kind == "FineTuneJob" and bool(
                ((body or {}).get("spec") or {}).get("evaluation")
            )
            if has_gate and gate != "Passed" and not adapter.serve_without_gate:
                refs.gated[adapter.name] = (
                    f"{kind} {ref.name}'s evaluation gate has "
                    + ("failed" if gate == "Failed" else "not passed yet")
                    + f" (status.evaluation.phase: {gate or 'Waiting'})"
                )
    if spec.prompt_profile_ref:
        body = op.get("PromptProfile", namespace, spec.prompt_profile_ref.name)
        status = (body or {}).get("status") or {}
        served = status.get("served") or {}
        gated = bool((((body or {}).get("spec") or {}).get("tests") or {}).get("gate"))
        if status.get("phase") == "Valid" and served.get("configMap"):
            refs.prompt_config_map = served["configMap"]  # newest, pinned or last passed
            revision = served.get("revision")  # a number in the profile's status
            refs.prompt_profile_revision = None if revision is None else str(revision)
        elif status.get("phase") == "Valid" and gated and status.get("revision"):
            pass  # no revision has passed its tests yet: served without the profile
        else:
            waiting.append(
                f"PromptProfile {spec.prompt_profile_ref.name} ({status.get('phase') or ('not found' if body is None else 'Pending')})"
            )
    if spec.knowledge_base_ref:
        binding = spec.knowledge_base_ref
        body = op.get("KnowledgeBase", namespace, binding.name)
        status = (body or {}).get("status") or {}
        if body is None or status.get("phase") != "Ready":
            waiting.append(
                f"KnowledgeBase {binding.name} ({status.get('phase') or ('not found' if body is None else 'Pending')})"
            )
        else:
            kb_spec = parse_spec(KINDS["KnowledgeBase"], body["spec"])
            assert isinstance(kb_spec, KnowledgeBaseSpec)
            config = retriever_config(kb_spec, Parent.from_body(body), op.settings, status)
            if binding.top_k:
                config.retrieval.top_k = binding.top_k
            if binding.score_threshold is not None:
                config.retrieval.score_threshold = binding.score_threshold
            refs.knowledge_base = config
            refs.knowledge_base_version = f"{status.get('readyBuild')}:{status.get('collection')}"
            serving = re.search(r"-v(\d+)$", str(status.get("collection") or ""))
            if serving:
                newest = int(serving.group(1))
                oldest = max(1, newest - kb_spec.store.qdrant.keep_collections)
                refs.knowledge_base_kept = (oldest, newest)
    return refs, waiting


@syncer(KIND)
def sync_model_deployment(op: Operator, body: dict[str, Any]) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    conditions = status.get("conditions")
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
    except ManifestError as error:
        op.patch_status(
            body,
            {
                "phase": "Failed",
                "conditions": condition(
                    conditions, "Ready", False, "InvalidSpec", "; ".join(error.lines)
                ),
            },
        )
        return
    assert isinstance(spec, ModelDeploymentSpec)
    parent = Parent.from_body(body)
    refs, waiting = resolve(op, spec, parent.namespace)
    if waiting:
        message = "waiting for " + ", ".join(waiting)
        new = {
            "phase": "Pending",
            "observedGeneration": generation,
            "conditions": condition(
                condition(conditions, "ReferencesReady", False, "Waiting", message, generation),
                "Ready",
                False,
                "WaitingForReferences",
                message,
                generation,
            ),
        }
        if (
            status.get("phase") != "Pending"
            or condition_of(status, "ReferencesReady").get("message", "") != message
        ):
            op.patch_status(body, new)
        return
    reports = op.runtime.replica_reports(parent.namespace, parent.name) if spec.rollout else []
    old_rollout = status.get("rollout")
    profiles, blocked = _rollout_blocked(op, spec, refs, parent.namespace)
    new_rollout = None if blocked else _rollout(op, body, spec, old_rollout, reports)
    refs.routing = rollouts.routing(spec.rollout, new_rollout, profiles)
    workload = build_serving(spec, parent, op.settings, refs)
    assert isinstance(workload.run, ServeRun)
    adapters = workload.run.adapters_revision
    state = op.runtime.server_state(parent.namespace, workload.name)
    if (
        state is None
        or state.revision != workload.revision
        or status.get("revision") != workload.revision
    ):
        op.runtime.prepare_namespace(parent.namespace)
        # created once with a random key (never applied again: that would change it)
        op.create_secret_once(test_key_secret(parent, secrets.token_urlsafe(32)))
        op.runtime.start(workload)
        state = op.runtime.server_state(parent.namespace, workload.name)
    elif (
        status.get("adaptersRevision") != adapters
        or _routed(old_rollout) != _routed(new_rollout)
        or {g["name"]: g["reason"] for g in status.get("gatedAdapters") or []} != refs.gated
    ):
        op.runtime.update_config(workload)  # the replicas apply it in place
    conditions = condition(conditions, "ReferencesReady", True, "Resolved", "", generation)
    if spec.rollout:
        reason, why = blocked or ("Started", "")
        conditions = condition(
            conditions, "RolloutStarted", blocked is None, reason, why, generation
        )
    replicas = state.replicas if state else 0
    ready = state.ready_replicas if state else 0
    rolled = bool(
        state and state.revision == workload.revision and state.updated_replicas >= replicas
    )
    idle = spec.replicas == 0 and spec.autoscaling is None
    if idle and rolled and replicas == 0:
        phase, reason = "Idle", "ScaledToZero"  # a valid state: nothing to serve until scaled up
    elif not rolled:
        phase, reason = "Progressing", "RollingOut"
    elif ready >= max(replicas, 1):
        phase, reason = "Ready", "Available"
    elif ready >= 1:
        phase, reason = "Degraded", "MinimumReplicasUnavailable"
    else:
        phase, reason = "Progressing", "Starting"
    message = f"{ready}/{replicas} replicas ready, revision {workload.revision}"
    if phase == "Idle":
        message = f"scaled to 0 replicas (spec.replicas), revision {workload.revision}"
    conditions = condition(conditions, "Ready", ready >= 1, reason, message, generation)
    conditions = condition(
        conditions, "Progressing", phase == "Progressing", reason, message, generation
    )
    replica_adapters: list[dict[str, Any]] = []
    if ready and (spec.adapters or status.get("replicaAdapters")):
        if not spec.rollout:
            reports = op.runtime.replica_reports(parent.namespace, workload.name)
        replica_adapters = [_replica_adapters(r, adapters) for r in reports]
        loaded, adapters_message = _adapters_loaded(replica_adapters, spec.adapters != [])
        conditions = condition(
            conditions,
            "AdaptersLoaded",
            loaded,
            "Loaded" if loaded else "Loading",
            adapters_message,
            generation,
        )
        if not loaded:  # replicas pick the change up by themselves: look again soon
            op.queue.add_after((KIND, parent.namespace, parent.name), ADAPTER_POLL_SECONDS)
    new = {
        "phase": phase,
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "endpoint": state.endpoint if state else None,
        "models": served_models(spec, parent),
        "revision": workload.revision,
        "deploymentName": workload.name,
        "adaptersRevision": adapters,
        "replicaAdapters": replica_adapters,
        "rollout": new_rollout,
        "gatedAdapters": [{"name": n, "reason": r} for n, r in sorted(refs.gated.items())],
        "conditions": conditions,
    }
    op.patch_status(body, new)
    if spec.rollout and (blocked or (new_rollout and new_rollout["phase"] not in rollouts.ENDED)):
        # measured again after one analysis interval; a blocked one looked at as often
        interval = spec.rollout.analysis.interval_seconds
        op.queue.add_after((KIND, parent.namespace, parent.name), float(interval))


def _rollout_blocked(
    op: Operator, spec: ModelDeploymentSpec, refs: ResolvedRefs, namespace: str
) -> tuple[dict[str, dict[str, Any]], tuple[str, str] | None]:
    """(the rendered profile of each variant naming a promptProfileRef, or why the rollout
    cannot route: (reason, message naming the field)). A candidate adapter whose gate has
    not passed is never routed to users; a profile revision must exist in this namespace;
    an index version must be one the KnowledgeBase keeps."""
    if spec.rollout is None:
        return {}, None
    candidate = spec.rollout.candidate.adapter
    if candidate in refs.gated:
        return {}, (
            "CandidateGated",
            f"spec.rollout.candidate.adapter {candidate}: {refs.gated[candidate]}; the "
            "rollout starts once it passes",
        )
    profiles: dict[str, dict[str, Any]] = {}
    for name, variant in (("stable", spec.rollout.stable), ("candidate", spec.rollout.candidate)):
        version, kept = variant.knowledge_base_version, refs.knowledge_base_kept
        if version is not None and (kept is None or not kept[0] <= version <= kept[1]):
            held = f"versions {kept[0]} to {kept[1]}" if kept else "no versions yet"
            return {}, (
                "KnowledgeBaseVersionNotFound",
                f"spec.rollout.{name}.knowledgeBaseVersion: the KnowledgeBase keeps {held} "
                f"(store.qdrant.keepCollections older ones); {version} is not one of them",
            )
        if variant.prompt_profile_ref is not None:
            (_, profile), problem = profile_revision(
                op, variant.prompt_profile_ref, f"spec.rollout.{name}", namespace
            )
            if problem:
                return {}, problem
            profiles[name] = profile
    return profiles, None


def _rollout(
    op: Operator,
    body: dict[str, Any],
    spec: ModelDeploymentSpec,
    old: dict[str, Any] | None,
    reports: list[ReplicaReport],
) -> dict[str, Any] | None:
    """The next ``status.rollout``: started, moved a step, ended, or as it was; an Event
    for each transition."""
    if spec.rollout is None:
        return None
    now = dt.datetime.now(dt.UTC)
    if not old or old.get("id") != rollouts.rollout_id(spec.rollout):
        new = rollouts.start(spec.rollout, now)
        op.event(body, "Normal", "RolloutStarted", new["message"])
        return new
    key = rollouts.routing_key(old)
    assert key is not None
    measures = rollouts.measure(spec.rollout, [r.report or {} for r in reports], key)
    action = rollouts.requested_action(body["metadata"], old)
    new, moved = rollouts.advance(spec.rollout, old, measures, now, action)
    if moved is not None:
        op.event(body, "Warning" if moved.warning else "Normal", moved.reason, moved.message)
    return new


def _routed(state: dict[str, Any] | None) -> tuple[str | None, bool]:
    """What replicas route by for a status.rollout: its key, and whether it routes."""
    routes = state is not None and state.get("phase") not in ("RolledBack", "Aborted")
    return rollouts.routing_key(state), routes


def _replica_adapters(report: ReplicaReport, wanted: str | None) -> dict[str, Any]:
    """A ``status.replicaAdapters`` item."""
    if report.report is None:
        return {"replica": report.replica, "message": report.error}
    body = report.report
    return {
        "replica": report.replica,
        "adapters": [a["name"] for a in body.get("adapters") or []],
        "current": body.get("revision") == wanted,
        "errors": [
            {"name": e["name"], "message": str(e["message"])[:500]}
            for e in body.get("errors") or []
        ],
    }


def _adapters_loaded(replicas: list[dict[str, Any]], any_wanted: bool) -> tuple[bool, str]:
    """(every replica serves spec.adapters, a line saying which do not and why)."""
    if not replicas:
        return False, "no ready replica answered yet"
    waiting = []
    for item in replicas:
        if item.get("message"):
            waiting.append(f"{item['replica']}: {item['message']}")
        elif item.get("errors"):
            failed = "; ".join(f"{e['name']}: {e['message']}" for e in item["errors"])
            waiting.append(f"{item['replica']} could not load {failed}")
        elif not item["current"]:
            waiting.append(
                f"{item['replica']} serves {', '.join(item['adapters']) or 'no adapter'} "
                "(it reloads when the kubelet refreshes its spec ConfigMap, within about a minute)"
            )
    if waiting:
        return False, "; ".join(waiting)
    what = "spec.adapters" if any_wanted else "no adapter"
    return True, f"all {len(replicas)} ready replicas serve {what}"
