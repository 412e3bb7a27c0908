"""Runs in Kueue queues: what the controllers read from Kueue (kueue.x-k8s.io) and how they
turn it into status.

A queued run's training Job carries ``kueue.x-k8s.io/queue-name`` and is created suspended;
Kueue creates its Workload, admits it when the ClusterQueue has quota for every pod (an
Indexed multi-node Job is one pod set: all pods or none) and unsuspends the Job. Tailor
never unsuspends a queued Job: ``spec.suspend`` maps to the Workload's ``spec.active``.
The controllers read the Workload (found by Kueue's ``kueue.x-k8s.io/job-uid`` label), the
LocalQueue's ClusterQueue (quota and use) and the run's position from Kueue's visibility
API, and say in status why a run waits, whether it can ever be admitted and when it was
preempted.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from tailor.observability.operator import QUEUE_ADMISSIONS, QUEUE_PREEMPTIONS, QUEUE_WAIT_SECONDS
from tailor.runtime import rest

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API = f"{GROUP}/{VERSION}"
JOB_UID_LABEL = f"{GROUP}/job-uid"
VISIBILITY = f"visibility.{GROUP}/{VERSION}"


def _get(api_client: Any, path: str, query: dict[str, str] | None = None) -> dict[str, Any] | None:
    try:
        return rest.request(api_client, "GET", path, query=query)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def queue_problem(
    api_client: Any, namespace: str, queue: str, priority_class: str | None, explicit: bool
) -> tuple[str, str] | None:
    """(reason, message) of why a run cannot join ``queue``, or None: Kueue is not
    installed, the LocalQueue does not exist in the namespace, or the WorkloadPriorityClass
    does not. Checked before the training Job exists, so nothing waits forever unexplained."""
    field = "spec.queueName" if explicit else "the operator's default queue (kueue.defaultQueue)"
    if _get(api_client, f"/apis/{API}") is None:
        return (
            "KueueNotInstalled",
            f"{field} is {queue!r} but Kueue ({GROUP}) is not installed in this cluster: "
            "install Kueue (https://kueue.sigs.k8s.io) or remove spec.queueName",
        )
    if _get(api_client, rest.path(API, "localqueues", namespace, queue)) is None:
        return (
            "QueueNotFound",
            f"{field} names LocalQueue {queue!r}, which does not exist in namespace "
            f"{namespace}: create it (kind LocalQueue, spec.clusterQueue: <a ClusterQueue>) "
            "or name another queue",
        )
    if priority_class and _get(api_client, rest.path(API, "workloadpriorityclasses", None, priority_class)) is None:  # fmt: skip
        return (
            "PriorityClassNotFound",
            f"spec.priorityClassName names WorkloadPriorityClass {priority_class!r}, which "
            "does not exist: create it (kind WorkloadPriorityClass, value: <priority>) or "
            "remove spec.priorityClassName",
        )
    return None


def workload_of_job(api_client: Any, namespace: str, job_uid: str) -> dict[str, Any] | None:
    """Kueue's Workload of a Job (labelled with the Job's uid), or None before Kueue made it."""
    found = _get(
        api_client,
        rest.path(API, "workloads", namespace),
        {"labelSelector": f"{JOB_UID_LABEL}={job_uid}"},
    )
    items = (found or {}).get("items") or []
    return items[0] if items else None


def set_active(api_client: Any, workload: dict[str, Any], active: bool) -> None:
    """Deactivate (Kueue evicts it: pods removed, Job suspended) or reactivate a Workload."""
    meta = workload["metadata"]
    rest.request(
        api_client,
        "PATCH",
        rest.path(API, "workloads", meta["namespace"], meta["name"]),
        {"spec": {"active": active}},
        content_type=rest.MERGE_PATCH,
    )


def position(api_client: Any, namespace: str, queue: str, workload: str) -> int | None:
    """1-based place of a pending Workload in its LocalQueue (Kueue's visibility API counts
    from 0), None when the API does not answer or lists it no more."""
    try:
        pending = _get(
            api_client,
            rest.path(VISIBILITY, "localqueues", namespace, queue) + "/pendingworkloads",
        )
    except ApiException:
        return None  # the visibility API is optional (an aggregated API that may be down)
    for item in (pending or {}).get("items") or []:
        if item.get("metadata", {}).get("name") == workload:
            return int(item.get("positionInLocalQueue", 0)) + 1
    return None


@dataclass(frozen=True)
class Quota:
    """A ClusterQueue's quota and reserved use of one resource, summed over its flavors."""

    cluster_queue: str
    nominal: float | None
    reserved: float


