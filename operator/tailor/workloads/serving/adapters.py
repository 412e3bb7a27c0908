"""Adapters of a running server, changed without a restart.

The operator writes a ModelDeployment's adapters into the server's spec file (a mounted
ConfigMap; the kubelet refreshes it in place, within its sync period of about a minute).
:class:`SpecWatcher` notices the change and :class:`AdapterSet` makes the engine serve
exactly the new list: new adapters are fetched (S3) and loaded, a changed artifact under
the same name is loaded and then replaces the old one, removed ones are unloaded. The
engine does the loading in place (the builtin engine between two batch steps, vLLM
through its runtime adapter API), so no pod restarts and no request fails.

What a replica serves is on its metrics port as ``GET /adapters`` (JSON), which the
operator reads into the ModelDeployment's status.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from tailor.api.common import split_s3_uri
from tailor.api.workloads import Paths, ServedAdapter, ServeRun
from tailor.observability.exposition import serve
from tailor.observability.serving import ServingMetrics
from tailor.workloads.io.storage import check_manifest, pull_model, store_of

log = logging.getLogger("tailor.workloads.serving.adapters")

ADAPTERS_PATH = "/adapters"
"""Where a replica's metrics port reports the adapters it serves."""


class AdapterEngine(Protocol):
    @property
    def adapter_names(self) -> list[str]: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...


def pull_adapters(run: ServeRun) -> None:
    """Adapters published to the object store, downloaded into this pod (each file checked
    against the upload's marker) before anything loads."""
    for adapter in run.adapters:
        pull_adapter(adapter, run.paths)


def pull_adapter(adapter: ServedAdapter, paths: Paths) -> None:
    """One adapter from the object store into this pod (nothing to fetch for one on a
    volume); ``adapter.path`` is then where it is. An adapter a run published is checked
    against the manifest checksum the operator recorded in that run's status (the marker
    beside an upload only proves the upload is complete, not whose it is)."""
    location = split_s3_uri(adapter.uri)
    if location is not None:
        store = store_of(paths)
        if store is not None and adapter.path and store.holds(adapter.path):
            store.pull(store.relative(adapter.path))
        else:  # written by a run with its own store: fetched once into the model cache
            bucket, key = location
            adapter.path = str(pull_model((bucket, key.strip("/")), paths))
    if adapter.sha256:
        check_manifest(Path(adapter.path), adapter.sha256)


