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
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tailor.api.workloads import TEST_KEY_HEADER
from tests.workloads.helpers import free_port, tiny_model_volume, wait_until_ready

pytestmark = pytest.mark.workloads

TEST_KEY = "a-random-test-key"
ALL_KEY = "key-for-every-model"  # auth.apiKeySecretRef
A_KEY = "key-for-adapter-a"  # auth.keys[0]: adapter a only
LIMITS = {"maxBodyBytes": 65536, "maxMessages": 8, "maxTokens": 16, "templateSeconds": 1.0,
          "prepareSeconds": 1.0, "maxConcurrentRequests": 4, "cacheMaxEntries": 2}  # fmt: skip


def secret(root: Path, name: str, value: str) -> dict[str, str]:
    (root / "secrets" / name).mkdir(parents=True)
    (root / "secrets" / name / "key").write_text(value)
    return {"name": name, "key": "key"}


def tiny_adapter(model_dir: Path, out: Path) -> None:
    """An (untrained) LoRA adapter of the tiny model: scopes need adapters, not answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(out)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    tiny_model_volume(root / "pvcs")
    for name in ("a", "b"):
        tiny_adapter(root / "pvcs" / "models" / "tiny", root / "pvcs" / "models" / name)
    test_key = secret(root, "md-test-key", TEST_KEY)
    auth = {"apiKeySecretRef": secret(root, "md-api-key", ALL_KEY),
            "keys": [{"secretRef": secret(root, "md-key-a", A_KEY), "adapters": ["a"]}]}  # fmt: skip
    port = free_port()
    spec = {
        "spec": {
            "baseModel": {"pvc": {"claimName": "models", "path": "tiny"}},
            "adapters": [{"name": n, "pvc": {"claimName": "models", "path": n}} for n in "ab"],
            "auth": auth,
        },
        "adapters": [{"name": n, "path": str(root / "pvcs" / "models" / n)} for n in "ab"],
        "servedName": "md",
        "owner": {"kind": "ModelDeployment", "namespace": "test", "name": "md"},
        "paths": {"artifacts": str(root), "pvcs": str(root / "pvcs"),
                  "secrets": str(root / "secrets")},
        "limits": LIMITS,
        "testKeySecretRef": test_key,
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


def chat(
    base: str,
    *,
    key: str | None = None,
    api_key: str = ALL_KEY,
    timeout: float = 30,
    **body: Any,
) -> httpx.Response:
    """A chat request; ``key`` is the test key (X-Tailor-Test-Key), ``api_key`` the
    caller's bearer token."""
    request = {"model": "md", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
               "temperature": 0, **body}  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}", **({TEST_KEY_HEADER: key} if key else {})}
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
    with probed(server) as probes:
        started = time.monotonic()
        answer = chat(server, key=TEST_KEY, **profile(template))
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
    streamed = httpx.post(f"{server}/v1/chat/completions", content=chunks, timeout=30,
                          headers={"Authorization": f"Bearer {ALL_KEY}"})  # fmt: skip
    assert streamed.status_code == 413
    assert chat(server, max_tokens=16).status_code == 200


@contextmanager
def probed(server: str) -> Iterator[list[float]]:
    """``/healthz`` polled in a thread for the block's duration: the list of its answer
    times (each must be "ok")."""
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
    try:
        yield probes
    finally:
        done.set()
        prober.join()


def test_a_response_format_too_costly_to_compile_is_refused_within_the_limit(
    server: str,
) -> None:
    # 1500 properties (42 KB, under maxBodyBytes): xgrammar takes ~25 s on one core to
    # compile it, which ran on the event loop before (every request and probe waited)
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1500)}}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with probed(server) as probes:
        started = time.monotonic()
        answer = chat(server, response_format=response_format)
        took = time.monotonic() - started
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "response_format" and "prepareSeconds" in error["message"]
    assert took < 3.0, took  # the 1 s limit
    assert probes and max(probes) < 1.0, probes
    assert chat(server).status_code == 200  # requests without a format are not held up