def quota(api_client: Any, namespace: str, queue: str, resource: str) -> Quota | None:
    local = _get(api_client, rest.path(API, "localqueues", namespace, queue))
    name = ((local or {}).get("spec") or {}).get("clusterQueue")
    if not name:
        return None
    cq = _get(api_client, rest.path(API, "clusterqueues", None, name)) or {}
    nominal: float | None = None
    for group in (cq.get("spec") or {}).get("resourceGroups") or []:
        for flavor in group.get("flavors") or []:
            for res in flavor.get("resources") or []:
                if res.get("name") == resource:
                    nominal = (nominal or 0) + _number(res.get("nominalQuota"))
    reserved = 0.0
    for flavor in (cq.get("status") or {}).get("flavorsReservation") or []:
        for res in flavor.get("resources") or []:
            if res.get("name") == resource:
                reserved += _number(res.get("total"))
    return Quota(name, nominal, reserved)


def in_use(kueue_says: str, resource: str, need: float, limits: Quota) -> float:
    """How much of ``resource`` the ClusterQueue has given out, as Kueue's scheduler saw it
    when it last tried the run ("insufficient unused quota for R in flavor F, N more
    needed": free = need - N); the ClusterQueue's own status lags behind by seconds, so
    it only fills in when the message does not say."""
    found = re.search(
        rf"insufficient unused quota for {re.escape(resource)} in flavor \S+, (\S+) more needed",
        kueue_says,
    )
    if found and limits.nominal is not None:
        free = need - _number(found.group(1))
        return max(0.0, limits.nominal - free)
    return limits.reserved


def _number(quantity: Any) -> float:
    return float(parse_quantity(quantity or 0))  # type: ignore[no-untyped-call]


def _conditions(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (workload.get("status") or {}).get("conditions") or []}


def _true(conds: dict[str, dict[str, Any]], type_: str) -> bool:
    return conds.get(type_, {}).get("status") == "True"


def preemptions(workload: dict[str, Any]) -> int:
    """How often Kueue preempted the Workload (its scheduling stats)."""
    stats = (workload.get("status") or {}).get("schedulingStats") or {}
    return sum(
        int(e.get("count") or 0)
        for e in stats.get("evictions") or []
        if e.get("reason") == "Preempted"
    )


@dataclass(frozen=True)
class QueueView:
    """Where a run with a queue stands: the phase, reason and message for status, and
    ``status.queue``."""

    phase: str  # Queued, Admitted or "" (admitted and started: the Job's own state counts)
    reason: str
    message: str
    queue: dict[str, Any]


