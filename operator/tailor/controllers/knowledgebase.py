"""KnowledgeBase controller: run index builds, keep the serving index on failures, refresh
on the schedule, remove the collections Tailor created when the resource is deleted.

Builds are numbered (Job ``<name>-index-<N>``). A spec change starts a full build; a due
refresh starts an incremental one. Refreshes use a kopf timer rather than a CronJob: the
operator already tracks every build, a timer can never start a second build while one
runs (a CronJob would race spec-driven builds for the same alias), and the same code
serves the local runtime, which has no CronJobs.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import kopf
from croniter import croniter

from tailor.api import GROUP, KINDS, VERSION, ManifestError, parse_spec
from tailor.api.knowledgebase import KnowledgeBaseSpec
from tailor.builders.common import Parent, child_name
from tailor.builders.knowledgebase import build_index, retriever_config
from tailor.controllers.context import Operator, condition, now, operator, syncer
from tailor.observability.operator import KB_LAST_INDEXED, KB_NEXT_REFRESH, RUN_SECONDS

KIND = "KnowledgeBase"


def next_refresh(schedule: str, after: dt.datetime) -> dt.datetime:
    return croniter(schedule, after).get_next(dt.datetime)


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@syncer(KIND)
def sync_knowledge_base(op: Operator, body: dict[str, Any]) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
    except ManifestError as error:
        op.patch_status(
            body,
            {
                "phase": "Failed",
                "observedGeneration": generation,
                "conditions": condition(
                    status.get("conditions"), "Ready", False, "InvalidSpec", "; ".join(error.lines)
                ),
            },
        )
        return
    assert isinstance(spec, KnowledgeBaseSpec)
    parent = Parent.from_body(body)
    for gauge, stamp in ((KB_LAST_INDEXED, "lastIndexed"), (KB_NEXT_REFRESH, "nextRefresh")):
        when = _parse_time(status.get(stamp))  # also right after an operator restart
        if when:
            gauge.labels(parent.namespace, parent.name).set(when.timestamp())
    build = int(status.get("build") or 0)
    build_generation = status.get("buildGeneration")
    ready_build = status.get("readyBuild")
    mode: Literal["incremental", "full"] = "incremental"
    state = None
    if build:
        job = build_index(spec, parent, op.settings, build).name
        state = op.runtime.run_state(parent.namespace, job)
    finished = state is not None and state.phase in ("Succeeded", "Failed")
    if build == 0 or (finished and build_generation != generation):
        build, build_generation, state = build + 1, generation, None
        mode = "full" if ready_build else "incremental"
    elif finished and _refresh_due(spec, status):
        build, state = build + 1, None
    workload = build_index(spec, parent, op.settings, build, mode)
    if state is None:  # a new build, or a recorded one whose Job was never created
        op.runtime.prepare_namespace(parent.namespace)
        op.runtime.start(workload)
        state = op.runtime.run_state(parent.namespace, workload.name)
    new: dict[str, Any] = {
        "build": build,
        "buildGeneration": build_generation,
        "jobName": workload.name,
        "alias": workload.run.target.alias,
        "observedGeneration": generation,
    }
    conditions = status.get("conditions")
    phase = status.get("phase") or "Pending"
    if state is None or state.phase in ("Pending", "Queued", "Running"):
        phase = "Ready" if ready_build else "Indexing"
        conditions = condition(
            conditions, "Progressing", True, "Indexing", f"build {build} running"
        )
        if not ready_build:
            conditions = condition(conditions, "Ready", False, "Indexing", "first build running")
    elif state.phase == "Succeeded":
        phase = "Ready"
        new["readyBuild"] = build
        conditions = condition(conditions, "Progressing", False, "Indexed", f"build {build} done")
        conditions = condition(
            conditions, "Ready", True, "Indexed", f"build {build} serves queries", generation
        )
        conditions = condition(conditions, "LastBuildSucceeded", True, "Indexed", "")
        finished_at = _parse_time(state.completion_time) or dt.datetime.now(dt.UTC)
        if ready_build != build:
            KB_LAST_INDEXED.labels(parent.namespace, parent.name).set(finished_at.timestamp())
            if state.start_time:
                start = _parse_time(state.start_time) or finished_at
                seconds = (finished_at - start).total_seconds()
                RUN_SECONDS.labels(KIND, "Succeeded").observe(seconds)
        if spec.adaptation is None and status.get("adaptation"):
            new["adaptation"] = None  # the build now serving used the base model
        if spec.refresh:
            due = next_refresh(spec.refresh.schedule, finished_at)
            new["nextRefresh"] = due.strftime("%Y-%m-%dT%H:%M:%SZ")
            KB_NEXT_REFRESH.labels(parent.namespace, parent.name).set(due.timestamp())
    elif state.phase == "Failed":
        message = f"build {build} failed: {state.reason} {state.message}".strip()
        conditions = condition(conditions, "Progressing", False, state.reason, message)
        conditions = condition(conditions, "LastBuildSucceeded", False, state.reason, message)
        if ready_build:
            phase = "Ready"  # the previous index keeps serving
            if status.get("readyBuild") == ready_build and _last_build_ok(status):
                op.event(
                    body,
                    "Warning",
                    "IndexBuildFailed",
                    f"{message}; build {ready_build} keeps serving",
                )
        else:
            phase = "Failed"
            conditions = condition(conditions, "Ready", False, state.reason, message, generation)
    new["phase"] = phase
    new["conditions"] = conditions
    op.patch_status(body, new)


def _left_behind(body: dict[str, Any]) -> str:
    """The collections a KnowledgeBase's deletion would remove, in words."""
    status = body.get("status") or {}
    url = (((body.get("spec") or {}).get("store") or {}).get("qdrant") or {}).get("url")
    where = f"Qdrant {url}" if url else "Qdrant Edge on the artifacts volume"
    alias = status.get("alias") or body["metadata"]["name"]
    return f"collections of alias {alias} (active {status.get('collection') or 'none'}) in {where}"


