"""Events of Tailor's children (Jobs, Pods, Deployments) and of Tailor resources that
others depend on, routed to the ``sync`` of whoever must react.

Children are found by their ``tailor.dev/<kind>: <name>`` label; dependents (a
ModelDeployment waiting for a FineTuneJob, a RAFTJob waiting for its child) by their
references.
"""

from __future__ import annotations

import threading
from typing import Any

import kopf

from tailor.api import GROUP, KINDS, VERSION
from tailor.controllers.context import EXTERNAL_INPUTS, operator

MANAGED = {"app.kubernetes.io/managed-by": "tailor"}


def is_owned_by(child: dict[str, Any] | None, uid: str) -> bool:
    """Whether ``child`` has an owner reference carrying ``uid`` (the object that created
    it): a same-named object anyone else made is not a child."""
    refs = ((child or {}).get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(ref.get("uid") == uid for ref in refs)


def owners_of(labels: dict[str, str]) -> list[tuple[str, str]]:
    """(kind, name) of every Tailor resource named in a child's labels."""
    out = []
    for kind in KINDS.values():
        name = labels.get(f"tailor.dev/{kind.kind.lower()}")
        if name:
            out.append((kind.kind, name))
    return out


def _route(kind: str, event: dict[str, Any], labels: dict[str, str], namespace: str) -> None:
    """Keep the child's body in the watch cache, then sync every Tailor owner it names.

    The watch handlers are coroutines: they only touch memory (the cache, the queue's
    lock for an instant), so they run on kopf's event loop instead of a hop to its
    thread pool per event."""
    op = operator()
    remember(kind, event)
    for owner_kind, name in owners_of(labels):
        op.enqueue(owner_kind, namespace, name)


def remember(kind: str, event: dict[str, Any]) -> None:
    """Put a watch event's body in the operator's cache (or drop it when DELETED)."""
    body = event.get("object") or {}
    meta = body.get("metadata") or {}
    if event.get("type") == "DELETED":
        operator().cache.delete(kind, meta.get("namespace") or "", meta.get("name") or "")
    else:
        operator().cache.put(kind, body)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_event(
    event: dict[str, Any], labels: dict[str, str], namespace: str, **_: Any
) -> None:
    _route("Job", event, labels, namespace)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def pod_event(
    event: dict[str, Any], labels: dict[str, str], namespace: str, **_: Any
) -> None:
    _route("Pod", event, labels, namespace)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
async def deployment_event(
    event: dict[str, Any], labels: dict[str, str], namespace: str, **_: Any
) -> None:
    _route("Deployment", event, labels, namespace)


@kopf.on.event("kueue.x-k8s.io", "v1beta2", "workloads")
async def workload_event(event: dict[str, Any], namespace: str, **_: Any) -> None:
    """Kueue's Workload of a Tailor Job changed (created, admitted, preempted, finished):
    sync the run that owns the Job, and every other run of the namespace waiting in a
    queue, whose position may have moved. Workloads of other Jobs are ignored. kopf starts
    this watch only where Kueue's CRDs exist."""
    body = event.get("object") or {}
    op = operator()
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") != "Job":
            continue
        job = op.cache.get("Job", namespace, ref.get("name") or "")
        if job is None:
            continue
        for owner_kind, name in owners_of(job["metadata"].get("labels") or {}):
            op.enqueue(owner_kind, namespace, name)
        if not _frees_or_takes_quota(event):
            continue
        for run in op.cache.of_kind("FineTuneJob", namespace):
            if (run.get("status") or {}).get("phase") == "Queued":
                op.enqueue("FineTuneJob", namespace, run["metadata"]["name"])


def _frees_or_takes_quota(event: dict[str, Any]) -> bool:
    """Whether a Workload event can move the other runs of its queue: it was admitted,
    evicted, finished or deleted (a pending Workload's own updates move nobody)."""
    if event.get("type") == "DELETED":
        return True
    conditions = ((event.get("object") or {}).get("status") or {}).get("conditions") or []
    return any(
        c.get("type") in ("Admitted", "Evicted", "Finished") and c.get("status") == "True"
        for c in conditions
    )


def references(body: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every Tailor resource a ModelDeployment, RAFTJob, PromptProfile or
    Evaluation refers to."""
    spec = body.get("spec") or {}
    refs: set[tuple[str, str]] = set()
    for adapter in spec.get("adapters") or []:
        if adapter.get("fineTuneJobRef"):
            refs.add(("FineTuneJob", adapter["fineTuneJobRef"]["name"]))
        if adapter.get("raftJobRef"):
            refs.add(("RAFTJob", adapter["raftJobRef"]["name"]))
    if spec.get("promptProfileRef"):
        refs.add(("PromptProfile", spec["promptProfileRef"]["name"]))
    if spec.get("knowledgeBaseRef"):
        refs.add(("KnowledgeBase", spec["knowledgeBaseRef"]["name"]))
    deployment = (spec.get("tests") or {}).get("deploymentRef")  # a PromptProfile's tests
    deployment = deployment or (spec.get("evaluation") or {}).get("deploymentRef")  # a gate's
    if deployment:
        refs.add(("ModelDeployment", deployment["name"]))
    judge = ((spec.get("scoring") or {}).get("judge") or {}).get("deploymentRef")
    for candidate in [*(spec.get("candidates") or []), {"deploymentRef": judge}]:  # Evaluation
        if candidate.get("deploymentRef"):
            refs.add(("ModelDeployment", candidate["deploymentRef"]["name"]))
        if candidate.get("promptProfileRef"):
            refs.add(("PromptProfile", candidate["promptProfileRef"]["name"]))
    return refs


# (namespace, kind, name) of a referenced object -> {(dependent kind, dependent name)},
# kept from the watch events of the kinds that refer to others (no list calls needed).
_DEPENDENTS: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
_DEPENDENTS_LOCK = threading.Lock()  # kopf runs event handlers on several threads


def _index_references(kind: str, body: dict[str, Any], deleted: bool) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    with _DEPENDENTS_LOCK:
        for key, dependents in list(_DEPENDENTS.items()):
            if key[0] == namespace:
                dependents.discard((kind, name))
                if not dependents:
                    del _DEPENDENTS[key]
        if not deleted:
            for ref_kind, ref_name in references(body):
                _DEPENDENTS.setdefault((namespace, ref_kind, ref_name), set()).add((kind, name))


def _notify_dependents(kind: str, namespace: str, name: str) -> None:
    op = operator()
    with _DEPENDENTS_LOCK:
        dependents = sorted(_DEPENDENTS.get((namespace, kind, name), ()))
    for dep_kind, dep_name in dependents:
        op.enqueue(dep_kind, namespace, dep_name)


_SEEN: dict[tuple[str, str, str], tuple[Any, ...]] = {}


def needs_sync(type_: str | None, body: dict[str, Any]) -> bool:
    """Whether a Tailor object's own watch event asks for a reconcile: first seen (created,
    or listed when the watch starts: kopf's resume), or a spec the operator has not handled
    yet (``metadata.generation`` ahead of ``status.observedGeneration``). Status writes (the
    operator's own, a workload's progress) do not; children's events and the periodic
    resync cover the rest."""
    if type_ in (None, "ADDED"):
        return True
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    requested = (meta.get("annotations") or {}).get(RECONCILE_REQUEST)
    if requested and body.get("kind") in EXTERNAL_INPUTS:
        if requested != status.get("lastHandledReconcileAt"):
            return True
    return meta.get("generation") != status.get("observedGeneration")


RECONCILE_REQUEST = "tailor.dev/reconcile-requested-at"
"""An annotation asking for a reconcile now (Flux's ``reconcile.fluxcd.io/requestedAt``
convention): a kind that reads inputs no watch delivers (``EXTERNAL_INPUTS``: a
PromptProfile's pool ConfigMap) syncs when its value differs from
``status.lastHandledReconcileAt``, which its sync sets."""


def _watch_tailor_kind(kind: str) -> None:
    """The one watch handler of a Tailor kind: cache the body, reconcile the object when
    :func:`needs_sync` says so, and on a change of phase (or published version) sync its
    dependents and its Tailor owner (a RAFTJob's child FineTuneJob moves the RAFTJob
    along). A watch handler rather than kopf's create/update/resume handlers: those write
    kopf's state annotations on every object, two extra API requests per object the
    level-triggered reconcile does not need (it keeps ``observedGeneration`` instead)."""

    @kopf.on.event(GROUP, VERSION, KINDS[kind].plural, id=f"{kind.lower()}-dependents")
    async def changed(
        event: dict[str, Any],
        body: dict[str, Any],
        namespace: str,
        name: str,
        labels: dict[str, str],
        type: str | None,
        **_: Any,
    ) -> None:
        key = (kind, namespace, name)
        remember(kind, event)
        if type != "DELETED" and needs_sync(type, body):
            operator().enqueue(kind, namespace, name)
        if kind in ("ModelDeployment", "RAFTJob", "PromptProfile", "Evaluation", "FineTuneJob"):
            _index_references(kind, body, deleted=type == "DELETED")
        status = body.get("status") or {}
        served = (status.get("served") or {}).get("revision")  # a PromptProfile's
        gate = (status.get("evaluation") or {}).get("phase")  # a FineTuneJob's gate
        seen = (status.get("phase"), status.get("revision"), status.get("collection"), served, gate)
        if type == "DELETED":
            _SEEN.pop(key, None)
            return
        if _SEEN.get(key) == seen:
            return
        _SEEN[key] = seen
        _notify_dependents(kind, namespace, name)
        for owner_kind, owner in owners_of(labels):
            if owner_kind != kind:
                operator().enqueue(owner_kind, namespace, owner)


for _kind in KINDS:
    _watch_tailor_kind(_kind)
