"""The operator's watch cache: the latest body of every object its watches deliver.

kopf already watches Tailor's kinds and the children it labels (Jobs, Pods, Deployments);
its event handlers put each body here, so a reconcile reads its object, its Job and the
Job's pods from memory instead of a GET and a LIST per event (as controller-runtime's
informer caches do). What the operator writes itself (a status patch, an applied child) is
written through with the server's response, so the reconcile a Job event triggers right
after the Job was created already sees the FineTuneJob's new status.

Bodies are kept slim (:func:`slim`: no managedFields, no pod templates). A body replaces
the cached one only if its ``resourceVersion`` is not older, so a late
watch event or a GET never moves an object back in time. A miss (an object whose first
event has not arrived yet, as after a restart) is the caller's to fill with a GET.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Key = tuple[str, str, str]
"""(kind, namespace, name); children use their own kind (``Job``, ``Pod``, ``Deployment``)."""


def slim(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the reconciles read of a cached body, without the rest: never
    ``metadata.managedFields`` (often the largest part of an object); of a Job no pod
    template, of a Pod only metadata and status, of a Deployment only the template's
    metadata. controller-runtime's caches do the same with a transform; at 1,000 objects
    with their Jobs and pods it is most of the operator's memory."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    out = {k: v for k, v in body.items() if k not in ("metadata", "spec")}
    out["metadata"] = meta
    spec = body.get("spec")
    if spec is None or kind == "Pod":
        return out
    if kind == "Job":
        out["spec"] = {k: v for k, v in spec.items() if k != "template"}
    elif kind == "Deployment":
        template = spec.get("template") or {}
        out["spec"] = {
            **{k: v for k, v in spec.items() if k != "template"},
            "template": {"metadata": template.get("metadata") or {}},
        }
    else:
        out["spec"] = spec
    return out


def _version(body: dict[str, Any]) -> int | None:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or "")
    except ValueError:
        return None


class WatchCache:
    """Thread-safe latest bodies by (kind, namespace, name), pods also by their Job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._pods_by_job: dict[tuple[str, str], set[str]] = {}

    def put(self, kind: str, body: dict[str, Any]) -> None:
        body = slim(kind, body)
        meta = body["metadata"]
        key = (kind, meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            old = self._objects.get(key)
            if old is not None:
                new_v, old_v = _version(body), _version(old)
                if new_v is not None and old_v is not None and new_v < old_v:
                    return
            self._objects[key] = body
            if kind == "Pod":
                job = (meta.get("labels") or {}).get("job-name")
                if job:
                    self._pods_by_job.setdefault((key[1], job), set()).add(key[2])

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            body = self._objects.pop((kind, namespace, name), None)
            if kind == "Pod" and body is not None:
                job = ((body.get("metadata") or {}).get("labels") or {}).get("job-name")
                names = self._pods_by_job.get((namespace, job or ""))
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._pods_by_job[(namespace, job or "")]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((kind, namespace, name))

    def get_or_fetch(
        self,
        kind: str,
        namespace: str,
        name: str,
        fetch: Callable[[], dict[str, Any] | None],
    ) -> dict[str, Any] | None:
        """The cached body, else ``fetch()`` (a GET; None: not found), cached as well."""
        cached = self.get(kind, namespace, name)
        if cached is not None:
            return cached
        body = fetch()
        if body is not None:
            self.put(kind, body)
            return self.get(kind, namespace, name)
        return None

    def of_kind(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        """Every cached ``kind`` in ``namespace``."""
        with self._lock:
            return [v for (k, ns, _), v in self._objects.items() if k == kind and ns == namespace]

    def pods_of_job(self, namespace: str, job: str) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(self._pods_by_job.get((namespace, job), ()))
            return [self._objects[("Pod", namespace, n)] for n in names]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)
