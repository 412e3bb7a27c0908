"""No request takes a serving replica down or reaches past what its caller may do
(docs/security.md, "Serving"): the real serving process over HTTP (uvicorn, the builtin
engine on the tiny model), with the admin's limits set small.

Before, any caller could send ``tailor.promptProfile``: its template rendered on the event
loop (``center(2000000000)``, nested loops: memory or CPU gone, ``/healthz`` stalled, the
kubelet restarted the pod) and it replaced the operator's system prompt; bodies, message
counts and ``max_tokens`` were bounded only by memory and the context window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tailor.api.workloads import TEST_KEY_HEADER
from tests.workloads.helpers import free_port, tiny_model_volume, wait_until_ready

pytestmark = pytest.mark.workloads

TEST_KEY = "a-random-test-key"
LIMITS = {"maxBodyBytes": 65536, "maxMessages": 8, "maxTokens": 16, "templateSeconds": 1.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    tiny_model_volume(root / "pvcs")
    (root / "secrets" / "md-test-key").mkdir(parents=True)
    (root / "secrets" / "md-test-key" / "key").write_text(TEST_KEY)
    port = free_port()
    spec = {
        "spec": {"baseModel": {"pvc": {"claimName": "models", "path": "tiny"}}},
        "servedName": "md",
        "owner": {"kind": "ModelDeployment", "namespace": "test", "name": "md"},
        "paths": {"artifacts": str(root), "pvcs": str(root / "pvcs"),
                  "secrets": str(root / "secrets")},
        "limits": LIMITS,
        "testKeySecretRef": {"name": "md-test-key", "key": "key"},
        "host": "127.0.0.1",
        "port": port,
        "metricsPort": free_port(),
    }  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tailor.workloads.serving.app", "--spec", str(root / "spec.json")],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, process)
    yield base
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def chat(base: str, *, key: str | None = None, timeout: float = 30, **body: Any) -> httpx.Response:
    request = {"model": "md", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
               "temperature": 0, **body}  # fmt: skip
    headers = {TEST_KEY_HEADER: key} if key else {}
    return httpx.post(f"{base}/v1/chat/completions", json=request, headers=headers,
                      timeout=timeout)  # fmt: skip


def profile(template: str) -> dict[str, Any]:
    return {"tailor": {"promptProfile": {"template": template}}}


@pytest.mark.parametrize(
    "template",
    [
        "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
        "{{ question | center(2000000000) }}",
        "{{ lipsum(100000, false, 50, 100) }}",
        "{% set n = namespace(s=question) %}{% for i in range(40) %}{% set n.s = n.s ~ n.s %}"
        "{% endfor %}{{ n.s }}",
    ],
    ids=["nested-loops", "center", "lipsum", "doubling"],
)
def test_an_abusive_template_is_refused_within_seconds_while_healthz_answers(
    server: str, template: str
) -> None:
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert httpx.get(f"{server}/healthz", timeout=5).text == "ok"
            probes.append(time.monotonic() - started)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.monotonic()
    try:
        answer = chat(server, key=TEST_KEY, **profile(template))
    finally:
        done.set()
        prober.join()
    took = time.monotonic() - started
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_prompt"
    assert took < 3.0, took  # the 1 s limit (the worker was started with the server)
    # the event loop was never held for the render (it would be until the kill, 1 s and more)
    assert probes and max(probes) < 1.0, probes
    assert chat(server).status_code == 200  # and the server still answers


def test_a_prompt_profile_needs_the_test_key(server: str) -> None:
    benign = profile("Answer: {{ question }}")
    for key in (None, "a-guess"):
        refused = chat(server, key=key, **benign)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["param"] == "tailor.promptProfile"
        assert TEST_KEY not in refused.text
    assert chat(server, key=TEST_KEY, **benign).status_code == 200


def test_oversized_requests_are_refused_naming_the_limit(server: str) -> None:
    big = chat(server, messages=[{"role": "user", "content": "x" * 70_000}])
    assert big.status_code == 413 and "maxBodyBytes" in big.json()["error"]["message"]
    many = chat(server, messages=[{"role": "user", "content": "hi"}] * 9)
    assert many.status_code == 400 and many.json()["error"]["param"] == "messages"
    assert "maxMessages" in many.json()["error"]["message"]
    long = chat(server, max_tokens=17)
    assert long.status_code == 400 and long.json()["error"]["param"] == "max_tokens"
    assert "maxTokens" in long.json()["error"]["message"]
    # streamed without a Content-Length: counted as it comes
    chunks = (b'{"model": "md", "messages": [' + b" " * 70_000 + b"]}" for _ in range(1))
    streamed = httpx.post(f"{server}/v1/chat/completions", content=chunks, timeout=30)
    assert streamed.status_code == 413
    assert chat(server, max_tokens=16).status_code == 200
