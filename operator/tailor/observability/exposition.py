"""The one HTTP server every Tailor process exposes its Prometheus metrics with (the operator,
training, indexing and serving pods).

prometheus_client's ``start_http_server`` starts a thread per connection, without a limit
and without a timeout: a client that opens many connections, or sends its request a byte at
a time, holds a thread each until the process runs out. Here at most ``MAX_CONNECTIONS``
are served at once (more are closed at once: a scraper retries at its next interval) and a
connection that sends nothing for ``TIMEOUT_SECONDS`` is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

MAX_CONNECTIONS = 16
TIMEOUT_SECONDS = 10.0

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _TimedHandler(_SilentHandler):
    timeout = TIMEOUT_SECONDS  # socket timeout of each connection (StreamRequestHandler)


class BoundedWSGIServer(ThreadingWSGIServer):
    """A thread per connection, at most ``MAX_CONNECTIONS`` of them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once, not queued
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(port: int, app: WSGIApp | None = None, registry: CollectorRegistry = REGISTRY) -> Any:
    """Serve ``app`` (default: the metrics of ``registry``) on ``port``, all interfaces, in a
    daemon thread; returns the server (``shutdown()`` stops it)."""
    server = make_server(
        "", port, app or make_wsgi_app(registry), BoundedWSGIServer, handler_class=_TimedHandler
    )
    threading.Thread(target=server.serve_forever, name="tailor-metrics", daemon=True).start()
    return server