class AdapterSet:
    """The adapters a server serves, and the changes that make it serve another list."""

    def __init__(
        self,
        adapters: Sequence[ServedAdapter],
        revision: str | None,
        paths: Paths,
        fetch: Callable[[ServedAdapter, Paths], None],
        check: Callable[[Sequence[ServedAdapter]], None],
        metrics: ServingMetrics | None = None,
    ):
        self.paths = paths
        self.fetch = fetch
        self.check = check
        self.metrics = metrics
        now = time.time()
        self.served: dict[str, ServedAdapter] = {a.name: a for a in adapters}
        self.local: dict[str, ServedAdapter] = {a.name: a for a in adapters}
        """The served adapters where this server reads them (fetched from S3)."""
        self.loaded_at: dict[str, float] = {a.name: now for a in adapters}
        self.errors: dict[str, str] = {}
        self.wanted = self.revision = revision
        """The revision asked for last, and the last one served in full."""
        self._lock = threading.Lock()

    def apply(
        self,
        engine: AdapterEngine,
        wanted: Sequence[ServedAdapter],
        revision: str | None,
        reload: Callable[[list[ServedAdapter]], None] | None = None,
    ) -> bool:
        """Make ``engine`` serve ``wanted`` (the operator's ``revision`` of them); True when
        every adapter in it is served. An adapter that fails to load is reported in
        :attr:`errors` (and its old version, if any, keeps serving); the others go on.
        With ``reload`` (an engine that cannot load adapters into its model), the whole
        new list goes to it at once: it starts a new engine and swaps it in."""
        with self._lock:
            self.wanted = revision
            names = {a.name for a in wanted}
            if reload is not None:
                return self._apply_by_reload(wanted, revision, reload)
            for name in [n for n in self.served if n not in names]:
                engine.unload_adapter(name)
                del self.served[name], self.local[name]
                self.loaded_at.pop(name, None)
                self.errors.pop(name, None)
                self._count("unload", "ok")
                log.info("adapter %s: unloaded", name)
            for adapter in wanted:
                current = self.served.get(adapter.name)
                if current is not None and current.source == adapter.source:
                    continue
                if self.errors.get(adapter.name, "").startswith(adapter.source + ": "):
                    continue  # failed on these same weights: retried when they change
                started = time.perf_counter()
                try:
                    pending = self._fetched(adapter)
                    engine.load_adapter(adapter.name, pending.path)
                except Exception as exc:  # reported, the server goes on with the others
                    self._failed(adapter, exc)
                    continue
                self.served[adapter.name] = adapter
                self.local[adapter.name] = pending
                self.loaded_at[adapter.name] = time.time()
                self.errors.pop(adapter.name, None)
                self._count("load", "ok")
                log.info("adapter %s: %s %s in %.1f s", adapter.name,
                         "replaced by" if current else "loaded from", adapter.source,
                         time.perf_counter() - started)  # fmt: skip
            served = not any(name in self.errors for name in names)
            if served:
                self.revision = revision
            return served

    def _apply_by_reload(
        self,
        wanted: Sequence[ServedAdapter],
        revision: str | None,
        reload: Callable[[list[ServedAdapter]], None],
    ) -> bool:
        final: list[ServedAdapter] = []  # local copies, in the order wanted
        chosen: dict[str, ServedAdapter] = {}
        changed = [n for n in self.served if n not in {a.name for a in wanted}]
        for adapter in wanted:
            current = self.served.get(adapter.name)
            if current is not None and current.source == adapter.source:
                final.append(self.local[adapter.name])
                chosen[adapter.name] = current
                continue
            try:
                pending = self._fetched(adapter)
            except Exception as exc:
                self._failed(adapter, exc)
                if current is not None:  # the old version goes on
                    final.append(self.local[adapter.name])
                    chosen[adapter.name] = current
                continue
            final.append(pending)
            chosen[adapter.name] = adapter
            changed.append(adapter.name)
        if changed:
            started = time.perf_counter()
            try:
                reload(final)
            except Exception as exc:
                for name in changed:
                    if name in chosen:
                        self._failed(chosen[name], exc)
                return False
            now = time.time()
            for name in changed:
                if name not in chosen:
                    self._count("unload", "ok")
                    self.loaded_at.pop(name, None)
                    self.errors.pop(name, None)
                elif self.served.get(name) is not chosen[name]:
                    self._count("load", "ok")
                    self.loaded_at[name] = now
                    self.errors.pop(name, None)
            self.served = chosen
            self.local = {a.name: a for a in final}
            log.info("adapters %s served by a new engine (%.1f s)",
                     ", ".join(chosen) or "(none)", time.perf_counter() - started)  # fmt: skip
        served = not any(a.name in self.errors for a in wanted)
        if served:
            self.revision = revision
        return served

    def _fetched(self, adapter: ServedAdapter) -> ServedAdapter:
        """A copy of ``adapter`` where this server reads it: fetched (S3) and checked."""
        local = adapter.model_copy()
        self.fetch(local, self.paths)
        self.check([local])
        return local

    def _failed(self, adapter: ServedAdapter, exc: Exception) -> None:
        message = str(getattr(exc, "message", None) or exc)
        self.errors[adapter.name] = f"{adapter.source}: {message}"
        self._count("load", "error")
        log.error("adapter %s: could not load %s: %s", adapter.name, adapter.source, message)

    def report(self) -> dict[str, Any]:
        """What ``GET /adapters`` answers."""
        with self._lock:
            return {
                "adapters": [
                    {
                        "name": name,
                        "source": adapter.source,
                        "loadedAt": time.strftime(
                            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at[name])
                        ),
                    }
                    for name, adapter in self.served.items()
                ],
                "errors": [{"name": n, "message": m} for n, m in sorted(self.errors.items())],
                "wanted": self.wanted,
                "revision": self.revision,
            }

    def _count(self, action: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_adapter_change(action, result)


class SpecWatcher:
    """Polls the server's spec file; a changed adapter list is applied in place."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[ServeRun], None],
        interval: float = 2.0,
    ):
        self.path = path
        self.on_change = on_change
        self.interval = interval
        # None: the first poll applies the file as it is then (a no-op when unchanged), so
        # a change made while the server started (an S3 adapter downloading) is not missed
        self._seen: bytes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tailor-spec-watch", daemon=True)

    def start(self) -> SpecWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()  # through the kubelet's ..data symlink: atomic
        except OSError:
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            text = self._read()
            if text is None or text == self._seen:
                continue
            self._seen = text
            try:
                run = ServeRun.model_validate_json(text)
            except ValidationError as exc:
                log.error("the changed spec file %s is invalid, ignored: %s", self.path, exc)
                continue
            try:
                self.on_change(run)
            except Exception:
                log.exception("applying the changed spec file failed")


def metrics_app(registry: Any, report: Callable[[], dict[str, Any]]) -> Any:
    """The metrics port's WSGI app: Prometheus metrics, and ``GET /adapters``."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == ADAPTERS_PATH:
            body = json.dumps(report()).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return app


def serve_metrics(port: int, registry: Any, report: Callable[[], dict[str, Any]]) -> None:
    """Serve :func:`metrics_app` on ``port`` (all interfaces) in a daemon thread."""
    serve(port, metrics_app(registry, report))