def test_a_key_scoped_to_one_adapter_is_refused_another(server: str) -> None:
    assert chat(server, api_key=A_KEY, model="md/a").status_code == 200
    for model in ("md/b", "md"):
        refused = chat(server, api_key=A_KEY, model=model)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["param"] == "model" and "md/a" in error["message"]
        assert A_KEY not in refused.text and ALL_KEY not in refused.text
    assert chat(server, api_key=ALL_KEY, model="md/b").status_code == 200  # the unscoped key
    assert chat(server, api_key="a-guess", model="md/a").status_code == 401
    # a scoped key sees only its models
    listed = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {A_KEY}"})
    assert [m["id"] for m in listed.json()["data"]] == ["md/a"]


def test_the_cache_answers_a_caller_only_from_its_own_requests(server: str) -> None:
    def cached(api_key: str) -> bool:
        question = [{"role": "user", "content": "a question only these callers ask"}]
        answer = chat(server, api_key=api_key, model="md/a", messages=question)
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["tailor"]["cached"])

    assert [cached(ALL_KEY), cached(ALL_KEY)] == [False, True]
    # another key asking the same learns nothing: no hit, no faster answer
    assert [cached(A_KEY), cached(A_KEY)] == [False, True]


def test_the_cache_keeps_at_most_the_admins_number_of_entries(server: str) -> None:
    def cached(text: str) -> bool:
        answer = chat(server, messages=[{"role": "user", "content": text}])
        return bool(answer.json()["tailor"]["cached"])

    # the spec asks for 10000 entries (the default); the admin's cacheMaxEntries is 2
    assert [cached(t) for t in ("one", "two", "three")] == [False, False, False]
    assert [cached("three"), cached("one")] == [True, False]


def test_requests_past_the_concurrency_limit_get_503_while_probes_answer(server: str) -> None:
    # four slow uploads hold the four slots (maxConcurrentRequests): each sent its headers
    # and part of its body, and the server buffers what it has until the rest comes
    holders = []
    for _ in range(4):
        holder = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])))
        holder.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {ALL_KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"model": '
        )
        holders.append(holder)
    try:
        time.sleep(0.5)  # the server has read them
        refused = chat(server)
        assert refused.status_code == 503, refused.text
        assert "maxConcurrentRequests" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"]
        assert httpx.get(f"{server}/healthz").text == "ok"  # probes are not counted
        assert httpx.get(f"{server}/readyz").status_code == 200
    finally:
        for holder in holders:
            holder.close()
    time.sleep(0.5)  # the server has seen them go
    assert chat(server).status_code == 200


def test_scoped_keys_secrets_must_opt_in_and_are_mounted() -> None:
    """A scoped key's Secret passes the same opt-in as apiKeySecretRef (the operator's one
    walk over the spec), and the serving pod mounts it."""
    from tailor.api import valid_spec
    from tailor.api.settings import OperatorSettings
    from tailor.controllers.secrets import USABLE_BY, unusable_secret

    auth = {"apiKeySecretRef": {"name": "all-key", "key": "key"},
            "keys": [{"secretRef": {"name": "team-a-key", "key": "key"}, "adapters": ["a"]}]}  # fmt: skip
    body = {"kind": "ModelDeployment", "metadata": {"namespace": "team", "name": "md"},
            "spec": {"baseModel": {"builtin": "smollm2-135m-instruct"}, "auth": auth}}  # fmt: skip
    opted_in = {"annotations": {USABLE_BY: "ModelDeployment/md"}}
    secrets = {"all-key": opted_in, "team-a-key": {"annotations": {}}}
    spec = valid_spec(body)
    assert spec is not None
    why = unusable_secret(body, spec, OperatorSettings(), lambda _, name: secrets.get(name))
    assert why is not None and why.startswith("spec.auth.keys[0].secretRef.name: ")
    secrets["team-a-key"] = opted_in
    assert (
        unusable_secret(body, spec, OperatorSettings(), lambda _, name: secrets.get(name)) is None
    )
    # the serving pod mounts both keys' Secrets
    from tailor.api.modeldeployment import ModelDeploymentSpec
    from tailor.builders.common import Parent
    from tailor.builders.modeldeployment import ResolvedRefs, build_serving

    spec = ModelDeploymentSpec.model_validate(body["spec"])
    owner = Parent(kind="ModelDeployment", name="md", namespace="team", uid="u", generation=1)
    workload = build_serving(spec, owner, OperatorSettings(), ResolvedRefs())
    [deployment] = [m for m in workload.manifests if m["kind"] == "Deployment"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    mounted = {v["secret"]["secretName"] for v in volumes if "secret" in v}
    assert {"all-key", "team-a-key"} <= mounted
