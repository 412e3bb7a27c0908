"""Progress reports to the owner resource's status: rate-limited, never fatal, never the fields
the operator owns."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Protocol

from tailor.api.workloads import OwnerRef, Reporter

log = logging.getLogger("tailor.workloads")


class ProgressSink(Protocol):
    """Something that accepts a status patch."""

    def __call__(self, patch: dict[str, Any]) -> None: ...


# The status fields the operator alone writes (it derives them from the workload's Job),
# so that a phase has one writer and never flaps between two.
OPERATOR_FIELDS = frozenset({"phase", "conditions", "observedGeneration"})


class ProgressReporter:
    """Send status patches to the owner, at most one per ``min_interval_seconds``.

    ``report(..., final=True)`` always sends. A failing sink is logged and ignored: losing
    a progress update must never fail the work.
    """

    def __init__(self, sink: ProgressSink, min_interval_seconds: float = 5.0):
        self.sink = sink
        self.min_interval = min_interval_seconds
        self._last = 0.0
        self._pending: dict[str, Any] | None = None
        self.sent = 0
        self.failures = 0

    def report(self, patch: dict[str, Any], final: bool = False) -> None:
        if owned := OPERATOR_FIELDS & patch.keys():
            raise ValueError(
                f"status.{', status.'.join(sorted(owned))}: written by the operator alone; "
                "a workload reports progress and its own fields"
            )
        self._pending = patch
        now = time.monotonic()
        if final or now - self._last >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        patch, self._pending = self._pending, None
        self._last = time.monotonic()
        try:
            self.sink(patch)
            self.sent += 1
        except Exception as exc:  # reporting is best effort by design
            self.failures += 1
            log.warning("progress report failed (%s); training continues", exc)


def _stdout_sink(patch: dict[str, Any]) -> None:
    print(json.dumps({"status": patch}), file=sys.stdout, flush=True)


def _file_sink(path: str) -> ProgressSink:
    def sink(patch: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), "status": patch}) + "\n")

    return sink


def _kubernetes_sink(owner: OwnerRef) -> ProgressSink:
    """Patch the owner's status subresource with the pod's own ServiceAccount token."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call,unused-ignore]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call,unused-ignore]
    api = client.CustomObjectsApi()
    group, version = owner.api_version.split("/")
    plural = owner.kind.lower() + "s"

    def sink(patch: dict[str, Any]) -> None:
        api.patch_namespaced_custom_object_status(
            group, version, owner.namespace, plural, owner.name, {"status": patch}
        )

    return sink


def make_reporter(reporter: Reporter, owner: OwnerRef) -> ProgressReporter:
    """The :class:`ProgressReporter` a run spec asks for."""
    sink: ProgressSink
    if reporter.kind == "kubernetes":
        sink = _kubernetes_sink(owner)
    elif reporter.kind == "file":
        sink = _file_sink(reporter.path or "progress.jsonl")
    elif reporter.kind == "stdout":
        sink = _stdout_sink
    else:

        def sink(patch: dict[str, Any]) -> None:
            return None

    return ProgressReporter(sink, reporter.min_interval_seconds)
