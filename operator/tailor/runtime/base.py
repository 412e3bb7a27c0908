"""The runtime interface and the states it reports.

A runtime runs a :class:`~tailor.builders.common.Workload` and tells the controllers where
it stands as a :class:`RunState` (batch work) or :class:`ServerState` (servers). The
Kubernetes runtime derives them from Jobs, Pods and Deployments; the local runtime from
processes. Controllers never look at either directly, so phases mean the same everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from tailor.builders.common import Manifest, Workload

RunPhase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]


@dataclass(frozen=True)
class RunState:
    """Where a batch workload stands."""

    phase: RunPhase
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    attempts: int = 0
    result: dict[str, Any] | None = None
    """What the workload reported when it succeeded (its termination message, e.g. the
    trainer's verified artifact), None if it reported nothing."""


def require_report(state: RunState | None, path: str, reason: str, message: str) -> RunState | None:
    """A completed Job is Succeeded only if its workload's termination message, which it
    writes once its output is in place, holds a non-empty value at ``path`` (dotted, e.g.
    ``artifact.sha256``); otherwise the run is Failed with ``reason``, so a Job that exits 0
    without doing its work (a wrong command, a writer killed after the fact) is never
    taken for success."""
    if state is None or state.phase != "Succeeded":
        return state
    value: Any = state.result
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value:
        return state
    return replace(state, phase="Failed", reason=reason, message=message)


@dataclass(frozen=True)
class ServerState:
    """Where a server workload stands."""

    replicas: int
    ready_replicas: int
    updated_replicas: int
    endpoint: str
    revision: str = ""
    message: str = ""


@dataclass(frozen=True)
class ReplicaReport:
    """What one ready replica of a server says it serves (``GET /adapters`` on its metrics
    port), or why it could not be asked."""

    replica: str
    report: dict[str, Any] | None = None
    error: str | None = None


class Runtime(Protocol):
    """Where workloads execute."""

    def prepare_namespace(self, namespace: str) -> None:
        """Make sure shared per-namespace state exists (the artifacts volume)."""

    def apply(self, manifest: Manifest) -> dict[str, Any]:
        """Create or update one object idempotently (server-side apply)."""

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete one object; absent is fine."""

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One object, or None."""

    def start(self, workload: Workload) -> None:
        """Start (or update) a workload; idempotent."""

    def run_state(self, namespace: str, name: str) -> RunState | None:
        """State of a batch workload, None if it does not exist."""

    def server_state(self, namespace: str, name: str) -> ServerState | None:
        """State of a server workload, None if it does not exist."""

    def stop(self, namespace: str, name: str) -> None:
        """Stop and remove a workload."""

    def update_config(self, workload: Workload) -> None:
        """Hand a running server a changed spec file (its ConfigMap) without restarting it."""

    def replica_reports(self, namespace: str, name: str) -> list[ReplicaReport]:
        """What each ready replica of a server reports it serves."""


def run_state_from_job(job: dict[str, Any], pods: list[dict[str, Any]]) -> RunState:
    """Interpret a Job and its pods as a :class:`RunState`.

    Failed jobs carry the Job's reason (BackoffLimitExceeded, DeadlineExceeded) or, when a
    pod failed the Job through the pod failure policy (exit code 2, a user error), the
    reason the workload wrote to its termination message (e.g. InvalidDataset).
    Unschedulable pods make the run Queued with the scheduler's message.
    """
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    attempts = sum(int(status.get(k) or 0) for k in ("active", "succeeded", "failed"))
    start, done = status.get("startTime"), status.get("completionTime")
    if "Complete" in conditions:
        return RunState("Succeeded", "Completed", "", start, done, attempts, _result(pods))
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        reason = failed.get("reason") or "Failed"
        message = failed.get("message") or ""
        if reason == "PodFailurePolicy":
            reason, message = _termination_reason(pods) or ("WorkloadError", message)
        return RunState("Failed", reason, message, start, done or _now_of(failed), attempts)
    if spec.get("suspend"):
        return RunState("Suspended", "Suspended", "the run is suspended", start, None, attempts)
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return RunState(
                    "Queued", "Unschedulable", cond.get("message", ""), start, None, attempts
                )
    # Running from the first pod that runs until the Job itself finishes: a pod that has
    # terminated while the Job controller has not yet marked the Job (or a retry's pod not
    # yet started) does not send the run back to Pending.
    uncounted = status.get("uncountedTerminatedPods") or {}
    started = sum(int(status.get(k) or 0) for k in ("succeeded", "failed", "ready")) + sum(
        len(uncounted.get(k) or []) for k in ("succeeded", "failed")
    )
    if started or any(
        (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for p in pods
    ):
        return RunState("Running", "Running", "", start, None, attempts)
    return RunState("Pending", "Starting", "", start, None, attempts)


def _now_of(condition: dict[str, Any]) -> str | None:
    value = condition.get("lastTransitionTime")
    return str(value) if value else None


def _termination_messages(pods: list[dict[str, Any]], exit_code: int) -> Iterator[str]:
    """What workload containers that exited with ``exit_code`` wrote to
    /dev/termination-log, pod by pod."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") == exit_code and terminated.get("message"):
                yield str(terminated["message"])


def _result(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The report a succeeded workload wrote (exit 0, a JSON object with an artifact); with
    several pods (a multi-node Job), the one rank 0 wrote."""
    for text in _termination_messages(pods, 0):
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("artifact"):
            return data
    return None


def _termination_reason(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) a failed workload container wrote to /dev/termination-log."""
    for text in _termination_messages(pods, 2):
        try:
            data = json.loads(text)
            return str(data.get("reason", "WorkloadError")), str(data.get("message", ""))
        except ValueError:
            return "WorkloadError", text.strip()[-1000:]
    return None
