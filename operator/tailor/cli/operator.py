"""``tailor operator run``: start the kopf operator.

Tailor's own finalizer (``tailor.dev/finalizer``) and annotation prefix (``tailor.dev``)
mark what it owns (its kopf settings: ``operator_kopf``); it runs standalone (one replica,
no peering objects), serves a liveness endpoint and Prometheus metrics, and logs one line
per event. With ``--leader-election`` (the chart's default, two replicas) it reconciles only
while it holds the Lease ``tailor-operator`` (:mod:`tailor.controllers.leader`); a standby
answers its liveness probe and waits. Reconciles run on the work queue's threads
(``TAILOR_WORKERS``, default 16), and every unfinished resource is reconciled again every
``TAILOR_RESYNC_SECONDS`` (default 300). kopf and the controllers are imported only when
the operator runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailor.api.settings import OperatorSettings

log = logging.getLogger("tailor.operator")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    operator = commands.add_parser("operator", help="`tailor operator run`: start the operator")
    sub = operator.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch only these (repeatable)"
    )
    run.add_argument(
        "--exclude-namespace",
        action="append",
        default=[],
        help="cluster-wide: never reconcile in this namespace (repeatable)",
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
    run.set_defaults(handler=run_operator)
    release = sub.add_parser(
        "release-finalizers",
        help="remove Tailor's finalizer from every Tailor object (the chart's post-delete "
        "hook: without the operator, nothing would ever remove it and the objects and their "
        "namespaces could never be deleted)",
    )
    release.add_argument(
        "-n", "--namespace", action="append", default=[], help="only these (repeatable)"
    )
    release.set_defaults(handler=release_finalizers)


FINALIZER = "tailor.dev/finalizer"


def release_finalizers(args: argparse.Namespace) -> int:
    """Remove ``tailor.dev/finalizer`` from every Tailor object in ``args.namespace`` (all
    namespaces when none), leaving other finalizers. Each patch carries the object's
    resourceVersion, so one written meanwhile is read again rather than overwritten."""
    from kubernetes.client.exceptions import ApiException

    from tailor.api import GROUP, KINDS, VERSION
    from tailor.runtime import rest
    from tailor.runtime.kubernetes import load_api_client

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    api_client = load_api_client()
    api_version = f"{GROUP}/{VERSION}"
    released = 0
    for kind in KINDS.values():
        for namespace in args.namespace or [None]:
            listed = rest.request(api_client, "GET", rest.path(api_version, kind.plural, namespace))
            for item in listed.get("items") or []:
                meta = item["metadata"]
                path = rest.path(api_version, kind.plural, meta["namespace"], meta["name"])
                for _ in range(5):  # 409: someone wrote it since it was read; read it again
                    if FINALIZER not in (meta.get("finalizers") or []):
                        break
                    kept = [f for f in meta["finalizers"] if f != FINALIZER]
                    patch = {"metadata": {"finalizers": kept,
                                          "resourceVersion": meta["resourceVersion"]}}  # fmt: skip
                    try:
                        rest.request(
                            api_client, "PATCH", path, patch, content_type=rest.MERGE_PATCH
                        )
                    except ApiException as exc:
                        if exc.status == 404:  # gone already
                            break
                        if exc.status != 409:
                            raise
                        meta = rest.request(api_client, "GET", path)["metadata"]
                        continue
                    released += 1
                    log.info("released %s %s/%s", kind.kind, meta["namespace"], meta["name"])
                    break
    log.info("released the finalizer of %d objects", released)
    return 0


def make_runtime(settings: OperatorSettings, api_client: Any) -> Any:
    if settings.runtime == "local":
        from tailor.runtime.local import LocalRuntime

        return LocalRuntime(settings, api_client)
    from tailor.runtime.kubernetes import KubernetesRuntime

    return KubernetesRuntime(settings, api_client)


def run_operator(args: argparse.Namespace) -> int:
    import asyncio

    import kopf

    from tailor.api.settings import OperatorSettings
    from tailor.cli import operator_kopf
    from tailor.controllers import context
    from tailor.observability.exposition import serve
    from tailor.observability.operator import instrument_api_clients
    from tailor.runtime.kubernetes import load_api_client

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(operator_kopf.quiet_watch_handlers)
    settings = OperatorSettings.from_env()
    if args.runtime:
        settings.runtime = args.runtime
    instrument_api_clients()
    api_client = load_api_client(pool_size=settings.workers + 16)
    context.OPERATOR = context.Operator(
        settings,
        make_runtime(settings, api_client),
        api_client,
        namespaces=args.namespace,
        excluded_namespaces=args.exclude_namespace,
    )
    operator_kopf.load_handlers()
    if args.metrics_port:
        serve(args.metrics_port)
    elector = None
    if args.leader_election:
        from tailor.controllers.leader import LeaderElector

        elector = LeaderElector(api_client, args.lease_namespace or "default", args.lease_name)
        with _standby_health(args.health_port):  # a standby is alive, not leading
            elector.acquire()
    context.OPERATOR.start_resync()
    log.info(
        "starting: runtime=%s namespaces=%s excluded=%s metrics=:%s health=:%s",
        settings.runtime,
        ",".join(args.namespace) or "all",
        ",".join(args.exclude_namespace) or "none",
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
