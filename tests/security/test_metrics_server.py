"""The metrics port cannot be used to exhaust a process (docs/security.md, "Smaller"): the one
exposition server of every Tailor process (operator, training, indexing, serving) serves at
most MAX_CONNECTIONS connections at once and drops a silent one after its timeout. Before,
prometheus_client's server started a thread per connection without limit or timeout: 100
connections that send nothing held 100 threads for as long as they stayed open."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from tailor.observability import exposition
from tests.workloads.helpers import free_port


def test_idle_connections_hold_a_bounded_number_of_threads_and_time_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exposition._TimedHandler, "timeout", 1.0)
    registry = CollectorRegistry()
    Counter("tailor_probe", "a metric to scrape", registry=registry).inc()
    port = free_port()
    server = exposition.serve(port, registry=registry)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before <= exposition.MAX_CONNECTIONS
        time.sleep(1.5)  # past the timeout: the silent connections are dropped
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"tailor_probe_total 1.0" in body
    finally:
        for connection in idle:
            connection.close()
        server.shutdown()
