"""What every controller shares: the settings, the runtime, access to Tailor objects, and
status writing with conditions, events and metrics.

Reconciliation is level-triggered: ``sync(kind, namespace, name)`` reads the object,
works out where it stands from its children, applies what is missing and writes status.
Parent handlers, child (Job, Pod, Deployment) events and dependency changes all call it,
serialised per object, so the outcome never depends on which event arrived first.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tailor.api import GROUP, KINDS, VERSION
from tailor.api.settings import OperatorSettings
from tailor.observability.operator import PHASES, reconciling
from tailor.runtime.base import Runtime

log = logging.getLogger("tailor.operator")

SyncFn = Callable[["Operator", dict[str, Any]], None]
SYNCERS: dict[str, SyncFn] = {}


def syncer(kind: str) -> Callable[[SyncFn], SyncFn]:
    """Register the sync function of a kind."""

    def register(fn: SyncFn) -> SyncFn:
        SYNCERS[kind] = fn
        return fn

    return register


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Operator:
    """The running operator's shared state (one per process)."""

    settings: OperatorSettings
    runtime: Runtime
    api_client: client.ApiClient
    _locks: dict[tuple[str, str, str], threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock)
    )

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, KINDS[kind].plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], obj)

    def list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        result = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, KINDS[kind].plural
        )
        return cast(list[dict[str, Any]], cast(dict[str, Any], result)["items"])

    def patch_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge ``status`` into the object's status; emit an event on a phase change."""
        meta = body["metadata"]
        old = body.get("status") or {}
        kind = body["kind"]
        if not changed(old, status):
            PHASES.record(kind, meta["namespace"], meta["name"], old.get("phase"))
            return
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                KINDS[kind].plural,
                meta["name"],
                {"status": status},
            )
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            raise
        phase = status.get("phase", old.get("phase"))
        PHASES.record(kind, meta["namespace"], meta["name"], phase)
        if "phase" in status and status["phase"] != old.get("phase"):
            reason, message = _phase_reason(status)
            warning = status["phase"] in ("Failed", "Invalid", "Degraded")
            kopf.event(
                body,
                type="Warning" if warning else "Normal",
                reason=reason or status["phase"],
                message=message or f"{kind} is {status['phase']}",
            )

    def sync(self, kind: str, namespace: str, name: str) -> None:
        """Reconcile one object now (serialised per object)."""
        with self._locks[(kind, namespace, name)], reconciling(kind):
            body = self.get(kind, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            SYNCERS[kind](self, body)


def changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether merging ``new`` into ``old`` changes anything but condition timestamps."""

    def strip(conds: Any) -> Any:
        return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conds or []]

    for key, value in new.items():
        if key == "conditions":
            if strip(old.get(key)) != strip(value):
                return True
        elif old.get(key) != value:
            return True
    return False


def _phase_reason(status: dict[str, Any]) -> tuple[str, str]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("reason") or ""), str(cond.get("message") or "")
    return "", ""


def condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; lastTransitionTime changes only with status."""
    value = "True" if status else "False"
    out = [dict(c) for c in conditions or [] if c.get("type") != type_]
    previous = next((c for c in conditions or [] if c.get("type") == type_), None)
    since = (
        previous.get("lastTransitionTime") if previous and previous.get("status") == value else None
    )
    entry = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32000],
        "lastTransitionTime": since or now(),
    }
    if generation is not None:
        entry["observedGeneration"] = generation
    out.append(entry)
    return sorted(out, key=lambda c: str(c["type"]))


OPERATOR: Operator | None = None


def operator() -> Operator:
    """The process's :class:`Operator`, set by ``tailor operator run`` at startup."""
    if OPERATOR is None:
        raise RuntimeError("the operator is not started")
    return OPERATOR
