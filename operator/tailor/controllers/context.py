"""What every controller shares: the settings, the runtime, access to Tailor objects, and
status writing with conditions, events and metrics.

Reconciliation is level-triggered: ``sync(kind, namespace, name)`` reads the object,
works out where it stands from its children, applies what is missing and writes status.
Parent handlers, child (Job, Pod, Deployment) events, dependency changes and the periodic
resync only ``enqueue`` the object; the work queue (:mod:`tailor.controllers.workqueue`)
runs one sync per object at a time, coalesces events that arrive meanwhile and retries
failures with backoff, so the outcome never depends on which event arrived first and no
event's work is lost to an error.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tailor.api import GROUP, KINDS, VERSION, valid_spec
from tailor.api.settings import OperatorSettings
from tailor.controllers.egress import refused_egress
from tailor.controllers.placement import refused_placement
from tailor.controllers.provenance import unpinned_revision
from tailor.controllers.secrets import unusable_secret
from tailor.controllers.storage import refused_storage
from tailor.controllers.workqueue import WorkQueue
from tailor.observability.operator import PHASES, reconciling
from tailor.runtime import rest
from tailor.runtime.base import Runtime
from tailor.runtime.cache import WatchCache

log = logging.getLogger("tailor.operator")

SyncFn = Callable[["Operator", dict[str, Any]], None]
# Phases after which only a spec change (a new generation) gives a resync anything to do.
FINAL = frozenset({"Succeeded", "Failed", "Invalid", "Valid"})
SYNCERS: dict[str, SyncFn] = {}
SECRET_RECHECK_SECONDS = 10.0
"""How soon an object waiting for a Secret to exist or opt in is checked again."""
EXTERNAL_INPUTS: dict[str, Callable[[dict[str, Any]], bool]] = {}
"""Per kind: whether an object reads an input no watch delivers (a PromptProfile's pool
ConfigMap), so each resync reconciles it even when it is settled. These kinds also honour
the ``tailor.dev/reconcile-requested-at`` annotation (:func:`children.needs_sync`): their
sync echoes it in ``status.lastHandledReconcileAt``."""


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
    namespaces: list[str] = field(default_factory=list)
    """Watched namespaces; empty: cluster-wide."""
    excluded_namespaces: list[str] = field(default_factory=list)
    """Namespaces never reconciled in (cluster-wide mode: kube-system and the like). kopf
    still watches them (one cluster-wide watch per kind); nothing there is enqueued."""
    cache: WatchCache = field(default_factory=WatchCache)
    """Latest bodies from the watches (:mod:`tailor.runtime.cache`), shared with the
    runtime, which reads Jobs, pods and Deployments from it."""
    _queue: WorkQueue | None = None
    _start: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if hasattr(self.runtime, "cache"):
            self.runtime.cache = self.cache

    @property
    def queue(self) -> WorkQueue:
        with self._start:
            if self._queue is None:
                self._queue = WorkQueue(lambda key: self.sync(*key), self.settings.workers)
            return self._queue

    def enqueue(self, kind: str, namespace: str, name: str) -> None:
        """Reconcile one object soon (coalesced, retried on failure); never one in an
        excluded namespace."""
        if namespace in self.excluded_namespaces:
            return
        self.queue.add((kind, namespace, name))

    def start_resync(self) -> threading.Thread | None:
        """Every ``resync_seconds``, enqueue each object that is not finished."""
        interval = self.settings.resync_seconds
        if not interval:
            return None
        thread = threading.Thread(target=self._resync_loop, name="tailor-resync", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._queue.stop()

    def _resync_loop(self) -> None:
        while not self._stop.wait(self.settings.resync_seconds):
            try:
                self.resync()
            except Exception as exc:  # the next round tries again
                log.warning("resync failed: %s", exc)

    def resync(self) -> int:
        """Enqueue every object not in a final phase, or whose spec was not yet handled."""
        count = 0
        for kind in SYNCERS:
            for body in self.list_all(kind):
                meta, status = body["metadata"], body.get("status") or {}
                settled = status.get("phase") in FINAL and status.get(
                    "observedGeneration"
                ) == meta.get("generation")
                external = EXTERNAL_INPUTS.get(kind)
                if not settled or (external is not None and external(body)):
                    self.enqueue(kind, meta["namespace"], meta["name"])
                    count += 1
        return count

    def list_all(self, kind: str) -> list[dict[str, Any]]:
        """Every object of ``kind`` in the watched namespaces."""
        if self.namespaces:
            return [obj for ns in self.namespaces for obj in self.list(kind, ns)]
        result = rest.request(self.api_client, "GET", self._path(kind))
        return cast(list[dict[str, Any]], result["items"])

    def _path(self, kind: str, namespace: str | None = None, name: str = "") -> str:
        return rest.path(f"{GROUP}/{VERSION}", KINDS[kind].plural, namespace, name)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object from the watch cache; a GET (cached too) when the watch has not
        delivered it yet."""

        def fetch() -> dict[str, Any] | None:
            try:
                return rest.request(self.api_client, "GET", self._path(kind, namespace, name))
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        return self.cache.get_or_fetch(kind, namespace, name, fetch)

    def list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        result = rest.request(self.api_client, "GET", self._path(kind, namespace))
        return cast(list[dict[str, Any]], result["items"])

    def patch_spec(self, body: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        """Merge ``spec`` into another object's spec, at the resourceVersion read (a change
        made meanwhile is a 409, retried by the work queue with the object read again);
        what an AdaptationLoop does to its ModelDeployment. The written object."""
        meta = body["metadata"]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "spec": spec}
        written = rest.request(
            self.api_client,
            "PATCH",
            self._path(body["kind"], meta["namespace"], meta["name"]),
            patch,
            content_type=rest.MERGE_PATCH,
        )
        self.cache.put(body["kind"], written)
        return written

    def patch_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge ``status`` into the object's status; emit an event on a phase change."""
        meta = body["metadata"]
        old = body.get("status") or {}
        kind = body["kind"]
        if not changed(old, status):
            PHASES.record(kind, meta["namespace"], meta["name"], old.get("phase"))
            return
        try:
            written = rest.request(
                self.api_client,
                "PATCH",
                self._path(kind, meta["namespace"], meta["name"]) + "/status",
                {"status": status},
                content_type=rest.MERGE_PATCH,
            )
        except ApiException as exc:
            if exc.status == 404:
                self.cache.delete(kind, meta["namespace"], meta["name"])
                return  # deleted meanwhile
            raise
        # Written through: the next sync (a child's event may trigger it before this
        # patch's own watch event arrives) sees the new status.
        self.cache.put(kind, written)
        phase = status.get("phase", old.get("phase"))
        PHASES.record(kind, meta["namespace"], meta["name"], phase)
        if phase == old.get("phase"):
            return
        reason, message = _phase_reason(status)
        log.info("%s %s/%s: %s -> %s (%s)%s", kind, meta["namespace"], meta["name"],
                 old.get("phase") or "new", phase, reason or "-",
                 f": {message}" if message else "")  # fmt: skip
        # An Event per phase change, except the first Pending (every object starts there;
        # the event would only add a request per object to a burst).
        if not (phase == "Pending" and not old.get("phase")):
            warning = phase in ("Failed", "Invalid", "Degraded")
            self.event(
                body,
                "Warning" if warning else "Normal",
                reason or phase,
                message or f"{kind} is {phase}",
            )

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a Kubernetes Event about ``body`` (best effort, as kopf's are). Reconciles
        run on the work queue's threads, outside kopf's handler context, so they post
        through the API client rather than ``kopf.event``."""
        meta = body["metadata"]
        stamp = dt.datetime.now(dt.UTC)
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": body["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "tailor-operator"},
            "reportingComponent": "tailor.dev/operator",
            "reportingInstance": os.environ.get("HOSTNAME", "tailor-operator"),
            "firstTimestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        }
        try:
            rest.request(
                self.api_client, "POST", rest.path("v1", "events", meta["namespace"]), event
            )
        except Exception as exc:  # best effort: a failed Event must not fail the sync,
            # whose retry would find the phase written and post no Event at all
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"],
                        meta["name"], getattr(exc, "reason", None) or exc)  # fmt: skip

    def sync(self, kind: str, namespace: str, name: str) -> None:
        """Reconcile one object now; the work queue runs one per object at a time."""
        with reconciling(kind):
            body = self.get(kind, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            status = body.get("status") or {}
            settled = status.get("phase") in FINAL and status.get("observedGeneration") == body[
                "metadata"
            ].get("generation")
            refused = None if settled else self.admission_problem(body)
            # before any pod: see tailor.controllers.secrets, .egress, .storage, .placement,
            # .provenance
            if refused:
                reason, message = refused
                generation = body["metadata"].get("generation")
                self.patch_status(
                    body,
                    {
                        "phase": "Pending",
                        "conditions": condition(
                            status.get("conditions"), "Ready", False, reason, message,
                            generation,
                        ),
                    },
                )  # fmt: skip
                if reason == "SecretNotUsable":  # no watch on Secrets: look again soon
                    self.queue.add_after((kind, namespace, name), SECRET_RECHECK_SECONDS)
                return
            SYNCERS[kind](self, body)

    def admission_problem(self, body: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, message) when the object may not start pods as it is: a URL the admin's
        egress policy does not allow, an s3:// URI outside the namespace's folder, a
        priority class or toleration the admin does not allow, a Hub model not pinned to a
        commit where the admin requires it, or a Secret that did not opt in; else None."""
        spec = valid_spec(body)  # parsed once for every check
        if spec is None:
            return None  # the kind's sync reports it
        egress = refused_egress(spec, self.settings.egress)
        if egress:
            return "EgressNotAllowed", egress
        storage = refused_storage(spec, self.settings, body["metadata"]["namespace"])
        if storage:
            return "StorageNotAllowed", storage
        placement = refused_placement(spec, self.settings.pods)
        if placement:
            return "PlacementNotAllowed", placement
        if self.settings.require_pinned_revisions:
            unpinned = unpinned_revision(spec)
            if unpinned:
                return "RevisionNotPinned", unpinned
        secret = unusable_secret(body, spec, self.settings, self.secret_metadata)
        return ("SecretNotUsable", secret) if secret else None

    def create_secret_once(self, manifest: dict[str, Any]) -> None:
        """Create a Secret the operator generates (a ModelDeployment's test key) unless it
        exists: its value is made once and never written again."""
        meta = manifest["metadata"]
        try:
            rest.request(
                self.api_client, "POST", rest.path("v1", "secrets", meta["namespace"]), manifest
            )
        except ApiException as exc:
            if exc.status != 409:
                raise

    def secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret's metadata (labels, annotations), never its data: the API server
        answers with PartialObjectMetadata. None when it does not exist."""
        try:
            found = rest.request(
                self.api_client,
                "GET",
                rest.path("v1", "secrets", namespace, name),
                accept="application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], found.get("metadata") or {})


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


def condition_of(status: dict[str, Any], type_: str) -> dict[str, Any]:
    """The condition of ``type_`` in a status (empty when it has none)."""
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


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
