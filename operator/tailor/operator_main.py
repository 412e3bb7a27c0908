"""``tailor operator run``: start the kopf operator.

Tailor's own finalizer (``tailor.dev/finalizer``) and annotation prefix (``tailor.dev``)
mark what it owns; it runs standalone (one replica, no peering objects), serves a
liveness endpoint and Prometheus metrics, and logs one line per event. With
``--leader-election`` (the chart's default, two replicas) it reconciles only while it holds
the Lease ``tailor-operator`` (:mod:`tailor.controllers.leader`); a standby answers its
liveness probe and waits. Reconciles run on
the work queue's threads (``TAILOR_WORKERS``, default 16), and every unfinished resource
is reconciled again every ``TAILOR_RESYNC_SECONDS`` (default 300).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import kopf
from prometheus_client import start_http_server

import tailor.controllers as controllers
from tailor.api.settings import OperatorSettings
from tailor.controllers import context
from tailor.observability.operator import instrument_api_clients

log = logging.getLogger("tailor.operator")


def _load_handlers() -> None:
    """Import every controller module so that its kopf handlers are registered."""
    from tailor.controllers import (  # noqa: F401
        children,
        finetunejob,
        knowledgebase,
        local,
        modeldeployment,
        promptprofile,
        raftjob,
    )


def _quiet_watch_handlers(record: logging.LogRecord) -> bool:
    """Drop kopf's "Handler 'pod_event' succeeded." lines: the watch handlers run for every
    event of every object (a line per pod event in a burst) and only cache and enqueue.
    The operator logs each phase change instead; ``--verbose`` keeps everything."""
    message = record.getMessage()
    return not (
        record.levelno == logging.INFO
        and message.startswith("Handler '")
        and message.endswith("' succeeded.")
        and ("-dependents'" in message or "_event'" in message)
    )


def make_runtime(settings: OperatorSettings, api_client: Any) -> Any:
    if settings.runtime == "local":
        from tailor.runtime.local import LocalRuntime

        return LocalRuntime(settings, api_client)
    from tailor.runtime.kubernetes import KubernetesRuntime

    return KubernetesRuntime(settings, api_client)


class KnowledgeBaseEssence(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, built only for KnowledgeBases. For every event of every watched
    object kopf deep-copies the body into an "essence" to diff it against the last one its
    change handlers saw; only KnowledgeBase has such handlers (its deletion handler and
    refresh timer): every other kind reconciles from its watch handler and
    ``observedGeneration``. Skipping the copy for Jobs, Pods and the other kinds saved
    about a tenth of the operator's CPU in the burst benchmark."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        if body.get("kind") != "KnowledgeBase":
            return None
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: Any) -> Any:
        if body.get("kind") != "KnowledgeBase":
            return None
        return super().fetch(body=body)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "tailor.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tailor.dev")
    settings.persistence.diffbase_storage = KnowledgeBaseEssence(
        prefix="tailor.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    # kopf's handlers only enqueue (the reconciles run on the work queue's own threads),
    # except a KnowledgeBase's deletion handler: a few threads are plenty.
    settings.execution.max_workers = 8
    context.operator().queue  # noqa: B018  (its threads start with the operator)
    settings.batching.worker_limit = 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailor operator")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch only these (repeatable)"
    )
    run.add_argument("--runtime", choices=["kubernetes", "local"], default=None)
    run.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("TAILOR_OPERATOR_METRICS_PORT", "8081")),
    )
    run.add_argument(
        "--health-port",
        type=int,
        default=int(os.environ.get("TAILOR_OPERATOR_HEALTH_PORT", "8080")),
    )
    run.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("TAILOR_LEADER_ELECTION", "").lower() in ("1", "true", "yes"),
        help="run as one of several replicas: reconcile only while holding the Lease",
    )
    run.add_argument(
        "--lease-namespace",
        default=os.environ.get("TAILOR_LEASE_NAMESPACE") or os.environ.get("POD_NAMESPACE"),
        help="namespace of the Lease (default: the pod's, else default)",
    )
    run.add_argument("--lease-name", default=os.environ.get("TAILOR_LEASE_NAME", "tailor-operator"))
    run.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(_quiet_watch_handlers)
    settings = OperatorSettings.from_env()
    if args.runtime:
        settings.runtime = args.runtime
    from tailor.runtime.kubernetes import load_api_client

    instrument_api_clients()
    api_client = load_api_client(pool_size=settings.workers + 16)
    context.OPERATOR = context.Operator(
        settings, make_runtime(settings, api_client), api_client, namespaces=args.namespace
    )
    _load_handlers()
    if args.metrics_port:
        start_http_server(args.metrics_port)
    elector = None
    if args.leader_election:
        from tailor.controllers.leader import LeaderElector

        elector = LeaderElector(api_client, args.lease_namespace or "default", args.lease_name)
        with _standby_health(args.health_port):  # a standby is alive, not leading
            elector.acquire()
    context.OPERATOR.start_resync()
    log.info(
        "starting: runtime=%s namespaces=%s metrics=:%s health=:%s",
        settings.runtime,
        ",".join(args.namespace) or "all",
        args.metrics_port,
        args.health_port,
    )
    try:
        asyncio.run(
            kopf.operator(
                standalone=True,
                clusterwide=not args.namespace,
                namespaces=args.namespace,
                liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
            )
        )
    finally:
        context.OPERATOR.stop()
        if elector is not None:
            elector.release()
    return 0


@contextlib.contextmanager
def _standby_health(port: int) -> Iterator[None]:
    """Answer /healthz while standing by (kopf serves it once this replica leads)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path.startswith("/healthz") else 404)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Health) if port else None
    if server is not None:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


__all__ = ["controllers", "main"]