def _last_build_ok(status: dict[str, Any]) -> bool:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "LastBuildSucceeded":
            return bool(cond.get("status") == "True")
    return True


def _refresh_due(spec: KnowledgeBaseSpec, status: dict[str, Any]) -> bool:
    due = _parse_time(status.get("nextRefresh"))
    return bool(spec.refresh and due and dt.datetime.now(dt.UTC) >= due)


@kopf.timer(
    GROUP,
    VERSION,
    "knowledgebases",
    interval=30,
    initial_delay=30,
    idle=0,
    when=lambda spec, **_: bool((spec or {}).get("refresh")),
)
def refresh(namespace: str, name: str, **_: Any) -> None:
    operator().enqueue(KIND, namespace, name)


SKIP_CLEANUP = "tailor.dev/skip-cleanup"


@kopf.on.delete(GROUP, VERSION, "knowledgebases")
def remove_collections(body: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
    """Delete the collections this KnowledgeBase created, then let it go; give up after
    ``cleanup_timeout_seconds`` (an unreachable Qdrant must not block deletion forever),
    or at once with the annotation ``tailor.dev/skip-cleanup: "true"``, leaving an Event
    that names what was left behind."""
    op = operator()
    status = body.get("status") or {}
    if not status.get("build"):
        return  # nothing was ever indexed
    left = _left_behind(body)
    if (body["metadata"].get("annotations") or {}).get(SKIP_CLEANUP) == "true":
        kopf.event(body, type="Warning", reason="CleanupSkipped",
                   message=f"{SKIP_CLEANUP}: {left} left in place")  # fmt: skip
        return
    deleting = _parse_time(body["metadata"].get("deletionTimestamp"))
    waited = (dt.datetime.now(dt.UTC) - deleting).total_seconds() if deleting else 0.0
    if waited > op.settings.cleanup_timeout_seconds:
        kopf.event(
            body,
            type="Warning",
            reason="CleanupAbandoned",
            message=f"gave up after {waited:.0f}s: {left} left behind; delete it by hand",
        )
        op.runtime.stop(namespace, child_name(Parent.from_body(body), "cleanup"))
        return
    ns = op.runtime.get("v1", "Namespace", "", namespace)
    if ns is None or (ns.get("status") or {}).get("phase") == "Terminating":
        return  # the namespace and its artifacts volume go away as a whole
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
    except ManifestError:
        return
    assert isinstance(spec, KnowledgeBaseSpec)
    parent = Parent.from_body(body)
    workload = build_index(spec, parent, op.settings, 0, status=body.get("status") or {})
    workload.name = child_name(parent, "cleanup")
    for manifest in workload.manifests:
        if manifest["kind"] in ("Job", "ConfigMap"):
            manifest["metadata"]["name"] = workload.name
        if manifest["kind"] == "Job":
            pod = manifest["spec"]["template"]["spec"]
            for volume in pod["volumes"]:
                if volume["name"] == "spec":
                    volume["configMap"]["name"] = workload.name
    workload.with_args("--delete")
    state = op.runtime.run_state(namespace, workload.name)
    if state is None:
        op.runtime.start(workload)
        raise kopf.TemporaryError(f"removing collections of {name}", delay=3)
    if state.phase == "Failed":
        message = f"removing {left} failed: {state.message or state.reason}; retrying"
        kopf.event(body, type="Warning", reason="CleanupFailed", message=message)
        op.patch_status(
            body,
            {
                "conditions": condition(
                    status.get("conditions"),
                    "CleanupFailed",
                    True,
                    state.reason or "CleanupFailed",
                    message,
                )
            },
        )
        op.runtime.stop(namespace, workload.name)
        delay = min(30.0, max(1.0, op.settings.cleanup_timeout_seconds / 10))
        raise kopf.TemporaryError(f"cleanup of {name} failed; retrying", delay=delay)
    if state.phase != "Succeeded":
        raise kopf.TemporaryError(f"removing collections of {name}", delay=3)
    retriever = retriever_config(spec, parent, op.settings, body.get("status") or {})
    kopf.info(body, reason="CollectionsRemoved", message=f"removed {retriever.alias} at {now()}")
