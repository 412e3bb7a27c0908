"""The serving workload end to end with the builtin SmolLM2, loaded once for the module.

Two LoRA adapters are trained here (a few optimizer steps each, peft directly) to answer
"Who are you?" in two recognisable ways; one engine serves the base model and both, and
several apps (one real uvicorn server on 127.0.0.1, plus TestClient apps with other
settings) share it. Covered: chat and completions, streaming, the official openai SDK,
choosing an adapter by ``model``, continuous batching matching transformers' generate,
16 concurrent clients, the response cache, auth, every error case, PromptProfile hot
reload, readiness, RAG with the gold APIBench document and an unreachable vector store.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from tailor.api.common import SecretKeyRef
from tailor.api.promptprofile import PromptProfileSpec, render_profile_data
from tailor.api.workloads import (
    TEST_KEY_HEADER,
    RetrieverConfig,
    Routing,
    ServedAdapter,
    ServeRun,
    UpstreamEngineConfig,
    adapters_digest,
)
from tailor.observability.serving import ServingMetrics
from tailor.workloads.serving.app import create_app
from tailor.workloads.serving.engine.base import SamplingParams, TokenEngine
from tailor.workloads.serving.engine.builtin import Engine, load_engine
from tailor.workloads.serving.engine.llamacpp import LlamaEngine, load_llama_engine
from tailor.workloads.serving.engine.upstream import UpstreamEngine
from tests.workloads.helpers import PERSONAS, QUESTION, ThreadServer, free_port, train_adapter

pytestmark = pytest.mark.workloads

SERVED = "smol"
API_KEY = "sk-test-0123456789"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    (root / "secrets" / "serve-auth").mkdir(parents=True)
    (root / "secrets" / "serve-auth" / "key").write_text(API_KEY + "\n")
    return root


@pytest.fixture(scope="module")
def adapter_dirs(workdir: Path) -> dict[str, Path]:
    from tailor.api.common import ModelSource
    from tailor.api.workloads import Paths
    from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer

    source, paths = ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts=str(workdir))
    model, tokenizer = load_causal_lm(source, paths), load_tokenizer(source, paths)
    dirs = {}
    for name, (answer, _) in PERSONAS.items():
        dirs[name] = workdir / "adapters" / name
        model = train_adapter(model, tokenizer, answer, dirs[name])
    return dirs


def make_run(workdir: Path, adapter_dirs: dict[str, Path], **spec: Any) -> ServeRun:
    """A run of the builtin model; engine builtin unless ``spec`` says another."""
    return ServeRun.model_validate(
        {
            "spec": {
                "baseModel": {"builtin": "smollm2-135m-instruct"},
                "engine": "builtin",
                **spec,
            },
            "servedName": SERVED,
            "adapters": [{"name": n, "path": str(p)} for n, p in adapter_dirs.items()],
            "owner": {"kind": "ModelDeployment", "namespace": "test", "name": SERVED},
            "paths": {"artifacts": str(workdir), "secrets": str(workdir / "secrets")},
        }
    )


@pytest.fixture(scope="module")
def run(workdir: Path, adapter_dirs: dict[str, Path]) -> ServeRun:
    return make_run(workdir, adapter_dirs)


@pytest.fixture(scope="module")
def engine(run: ServeRun) -> Iterator[Engine]:
    engine = load_engine(run.spec, run.adapters, run.paths, ServingMetrics(SERVED))
    yield engine
    engine.close()


def start_server(run: ServeRun, spec: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m tailor.workloads.serving.app --spec <spec>`` on a free port, once ready."""
    run.host, run.port = "127.0.0.1", free_port()
    spec.write_text(run.model_dump_json(by_alias=True))
    log_path = spec.with_suffix(".log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailor.workloads.serving.app", "--spec", str(spec)],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{run.port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{spec.name}: the server did not become ready"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def upstream(workdir: Path, adapter_dirs: dict[str, Path]) -> Iterator[str]:
    """Tailor's builtin engine as its own OpenAI server process (cache off: an engine),
    the HTTP upstream of the gateway in the "upstream" mode; it also serves vLLM's runtime
    adapter API, as vLLM does for the gateway."""
    engine_run = make_run(workdir, adapter_dirs, cache={"enabled": False})
    engine_run.adapter_api = True
    proc, url = start_server(engine_run, workdir / "upstream-spec.json")
    yield url
    proc.terminate()
    proc.wait(30)


# The gateway's own behaviour (auth, errors, feedback, cache, metrics, profiles, formats,
# RAG) does not depend on the engine behind it: these tests run once, on the builtin engine.
# The engine contract (chat, completions, stop sequences, streaming, disconnects, usage,
# adapters, concurrency, context window) runs against both engines.
GATEWAY_ONLY = pytest.mark.parametrize("gateway_engine", ["builtin"], indirect=True)
# Enforced formats are the engines' (constrained decoding): both in-process engines.
IN_PROCESS = pytest.mark.parametrize("gateway_engine", ["builtin", "llamacpp"], indirect=True)


@pytest.fixture(scope="module")
def llama_engine(run: ServeRun) -> Iterator[LlamaEngine]:
    """The llama.cpp engine on the builtin model's weights in f16 (the float weights the
    builtin engine serves, so the contract's answers are the same model's), the same two
    adapters converted to GGUF LoRA."""
    engine = load_llama_engine(
        run.spec.model_copy(update={"engine": "llamacpp", "quantization": "f16"}),
        run.adapters,
        run.paths,
        ServingMetrics(SERVED),
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module", params=["builtin", "upstream", "llamacpp"])
def gateway_engine(request: pytest.FixtureRequest, engine: Engine) -> TokenEngine:
    """What the gateway generates with: the builtin engine in-process, the same engine
    behind HTTP (:class:`UpstreamEngine`, as vLLM is used), or the llama.cpp engine. Every
    test through the gateway runs with each, unchanged."""
    if request.param == "builtin":
        return engine
    if request.param == "llamacpp":
        llama: LlamaEngine = request.getfixturevalue("llama_engine")
        return llama
    config = UpstreamEngineConfig(url=request.getfixturevalue("upstream"), model=SERVED)
    upstream_engine = UpstreamEngine(
        config, engine.tokenizer, list(PERSONAS), engine.context_window, ServingMetrics(SERVED)
    )
    return upstream_engine


@pytest.fixture(scope="module")
def metrics(gateway_engine: TokenEngine) -> ServingMetrics:
    """The gateway's metrics (requests, cache, in flight, feedback)."""
    assert gateway_engine.metrics is not None
    return gateway_engine.metrics


class RemoteMetrics:
    """``ServingMetrics.value`` over another process's /metrics."""

    def __init__(self, url: str):
        self.url = url

    def value(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


@pytest.fixture(scope="module")
def engine_metrics(gateway_engine: TokenEngine) -> Any:
    """The token engine's metrics (batches, generated tokens): in-process, or the upstream
    server's."""
    if isinstance(gateway_engine, UpstreamEngine):
        return RemoteMetrics(gateway_engine.url)
    return gateway_engine.metrics


@pytest.fixture(scope="module")
def base_url(run: ServeRun, gateway_engine: TokenEngine) -> Iterator[str]:
    with ThreadServer(create_app(run, engine=gateway_engine)) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def chat_model(name: str) -> str:
    """The model name of an adapter, or of the base model for "base"."""
    return SERVED if name == "base" else f"{SERVED}/{name}"


def chat(base_url: str, model: str = SERVED, **body: Any) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": QUESTION}])
    body.setdefault("max_tokens", 8)
    body.setdefault("temperature", 0)
    return httpx.post(f"{base_url}/v1/chat/completions", json={"model": model, **body}, timeout=120)


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


# ------------------------------------------------------------------ the OpenAI API
def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [SERVED, f"{SERVED}/pirate", f"{SERVED}/robot"]
    assert client.models.retrieve(f"{SERVED}/robot").parent == SERVED  # type: ignore[attr-defined]


def test_chat_completion(base_url: str) -> None:
    response = chat(
        base_url, messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert "Paris" in answer(response)
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_and_stop_sequence(client: openai.OpenAI) -> None:
    first = client.completions.create(
        model=SERVED, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0
    )
    assert first.object == "text_completion"
    assert first.choices[0].text.strip().startswith("5")
    stopped = client.completions.create(
        model=SERVED, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=["7"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert "7" not in stopped.choices[0].text
    assert first.choices[0].text.startswith(stopped.choices[0].text)


def test_streaming_sse_then_cache_hit(base_url: str, metrics: ServingMetrics) -> None:
    messages = [{"role": "user", "content": "Name three fruits."}]
    body = {"model": SERVED, "messages": messages, "max_tokens": 12, "temperature": 0}
    lines = []
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert sum(1 for p in pieces if p) >= 3, "tokens must arrive in several events"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(pieces)

    hits = metrics.value("tailor_serve_cache_hits_total", model=SERVED)
    again = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert answer(again) == streamed
    assert again.json()["tailor"]["cached"] is True
    assert metrics.value("tailor_serve_cache_hits_total", model=SERVED) == hits + 1


def test_client_disconnect_stops_generation(
    base_url: str, metrics: ServingMetrics, engine_metrics: Any
) -> None:
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 400,
        "temperature": 0.8,
        "stream": True,
    }
    tokens_before = engine_metrics.value("tailor_serve_engine_generated_tokens_total")
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines), next(lines)  # generating: leave after the first tokens
    deadline = time.monotonic() + 30
    while metrics.value("tailor_serve_inflight_requests") != 0:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.1)
    settled = -1.0
    while settled != engine_metrics.value("tailor_serve_engine_generated_tokens_total"):
        assert time.monotonic() < deadline, "generation did not stop"
        settled = engine_metrics.value("tailor_serve_engine_generated_tokens_total")
        time.sleep(0.5)  # the engine drops a cancelled row at its next step
    assert settled - tokens_before < 100


def test_openai_sdk_unmodified(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Say hello."}]
    completion = client.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=6, temperature=0, seed=1
    )
    text = completion.choices[0].message.content
    assert text and completion.usage and completion.usage.completion_tokens <= 6
    stream = client.chat.completions.create(
        model=SERVED,
        messages=messages,
        max_tokens=6,
        temperature=0.7,
        top_p=0.9,
        seed=123,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    same_seed = client.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=6, temperature=0.7, top_p=0.9, seed=123
    )
    assert same_seed.choices[0].message.content == content  # a seed reproduces sampling


def test_adapters_answer_differently_by_model(base_url: str) -> None:
    answers = {name: answer(chat(base_url, chat_model(name))) for name in PERSONAS}
    base = answer(chat(base_url, SERVED))
    for name, (_, marker) in PERSONAS.items():
        assert marker in answers[name], answers
        assert marker not in base
    assert len({base, *answers.values()}) == 3


def test_engine_batches_like_transformers_generate(engine: Engine) -> None:
    prompts = ["Write a haiku about the sea.", "List three colors.", "What is 12 times 3, and why?"]
    ids = [engine.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    results: list[str] = [""] * len(ids)

    def generate(i: int) -> None:
        time.sleep(0.15 * i)  # staggered: later prompts join a running batch
        results[i] = engine.generate(ids[i], None, SamplingParams(max_tokens=10)).text

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    with torch.inference_mode(), engine.model.disable_adapter():
        for prompt_ids, got in zip(ids, results, strict=True):
            out = engine.model.generate(
                input_ids=torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False
            )
            expected = engine.tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
            assert got == expected


def test_sixteen_concurrent_clients(
    base_url: str, metrics: ServingMetrics, engine_metrics: Any
) -> None:
    names = ["base", "pirate", "robot"]
    batches_before = engine_metrics.value("tailor_serve_batch_size_count")
    single_before = engine_metrics.value("tailor_serve_batch_size_bucket", le="1.0")

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, httpx.Response]:
        name = names[i % 3]
        body = {
            "model": chat_model(name),
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 6,
            "temperature": 0.5,  # not cacheable: every request really runs
        }
        return name, await http.post("/v1/chat/completions", json=body)

    async def all_clients() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
            return await asyncio.gather(*(one(http, i) for i in range(16)))

    results = asyncio.run(all_clients())
    assert [r.status_code for _, r in results] == [200] * 16, [r.text for _, r in results]
    for name, response in results:  # each row of a mixed batch used its own adapter
        markers = [marker for persona, (_, marker) in PERSONAS.items() if persona == name]
        found = [marker for _, marker in PERSONAS.values() if marker in answer(response)]
        assert found == markers, (name, answer(response))
    batches = engine_metrics.value("tailor_serve_batch_size_count") - batches_before
    single = engine_metrics.value("tailor_serve_batch_size_bucket", le="1.0") - single_before
    assert single < batches, "concurrent requests must share forward passes"
    assert metrics.value("tailor_serve_inflight_requests") == 0


@GATEWAY_ONLY
def test_cache_only_for_deterministic_requests(base_url: str, metrics: ServingMetrics) -> None:
    messages = [{"role": "user", "content": "Tell me a fun fact."}]
    misses = metrics.value("tailor_serve_cache_misses_total", model=SERVED)
    first = chat(base_url, messages=messages, max_tokens=5)
    second = chat(base_url, messages=messages, max_tokens=5)
    assert answer(first) == answer(second)
    assert (first.json()["tailor"]["cached"], second.json()["tailor"]["cached"]) == (False, True)
    assert metrics.value("tailor_serve_cache_misses_total", model=SERVED) == misses + 1
    hot = [chat(base_url, messages=messages, max_tokens=5, temperature=0.9) for _ in range(2)]
    assert [r.json()["tailor"]["cached"] for r in hot] == [False, False]
    assert metrics.value("tailor_serve_cache_misses_total", model=SERVED) == misses + 1


@GATEWAY_ONLY
def test_feedback_counts_up_and_down(base_url: str, metrics: ServingMetrics) -> None:
    response = chat(base_url, f"{SERVED}/robot", max_tokens=3)
    response_id = response.json()["id"]
    robot = {"model": f"{SERVED}/robot", "rating": "down", "revision": ""}  # no profile
    before = metrics.value("tailor_serve_feedback_total", **robot)
    feedback = httpx.post(
        f"{base_url}/v1/feedback", json={"id": response_id, "rating": "down", "comment": "meh"}
    )
    assert feedback.status_code == 200 and feedback.json()["known"] is True
    after = metrics.value("tailor_serve_feedback_total", **robot)
    assert after == before + 1
    bad = httpx.post(f"{base_url}/v1/feedback", json={"id": response_id, "rating": "meh"})
    assert error_of(bad, 400)["param"] == "rating"
    assert error_of(httpx.post(f"{base_url}/v1/feedback", json={"id": "x", "rating": "up"}), 400)


@GATEWAY_ONLY
def test_metrics_endpoint(base_url: str) -> None:
    text = httpx.get(f"{base_url}/metrics").text
    for name in (
        "tailor_serve_requests_total",
        "tailor_serve_errors_total",
        "tailor_serve_request_duration_seconds_bucket",
        "tailor_serve_time_to_first_token_seconds_bucket",
        "tailor_serve_prompt_tokens_total",
        "tailor_serve_completion_tokens_total",
        "tailor_serve_request_tokens_per_second_bucket",
        "tailor_serve_cache_hits_total",
        "tailor_serve_adapter_requests_total",
        "tailor_serve_feedback_total",
        "tailor_serve_inflight_requests",
        "tailor_serve_batch_size_bucket",
        "tailor_serve_request_device_seconds_bucket",
        "tailor_serve_retrieval_failures_total",
    ):
        assert name in text, name
    assert f'tailor_serve_adapter_requests_total{{adapter="pirate",deployment="{SERVED}"}}' in text
    assert httpx.get(f"{base_url}/healthz").text == "ok"
    assert httpx.get(f"{base_url}/readyz").status_code == 200


# ------------------------------------------------------------------ errors
@GATEWAY_ONLY
def test_error_cases(base_url: str, client: openai.OpenAI) -> None:
    url = f"{base_url}/v1/chat/completions"
    invalid = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert error_of(invalid, 400)["code"] == "invalid_json"
    assert error_of(chat(base_url, temperature=5), 400)["param"] == "temperature"
    assert error_of(chat(base_url, stop=["a", "b", "c", "d", "e"]), 400)["param"] == "stop"
    assert error_of(chat(base_url, messages=[]), 400)["param"] == "messages"
    unknown = error_of(chat(base_url, "smol/nope"), 404)
    assert (unknown["code"], unknown["param"]) == ("model_not_found", "model")
    n = error_of(chat(base_url, n=2), 400)
    assert n["param"] == "n" and "n=1" in n["message"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert error_of(chat(base_url, messages=image), 400)["param"] == "messages[0].content"
    long = [{"role": "user", "content": "word " * 9000}]
    too_long = error_of(chat(base_url, messages=long), 400)
    assert too_long["code"] == "context_length_exceeded" and "8192" in too_long["message"]
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=9000
        )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_an_upstream_engine_that_is_down_is_a_503_naming_it(run: ServeRun, engine: Engine) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    down = UpstreamEngine(
        UpstreamEngineConfig(url=url, model=SERVED), engine.tokenizer, list(PERSONAS), 8192
    )
    with TestClient(create_app(run, engine=down)) as http:
        for stream in (False, True):
            body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "stream": stream}  # fmt: skip
            response = http.post("/v1/chat/completions", json=body)
            error = error_of(response, 503)
            assert error["code"] == "engine_unavailable"
            assert url in error["message"] and "not reachable" in error["message"]


def test_upstream_answers_whole_when_the_client_does_not_stream(
    upstream: str, engine: Engine
) -> None:
    """A non-streamed request is asked of the upstream whole (one JSON answer, not a JSON
    event per token), with the same text as the stream; every request reuses the one
    kept-alive connection (reading a stream to its end returns it to the pool)."""
    remote = UpstreamEngine(
        UpstreamEngineConfig(url=upstream, model=SERVED), engine.tokenizer, list(PERSONAS), 8192
    )
    ids = engine.encode_chat([{"role": "user", "content": "Name three colours."}])
    params = SamplingParams(max_tokens=24, temperature=0.0)

    async def collect(incremental: bool, adapter: str | None = None) -> list[Any]:
        return [c async for c in remote.stream(ids, adapter, params, incremental=incremental)]

    async def scenario() -> tuple[list[Any], list[Any], list[Any], int]:
        streamed = await collect(True)
        whole = await collect(False)
        await collect(True, "pirate")
        adapter_whole = await collect(False, "pirate")
        for _ in range(3):
            await collect(False)
            await collect(True)
        idle = remote._client().connector._conns  # type: ignore[union-attr]
        kept = sum(len(connections) for connections in idle.values())
        await remote.aclose()
        return streamed, whole, adapter_whole, kept

    streamed, whole, adapter_whole, connections = asyncio.run(scenario())
    assert len(streamed) > 2 and len(whole) == 1 and len(adapter_whole) == 1
    assert whole[0].finish_reason == streamed[-1].finish_reason
    assert whole[0].text == "".join(c.text for c in streamed)
    assert whole[0].completion_tokens == streamed[-1].completion_tokens > 0
    assert adapter_whole[0].text != whole[0].text  # the adapter answered, not the base
    assert connections == 1


@pytest.mark.parametrize("mode", ["builtin", "int8", "upstream", "llamacpp"])
def test_adapters_change_in_a_running_server_without_a_restart(
    mode: str, workdir: Path, adapter_dirs: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    """The serve process (as a pod runs it) re-reads its spec file, as the operator
    rewrites it: an adapter added there is served, one replaced under the same name answers
    with its new weights, one removed is a 404, all in the same process; its metrics port
    reports what it serves (``GET /adapters``, which the operator puts in the status).
    "int8": dynamic int8 on CPU takes no adapter once quantized, so the server loads a new
    engine with the new list and swaps it in (still the same process). "upstream": the
    gateway in front of Tailor's engine server, loading and unloading through vLLM's
    runtime adapter API. (int8 stops after the swap: replacing, reporting a missing artifact
    and removing are the gateway's AdapterSet, the same for every engine.)"""
    folder = workdir / f"hot-{mode}"
    folder.mkdir()
    # names the shared upstream server does not have: this test unloads what it loads
    pirate, robot = f"{SERVED}/buccaneer", f"{SERVED}/droid"
    engine_spec = {"int8": {"quantization": "int8"}, "llamacpp": {"engine": "llamacpp"}}
    run = make_run(workdir, {"buccaneer": adapter_dirs["pirate"]}, **engine_spec.get(mode, {}))
    run.metrics_port = free_port()
    if mode == "upstream":
        url = request.getfixturevalue("upstream")
        run.upstream = UpstreamEngineConfig(url=url, model=SERVED, load_adapters=True)
    spec = folder / "spec.json"
    proc, base_url = start_server(run, spec)
    adapters_url = f"http://127.0.0.1:{run.metrics_port}/adapters"
    try:

        def served() -> set[str]:
            models = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
            return {m["id"] for m in models}

        def change(adapters: dict[str, Path], expect: set[str]) -> None:
            run.adapters = [ServedAdapter(name=n, path=str(p)) for n, p in adapters.items()]
            run.adapters_revision = adapters_digest(run.adapters)  # as the operator writes it
            spec.write_text(run.model_dump_json(by_alias=True))
            deadline = time.monotonic() + 60
            while served() != expect:
                assert proc.poll() is None, spec.with_suffix(".log").read_text()[-3000:]
                assert time.monotonic() < deadline, (served(), expect)
                time.sleep(0.5)

        assert served() == {SERVED, pirate}
        assert error_of(chat(base_url, robot), 404)["code"] == "model_not_found"
        both = {"buccaneer": adapter_dirs["pirate"], "droid": adapter_dirs["robot"]}
        change(both, {SERVED, pirate, robot})
        assert PERSONAS["robot"][1] in answer(chat(base_url, robot, max_tokens=12))
        assert PERSONAS["pirate"][1] in answer(chat(base_url, pirate, max_tokens=12))
        if mode == "int8":  # the engine swap is what int8 adds; the rest is the gateway's,
            assert proc.poll() is None  # checked on the builtin engine (test time: ~25 s)
            return

        # the same name, other weights: the new ones answer (a rolled-out artifact)
        change({**both, "droid": adapter_dirs["pirate"]}, {SERVED, pirate, robot})
        deadline = time.monotonic() + 60
        while PERSONAS["pirate"][1] not in answer(chat(base_url, robot, max_tokens=12)):
            assert time.monotonic() < deadline, "the replaced adapter still answers"
            time.sleep(0.5)
        report = httpx.get(adapters_url, timeout=10).json()
        assert {a["name"]: a["source"] for a in report["adapters"]} == {
            "buccaneer": str(adapter_dirs["pirate"]),
            "droid": str(adapter_dirs["pirate"]),
        }
        assert report["errors"] == []
        assert report["wanted"] == report["revision"] == run.adapters_revision

        # a missing artifact is reported; what is served stays served
        replaced = {**both, "droid": adapter_dirs["pirate"]}
        change({**replaced, "ghost": folder / "missing"}, {SERVED, pirate, robot})
        deadline = time.monotonic() + 30
        while not (report := httpx.get(adapters_url, timeout=10).json())["errors"]:
            assert time.monotonic() < deadline, report
            time.sleep(0.5)
        assert report["errors"][0]["name"] == "ghost"
        assert "adapter_config.json" in report["errors"][0]["message"]
        assert report["wanted"] == run.adapters_revision != report["revision"]

        change({}, {SERVED})
        assert error_of(chat(base_url, robot), 404)["code"] == "model_not_found"
        assert answer(chat(base_url, SERVED, max_tokens=4))
        assert proc.poll() is None  # one process throughout
        metrics = RemoteMetrics(f"http://127.0.0.1:{run.metrics_port}")
        assert metrics.value("tailor_serve_adapter_changes_total", action="load", result="ok") == 2
        assert (
            metrics.value("tailor_serve_adapter_changes_total", action="unload", result="ok") == 2
        )
        if mode == "upstream":  # the engine server no longer has the gateway's adapters
            upstream_models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
            ids = {m["id"] for m in upstream_models}
            assert not any(i.startswith((pirate, robot)) for i in ids), ids
    finally:
        proc.terminate()
        proc.wait(30)


def test_auth(workdir: Path, adapter_dirs: dict[str, Path], engine: Engine) -> None:
    auth = {"apiKeySecretRef": {"name": "serve-auth", "key": "key"}}
    secured = make_run(workdir, adapter_dirs, auth=auth)
    with TestClient(create_app(secured, engine=engine)) as http:
        body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        missing = http.post("/v1/chat/completions", json=body)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert http.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        assert http.get("/healthz").status_code == 200  # probes need no key
        assert http.get("/metrics").status_code == 200
        # the Secret is rotated (the kubelet swaps the mounted file): the new key works at
        # once, the old one no more, without a restart
        key_file = workdir / "secrets" / "serve-auth" / "key"
        rotated = key_file.with_name("key.new")
        rotated.write_text("sk-rotated-9876543210\n")
        rotated.replace(key_file)
        try:
            new = {"Authorization": "Bearer sk-rotated-9876543210"}
            assert http.post("/v1/chat/completions", json=body, headers=good).status_code == 401
            assert http.post("/v1/chat/completions", json=body, headers=new).status_code == 200
        finally:
            key_file.write_text(API_KEY + "\n")


def test_metrics_have_their_own_port_and_errors_keep_their_details_in_the_log(
    workdir: Path, adapter_dirs: dict[str, Path], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    apart = make_run(workdir, adapter_dirs)
    apart.metrics_port = 9999  # as in a pod: main() serves the registry there
    with TestClient(create_app(apart, engine=engine)) as http:
        assert http.get("/metrics").status_code == 404

    class Broken:
        """An engine failing with a detail no client should see."""

        metrics = engine.metrics
        context_window = 8192
        adapter_names = list(PERSONAS)

        def full(self) -> bool:
            return False

        def encode_chat(self, messages: Any) -> list[int]:
            raise RuntimeError("cannot open /var/secret/token-abc123")

    with TestClient(create_app(make_run(workdir, adapter_dirs), engine=cast(Engine, Broken())),
                    raise_server_exceptions=False) as http:  # fmt: skip
        body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}
        error = error_of(http.post("/v1/chat/completions", json=body), 500)
    assert "token-abc123" not in error["message"] and "incident" in error["message"]
    assert "token-abc123" in caplog.text  # the operator of the server still sees it


def test_readiness_waits_for_the_model(run: ServeRun, engine: Engine) -> None:
    release = threading.Event()

    def slow_loader() -> Engine:
        release.wait(30)
        return engine

    with TestClient(create_app(run, loader=slow_loader)) as http:
        assert http.get("/readyz").status_code == 503
        assert http.get("/healthz").status_code == 200
        body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}
        loading = http.post("/v1/chat/completions", json=body)
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_not_ready"
        assert http.get("/v1/models").json()["data"][0]["id"] == SERVED
        release.set()
        deadline = time.monotonic() + 10
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_load_failure_is_reported_in_the_log_not_to_callers(
    run: ServeRun, caplog: pytest.LogCaptureFixture
) -> None:
    failures: list[BaseException] = []

    def broken() -> Engine:
        raise RuntimeError("adapter folder /mnt/pvc/secret-path is empty")

    with TestClient(create_app(run, loader=broken, on_load_failure=failures.append)) as http:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health, ready = http.get("/healthz"), http.get("/readyz")
        assert health.status_code == 503 and "failed to load" in health.text
        assert ready.status_code == 503
        assert "secret-path" not in health.text + ready.text  # internals stay in the log
    assert "adapter folder /mnt/pvc/secret-path is empty" in caplog.text


# ------------------------------------------------------------------ PromptProfile
@GATEWAY_ONLY
def test_prompt_profile_applied_and_reloaded(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    path = workdir / "profile" / "profile.json"
    path.parent.mkdir(exist_ok=True)

    def publish(**fields: Any) -> None:
        data = json.dumps(render_profile_data(PromptProfileSpec.model_validate(fields)))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, path)  # a ConfigMap update swaps the file

    publish(system="Be brief.", template="{{ question }}", parameters={"maxTokens": 3})
    profiled = make_run(workdir, adapter_dirs, cache={"enabled": False})
    profiled.prompt_profile_file = str(path)
    body = {"model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    with TestClient(create_app(profiled, engine=gateway_engine)) as http:
        first = ok(http.post("/v1/chat/completions", json=body))
        assert first["usage"]["completion_tokens"] <= 3  # the profile's default maxTokens

        publish(
            system="Be brief. Answer like {{ persona }}.",
            template="[{{ topic }}] {{ question }}",
            fewShot=[{"user": "Hello", "assistant": "Hello! How can I help?"}],
            variables={"persona": "a teacher", "topic": "general"},
            parameters={"maxTokens": 3},
        )
        second = ok(http.post("/v1/chat/completions", json=body))
        assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 10

        variables = {**body, "tailor": {"variables": {"topic": "a much longer topic name here"}}}
        third = ok(http.post("/v1/chat/completions", json=variables))
        assert third["usage"]["prompt_tokens"] > second["usage"]["prompt_tokens"]

        path.write_text("{broken")  # an invalid revision keeps the last good one in force
        fourth = ok(http.post("/v1/chat/completions", json=body))
        assert fourth["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]

        publish(template="{{ missing }} {{ question }}")
        broken = http.post("/v1/chat/completions", json=body)
        assert broken.status_code == 400 and "missing" in broken.json()["error"]["message"]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@IN_PROCESS
def test_every_answer_under_a_response_format_validates(
    base_url: str,
    client: openai.OpenAI,
    workdir: Path,
    adapter_dirs: dict[str, Path],
    gateway_engine: TokenEngine,
) -> None:
    """OpenAI's response_format per request (the SDK's own form), and a profile's
    responseFormat by default; an unenforceable schema is a 400 naming the field."""
    import jsonschema

    questions = ["Invent a person.", "Describe a pilot from Lyon.", "Who lives next door?"]
    with_schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for i, question in enumerate(questions):
        reply = client.chat.completions.create(
            model=chat_model("base" if i % 2 == 0 else "pirate"),
            messages=[{"role": "user", "content": question}],
            max_tokens=96,
            temperature=0.7 if i else 0,
            seed=i,
            response_format=with_schema,  # type: ignore[arg-type]
        )
        text = reply.choices[0].message.content or ""
        assert reply.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    anything = answer(chat(base_url, max_tokens=96, response_format={"type": "json_object"}))
    assert isinstance(json.loads(anything), dict)

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    error = error_of(chat(base_url, response_format=bad), 400)
    assert error["param"] == "response_format" and "JSON Schema" in error["message"]
    error = error_of(chat(base_url, response_format={"type": "xml"}), 400)
    assert error["param"] == "response_format"

    path = workdir / "format-profile" / "profile.json"
    path.parent.mkdir(exist_ok=True)
    spec = PromptProfileSpec.model_validate(
        {"responseFormat": {"type": "json_schema", "schema": PERSON}}
    )
    path.write_text(json.dumps(render_profile_data(spec)))
    profiled = make_run(workdir, adapter_dirs, cache={"enabled": False})
    profiled.prompt_profile_file = str(path)
    with TestClient(create_app(profiled, engine=gateway_engine)) as http:
        body = {"model": SERVED, "messages": [{"role": "user", "content": "A person?"}],
                "max_tokens": 96, "temperature": 0}  # fmt: skip
        jsonschema.validate(
            json.loads(answer(http.post("/v1/chat/completions", json=body))), PERSON
        )
        free = {**body, "response_format": {"type": "text"}}  # the request's own wins
        text = answer(http.post("/v1/chat/completions", json=free))
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(text), PERSON)


@GATEWAY_ONLY
def test_few_shot_examples_are_chosen_per_question_by_the_server(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    """fewShotSelection through the real server: the question's own pool example is sent
    (an example far longer than the others shows in prompt_tokens)."""
    pool = [
        {"user": "Translate this sentence into German.", "assistant": "Ein Satz."},
        {"user": "Transcribe this audio recording of a meeting.", "assistant": "word " * 120},
        {"user": "Classify this photo of a cat.", "assistant": "tabby cat"},
    ]
    path = workdir / "few-shot-profile" / "profile.json"
    path.parent.mkdir(exist_ok=True)
    spec = PromptProfileSpec.model_validate(
        {
            "fewShotSelection": {"select": "similar", "k": 1, "pool": pool},
            "parameters": {"maxTokens": 1},
        }
    )
    path.write_text(json.dumps(render_profile_data(spec)))
    profiled = make_run(workdir, adapter_dirs, cache={"enabled": False})
    profiled.prompt_profile_file = str(path)

    def prompt_tokens(question: str) -> int:
        body = {"model": SERVED, "messages": [{"role": "user", "content": question}]}
        usage: dict[str, int] = ok(http.post("/v1/chat/completions", json=body))["usage"]
        return usage["prompt_tokens"]

    with TestClient(create_app(profiled, engine=gateway_engine)) as http:
        speech = prompt_tokens("Make a transcript of the audio of this podcast episode.")
        photo = prompt_tokens("What animal is in this picture of a pet?")
    assert speech > photo + 100  # the transcription example (120 words) went with speech


def test_context_window_from_the_spec(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    small = make_run(workdir, adapter_dirs, maxContextTokens=128)
    with TestClient(create_app(small, engine=gateway_engine)) as http:
        body = {"model": SERVED, "messages": [{"role": "user", "content": "word " * 150}]}
        error = http.post("/v1/chat/completions", json=body).json()["error"]
        assert error["code"] == "context_length_exceeded" and "128" in error["message"]
        fits = {"model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}
        error = http.post("/v1/chat/completions", json=fits).json()["error"]
        assert error["param"] == "max_tokens"
        nearly_full = [{"role": "user", "content": "word " * 88}]
        body = {"model": SERVED, "messages": nearly_full, "temperature": 0}
        clipped = ok(http.post("/v1/chat/completions", json=body))  # default maxTokens 256
        assert clipped["usage"]["prompt_tokens"] > 100
        assert clipped["usage"]["total_tokens"] <= 128


# ------------------------------------------------------------------ RAG
RAG_QUESTION = (
    "The weatherman needs an AI which could read out the daily weather information. "
    "Tell me an API that generates spoken weather information."
)
RAG_GOLD = "Tacotron 2"  # api_name of the gold APIBench document for that question


@pytest.fixture(scope="module")
def knowledge_base(workdir: Path, apibench: Path) -> dict[str, Any]:
    """The APIBench torchhub documents indexed by the real index workload (embedded Qdrant)."""
    from tailor.api.workloads import IndexRun
    from tailor.workloads.knowledge.index import build_index

    (workdir / "pvcs").mkdir(exist_ok=True)
    (workdir / "pvcs" / "apibench").symlink_to(apibench)
    target = {"alias": "apibench", "path": str(workdir / "qdrant")}
    index = IndexRun.model_validate(
        {
            "spec": {
                "sources": [{"pvc": {"claimName": "apibench", "path": "torchhub_api.jsonl"}}],
                "format": {
                    "json": {
                        "textFields": ["api_name", "functionality", "description"],
                        "titleField": "api_name",
                        "metadataFields": ["api_call"],
                    }
                },
                "chunking": {"strategy": "none"},
            },
            "target": target,
            "owner": {"kind": "KnowledgeBase", "namespace": "test", "name": "apibench"},
            "paths": {"artifacts": str(workdir), "pvcs": str(workdir / "pvcs")},
            "reporter": {"kind": "none"},
        }
    )
    build_index(index)
    return target


@GATEWAY_ONLY
def test_rag_puts_the_gold_document_in_context(
    workdir: Path,
    adapter_dirs: dict[str, Path],
    gateway_engine: TokenEngine,
    knowledge_base: dict[str, Any],
) -> None:
    rag = make_run(workdir, adapter_dirs, knowledgeBaseRef={"name": "apibench", "topK": 3})
    rag.knowledge_base = RetrieverConfig.model_validate(knowledge_base)
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": RAG_QUESTION}],
        "max_tokens": 4,
        "temperature": 0,
    }
    with TestClient(create_app(rag, engine=gateway_engine)) as http:
        with_context = ok(http.post("/v1/chat/completions", json=body))
        without = ok(
            http.post("/v1/chat/completions", json={**body, "tailor": {"retrieval": False}})
        )
    extension = with_context["tailor"]
    assert extension["retrieval"] == "ok"
    assert len(extension["sources"]) == 3
    assert RAG_GOLD in [source["title"] for source in extension["sources"]]
    gold = next(s for s in extension["sources"] if s["title"] == RAG_GOLD)
    assert gold["metadata"]["api_call"].startswith("torch.hub.load")
    context_tokens = len(gateway_engine.tokenizer(gold["text"]).input_ids)
    added = with_context["usage"]["prompt_tokens"] - without["usage"]["prompt_tokens"]
    assert added > context_tokens  # the gold document (and the others) went into the prompt
    assert "sources" not in without["tailor"]


@GATEWAY_ONLY
def test_rag_answers_without_context_when_the_store_is_down(
    workdir: Path,
    adapter_dirs: dict[str, Path],
    gateway_engine: TokenEngine,
    metrics: ServingMetrics,
) -> None:
    down = make_run(workdir, adapter_dirs, knowledgeBaseRef={"name": "apibench"})
    unreachable = {"alias": "apibench", "qdrant": {"url": "http://127.0.0.1:9"}}
    down.knowledge_base = RetrieverConfig.model_validate(unreachable)
    failures = metrics.value("tailor_serve_retrieval_failures_total")
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": RAG_QUESTION}],
        "max_tokens": 3,
        "temperature": 0,
    }
    with TestClient(create_app(down, engine=gateway_engine)) as http:
        response = ok(http.post("/v1/chat/completions", json=body))
    assert response["tailor"] == {"sources": [], "retrieval": "unavailable", "cached": False}
    assert response["choices"][0]["message"]["content"]
    assert metrics.value("tailor_serve_retrieval_failures_total") == failures + 1


# ------------------------------------------------------------------ rollouts (spec.rollout)
def rollout_run(workdir: Path, adapter_dirs: dict[str, Path], **rollout: Any) -> ServeRun:
    """A server whose requests for the pirate adapter are the rollout's (robot the
    candidate), at ``weight``; no cache: every answer is measured."""
    weight, profiles = rollout.pop("weight"), rollout.pop("profiles", {})
    deployment = rollout.pop("deployment", {})  # other fields of the ModelDeployment
    spec = {"stable": {"adapter": "pirate"}, "candidate": {"adapter": "robot"},
            "steps": [{"weight": weight}], **rollout}  # fmt: skip
    declared = [{"name": n, "pvc": {"claimName": "adapters", "path": n}} for n in PERSONAS]
    served = make_run(
        workdir,
        adapter_dirs,
        cache={"enabled": False},
        adapters=declared,
        rollout=spec,
        **deployment,
    )
    assert served.spec.rollout is not None
    served.routing = Routing(
        id="r1", step=0, weight=weight, rollout=served.spec.rollout, profiles=profiles
    )
    return served


def ask_in_session(
    http: TestClient, session: str, max_tokens: int, content: str = QUESTION
) -> dict[str, Any]:
    """A chat with the pirate adapter (the rollouts' stable) in session ``session``."""
    reply: dict[str, Any] = ok(
        http.post(
            "/v1/chat/completions",
            json={
                "model": f"{SERVED}/pirate",
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": content}],
            },
            headers={"X-Session-Id": session},
        )
    )
    return reply


@GATEWAY_ONLY
def test_a_canary_keeps_each_session_on_one_variant_and_counts_its_ratings(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    run = rollout_run(workdir, adapter_dirs, weight=50)
    with TestClient(create_app(run, engine=gateway_engine)) as http:
        seen: dict[str, set[str]] = {}
        votes = Counter[str]()
        for i in range(8):
            for _ in range(2):  # a conversation's second turn stays where its first went
                reply = ask_in_session(http, f"user-{i}", max_tokens=8)
                variant = reply["tailor"]["variant"]
                content = reply["choices"][0]["message"]["content"]
                persona = "robot" if variant == "candidate" else "pirate"
                assert PERSONAS[persona][1] in content, (variant, content)
                seen.setdefault(f"user-{i}", set()).add(variant)
                # users like the pirate and not the robot; a second rating is not a vote
                up = variant == "stable"
                for _ in range(2):
                    rating = {"id": reply["id"], "rating": "up" if up else "down"}
                    assert http.post("/v1/feedback", json=rating).status_code == 200
                votes[variant] += 1
        assert all(len(v) == 1 for v in seen.values())  # sticky
        assert {next(iter(v)) for v in seen.values()} == {"stable", "candidate"}
        # the base model and other adapters are not the rollout's
        base = http.post("/v1/chat/completions", json={"model": SERVED, "max_tokens": 2,
                         "messages": [{"role": "user", "content": "hi"}]}).json()  # fmt: skip
        assert "variant" not in base["tailor"]
        books = http.app.state.server.report()["rollout"]
    assert books["key"] == "r1:0:50"
    stable, candidate = books["variants"]["stable"], books["variants"]["candidate"]
    assert stable["requests"] == stable["answered"] == votes["stable"]
    assert candidate["requests"] == candidate["answered"] == votes["candidate"]
    assert stable["rated"] == stable["ratedUp"] == votes["stable"]  # one vote per answer
    assert candidate["rated"] == votes["candidate"] and candidate["ratedUp"] == 0
    assert len(stable["latencies"]) == votes["stable"] and stable["tokens"] > 0


@GATEWAY_ONLY
def test_a_prompt_profile_revision_is_rolled_out_like_an_adapter(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    """The candidate is the same adapter under another profile revision (here one that
    enforces a JSON answer, so whose profile answered shows in every answer); the stable's
    sessions keep the served profile, and the capture says which variant answered."""
    strict = {"responseFormat": {"type": "json_schema", "schema": {
        "type": "object", "properties": {"v": {"enum": ["candidate"]}},
        "required": ["v"], "additionalProperties": False}}}  # fmt: skip
    run = rollout_run(
        workdir,
        adapter_dirs,
        weight=50,
        candidate={"adapter": "pirate", "promptProfileRef": {"name": "strict", "revision": 2}},
        profiles={"candidate": strict},
    )
    with TestClient(create_app(run, engine=gateway_engine)) as http:
        variants = Counter[str]()
        for i in range(4):  # user-2 is the candidate's (the buckets of rollout r1)
            reply = ask_in_session(http, f"user-{i}", max_tokens=16)
            variant, content = reply["tailor"]["variant"], reply["choices"][0]["message"]["content"]
            variants[variant] += 1
            if variant == "candidate":
                assert json.loads(content) == {"v": "candidate"}, content
            else:
                assert PERSONAS["pirate"][1] in content, content
        books = http.app.state.server.report()["rollout"]["variants"]
    assert set(variants) == {"stable", "candidate"}
    assert books["candidate"]["answered"] == variants["candidate"]


def index_versions(workdir: Path, texts_by_version: list[list[str]]) -> dict[str, Any]:
    """An embedded index under alias ``versions`` built once per list of texts (version
    N from the Nth list; the last serves), each document titled by its text."""
    from tailor.api.workloads import IndexRun
    from tailor.workloads.knowledge.index import build_index

    pvcs = workdir / "pvcs" / "versions"
    pvcs.mkdir(parents=True, exist_ok=True)
    target = {"alias": "versions", "path": str(workdir / "qdrant-versions")}
    for number, texts in enumerate(texts_by_version, start=1):
        lines = [json.dumps({"title": t, "text": t}) for t in texts]
        (pvcs / f"v{number}.jsonl").write_text("\n".join(lines) + "\n")
        spec = {"sources": [{"pvc": {"claimName": "versions", "path": f"v{number}.jsonl"}}],
                "format": {"json": {"textFields": ["text"], "titleField": "title"}},
                "chunking": {"strategy": "none"},
                "store": {"qdrant": {"keepCollections": 2}}}  # fmt: skip
        build_index(IndexRun.model_validate({
            "spec": spec, "target": target, "mode": "full",
            "owner": {"kind": "KnowledgeBase", "namespace": "test", "name": "versions"},
            "paths": {"artifacts": str(workdir), "pvcs": str(workdir / "pvcs")},
            "reporter": {"kind": "none"}}))  # fmt: skip
    return target


@GATEWAY_ONLY
def test_a_knowledge_base_version_is_rolled_out_like_an_adapter(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    """The candidate retrieves from the index's previous version (the stable from the
    one serving): each session's sources come from its variant's version."""
    old = ["Parrots talk.", "Ships sail.", "Maps show treasure."]
    new = ["Robots compute.", "Circuits hum.", "Gears turn."]
    target = index_versions(workdir, [old, new])
    run = rollout_run(
        workdir,
        adapter_dirs,
        weight=50,
        candidate={"adapter": "pirate", "knowledgeBaseVersion": 1},
        deployment={"knowledgeBaseRef": {"name": "versions", "topK": 2}},
    )
    run.knowledge_base = RetrieverConfig.model_validate(target)
    with TestClient(create_app(run, engine=gateway_engine)) as http:
        titles: dict[str, set[str]] = {}
        for i in range(4):  # user-2 is the candidate's (the buckets of rollout r1)
            extension = ask_in_session(http, f"user-{i}", 2, "What talks?")["tailor"]
            assert extension["retrieval"] == "ok", extension
            titles.setdefault(extension["variant"], set()).update(
                s["title"] for s in extension["sources"]
            )
    assert titles["candidate"] <= set(old) and titles["stable"] <= set(new), titles


@GATEWAY_ONLY
def test_shadow_answers_never_reach_users_and_the_judge_compares_them(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    run = rollout_run(workdir, adapter_dirs, weight=100, mode="shadow",
                      analysis={"judge": {"rubric": "The better answer is a pirate's."}})  # fmt: skip
    with TestClient(create_app(run, engine=gateway_engine)) as http:
        server = http.app.state.server
        for i in range(3):
            reply = ask_in_session(http, f"user-{i}", max_tokens=8)
            assert reply["tailor"]["variant"] == "stable"
            assert PERSONAS["pirate"][1] in reply["choices"][0]["message"]["content"]
        deadline = time.monotonic() + 120
        while server.report()["rollout"]["variants"]["candidate"]["judged"] < 3:
            assert time.monotonic() < deadline, server.report()
            time.sleep(0.2)
        books = server.report()["rollout"]["variants"]
    assert books["stable"]["answered"] == 3 and books["candidate"]["answered"] == 3
    assert books["candidate"]["judged"] == 3 and 0 <= books["candidate"]["won"] <= 3
    judged = [server.metrics.value("tailor_serve_rollout_judged_total", outcome=o)
              for o in ("won", "lost", "tie")]  # fmt: skip
    assert sum(judged) == 3


@GATEWAY_ONLY
def test_an_adapter_behind_its_evaluation_gate_answers_its_evaluation_only(
    workdir: Path, adapter_dirs: dict[str, Path], gateway_engine: TokenEngine
) -> None:
    (workdir / "secrets" / "gate-test-key").mkdir(exist_ok=True)
    (workdir / "secrets" / "gate-test-key" / "key").write_text("test-key-of-the-deployment")
    run = make_run(workdir, adapter_dirs, cache={"enabled": False})
    run.test_key_secret_ref = SecretKeyRef(name="gate-test-key", key="key")
    run.gated_adapters = {"robot": "FineTuneJob robot's evaluation gate has not passed yet"}
    body = {"model": f"{SERVED}/robot", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
    with TestClient(create_app(run, engine=gateway_engine)) as http:
        listed = [m["id"] for m in ok(http.get("/v1/models"))["data"]]
        assert f"{SERVED}/pirate" in listed and f"{SERVED}/robot" not in listed
        to_test = ok(
            http.get("/v1/models", headers={TEST_KEY_HEADER: "test-key-of-the-deployment"})
        )
        assert f"{SERVED}/robot" in [m["id"] for m in to_test["data"]]
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "adapter_gated"
        assert "evaluation gate has not passed" in refused.json()["error"]["message"]
        wrong = http.post("/v1/completions", json={"model": f"{SERVED}/robot", "prompt": "Hi"},
                          headers={TEST_KEY_HEADER: "a guess"})  # fmt: skip
        assert wrong.status_code == 403
        evaluation = http.post("/v1/chat/completions", json=body,
                               headers={TEST_KEY_HEADER: "test-key-of-the-deployment"})  # fmt: skip
        assert PERSONAS["robot"][1] in answer(evaluation)
        assert (
            http.post(
                "/v1/chat/completions", json={**body, "model": f"{SERVED}/pirate"}
            ).status_code
            == 200
        )
        # the gate passes: the operator's next spec file serves it to everyone, in place
        passed = run.model_copy(update={"gated_adapters": {}})
        http.app.state.server.apply_run(passed)
        assert PERSONAS["robot"][1] in answer(http.post("/v1/chat/completions", json=body))