def view(
    api_client: Any,
    namespace: str,
    queue: str,
    workload: dict[str, Any] | None,
    need: float,
    resource: str,
) -> QueueView:
    """Kueue's view of a queued run from its Job's ``workload`` (None: not made yet).
    ``need``: how much of ``resource`` (the accelerator) all its pods ask for together."""
    info: dict[str, Any] = {"name": queue}
    if workload is None:
        return QueueView(
            "Queued",
            "WaitingForKueue",
            f"the training Job waits for Kueue to take it into LocalQueue {queue}",
            info,
        )
    conds = _conditions(workload)
    info["workload"] = workload["metadata"]["name"]
    info["priority"] = (workload.get("spec") or {}).get("priority")
    info["preemptions"] = preemptions(workload)
    admission = (workload.get("status") or {}).get("admission") or {}
    if admission.get("clusterQueue"):
        info["clusterQueue"] = admission["clusterQueue"]
    if _true(conds, "Admitted"):
        info["admitted"] = True
        info["admittedAt"] = conds["Admitted"].get("lastTransitionTime")
        if not info["preemptions"]:  # a first admission waited since the Workload exists
            info["waitingSince"] = workload["metadata"].get("creationTimestamp")
        return QueueView(
            "",
            "Admitted",
            f"admitted by ClusterQueue {info.get('clusterQueue', '?')}; starting its pods",
            info,
        )
    info["admitted"] = False
    info["waitingSince"] = conds.get("QuotaReserved", {}).get("lastTransitionTime") or workload[
        "metadata"
    ].get("creationTimestamp")
    limits = quota(api_client, namespace, queue, resource)
    if limits:
        info["clusterQueue"] = limits.cluster_queue
    evicted = conds.get("Evicted", {})
    reserved = conds.get("QuotaReserved", {})
    kueue_says = reserved.get("message") or ""
    if _true(conds, "QuotaReserved"):
        checks = conds.get("Admitted", {}).get("message") or "waiting for admission checks"
        return QueueView("Queued", "AdmissionChecks", checks, info)
    if evicted.get("status") == "True" and evicted.get("reason") == "Deactivated":
        return QueueView("Suspended", "Suspended", "the run is suspended (Workload inactive)", info)
    where = f"ClusterQueue {limits.cluster_queue}" if limits else f"LocalQueue {queue}"
    numbers = ""
    if limits and limits.nominal is not None:
        numbers = (
            f": needs {need:g} {resource}, quota {limits.nominal:g}, "
            f"in use {in_use(kueue_says, resource, need, limits):g}"
        )
    if "> maximum capacity" in kueue_says:
        return QueueView(
            "Queued",
            "ExceedsQuota",
            f"can never be admitted: asks more than {where} can ever give{numbers}. Lower "
            "spec.resources (gpus x nodes) or raise the ClusterQueue's quota. Kueue: " + kueue_says,
            info,
        )
    info["position"] = position(api_client, namespace, queue, info["workload"])
    place = f"; position {info['position']} in LocalQueue {queue}" if info["position"] else ""
    if info["preemptions"]:
        preempted = conds.get("Preempted", {}).get("message") or evicted.get("message") or ""
        return QueueView(
            "Queued",
            "Preempted",
            f"preempted ({preempted or 'by a higher-priority workload'}); back in {where}{place}, "
            f"it resumes from its newest checkpoint when readmitted{numbers}",
            info,
        )
    return QueueView(
        "Queued",
        "WaitingForQuota",
        f"waiting for quota in {where}{numbers}{place}"
        + (f". Kueue: {kueue_says}" if kueue_says else ""),
        info,
    )


def record(kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Count an admission (with the time it waited) and new preemptions, once each: only
    when ``new`` (status.queue) tells something ``old`` did not."""
    old = old or {}
    queue = str(new.get("name") or "")
    if new.get("admitted") and new.get("admittedAt") != old.get("admittedAt"):
        QUEUE_ADMISSIONS.labels(kind, queue).inc()
        QUEUE_PREEMPTIONS.labels(kind, queue)  # a queue's counter exists from 0, not absent
        # Kueue may admit before the operator ever saw the run waiting (no old status)
        waited_since = old.get("waitingSince") or new.get("waitingSince")
        if waited_since and new.get("admittedAt"):
            QUEUE_WAIT_SECONDS.labels(kind, queue).observe(
                max(0.0, (_time(new["admittedAt"]) - _time(waited_since)).total_seconds())
            )
    more = int(new.get("preemptions") or 0) - int(old.get("preemptions") or 0)
    if more > 0:
        QUEUE_PREEMPTIONS.labels(kind, queue).inc(more)


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
