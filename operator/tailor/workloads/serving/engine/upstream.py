"""The gateway's engine over HTTP: an OpenAI-compatible token engine in the same pod (vLLM
on GPUs, or Tailor's builtin engine run as its own server) generates, and Tailor's
gateway keeps everything else: prompt profiles, RAG with sources, the response cache,
feedback, auth, metrics.

The gateway tokenizes as it does for the builtin engine (the model's chat template, the
same context-window checks) and sends the prompt as **token ids** to the upstream's
``/v1/completions`` (both vLLM and Tailor accept ``prompt: [ids]``), so a conversation
becomes the same tokens with either engine. An adapter is the upstream model
``<served>/<adapter>`` (vLLM: ``--lora-modules <served>/<adapter>=<path>``). Streamed
choices become :class:`~tailor.workloads.serving.engine.base.Chunk` s; closing the stream (a client that
went away) closes the HTTP request, which cancels the generation upstream.

Errors keep the gateway's contract: an upstream that cannot be reached is
:class:`EngineUnavailable` (503 naming the engine), its 429 is ``QueueFull`` (429), another
4xx is :class:`EngineRejected` with the upstream's message, and an error in the middle of
a stream ends only that request with ``finish_reason="error"``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import aiohttp
import httpx

from tailor.api.workloads import Paths, ServedAdapter, UpstreamEngineConfig
from tailor.observability.serving import ServingMetrics
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_tokenizer
from tailor.workloads.serving.engine.base import (
    Chunk,
    EngineRejected,
    EngineUnavailable,
    QueueFull,
    SamplingParams,
    encode_chat,
    encode_text,
)

log = logging.getLogger("tailor.workloads.serving.engine.upstream")


class UpstreamEngine:
    """An OpenAI-compatible server as the gateway's engine (a
    :class:`~tailor.workloads.serving.engine.base.TokenEngine`). With ``metrics``, the
    upstream's own metrics are re-exported on their registry (:class:`UpstreamMetrics`)."""

    answers_whole = True
    """Non-streamed client requests are asked for whole: no per-token events on either side."""

    adapters_in_place = True
    """Adapters load through the upstream's runtime adapter API (``loadAdapters``)."""

    def __init__(
        self,
        config: UpstreamEngineConfig,
        tokenizer: Any,
        adapters: Sequence[str],
        context_window: int,
        metrics: ServingMetrics | None = None,
    ):
        self.config = config
        self.url = config.url.rstrip("/")
        self.tokenizer = tokenizer
        self.adapters = {name: f"{config.model}/{name}" for name in adapters}
        self.context_window = context_window
        self.metrics = metrics
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession]
        self._clients = weakref.WeakKeyDictionary()
        self._versions = itertools.count(2)  # upstream names of replaced adapters
        self._inflight = 0  # requests at the upstream now (one event loop: no lock)
        if metrics is not None:
            export_upstream_metrics(metrics, self.url)

    def _client(self) -> aiohttp.ClientSession:
        """The HTTP session of the running event loop (connections belong to one loop).
        aiohttp, not httpx, on this path: httpx's connection pool cost ~3 ms per request at
        16 concurrent requests here (319 vs 3,114 requests/s against an instant server)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.closed:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=5.0, sock_read=self.config.timeout_seconds
            )
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            client = aiohttp.ClientSession(
                timeout=timeout, connector=connector, auto_decompress=False
            )
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close the running event loop's session (the server's shutdown)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()
        self.close()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at ``path`` as ``name`` (the upstream's runtime adapter API). A
        name already served is replaced without a gap: the new weights load under a new
        upstream name, requests switch to it, then the old one is unloaded."""
        if not self.config.load_adapters:
            raise WorkloadError(
                "AdapterLoadFailed",
                f"adapter {name}: this upstream's adapters are its own (loadAdapters is off)",
            )
        old = self.adapters.get(name)
        upstream = f"{self.config.model}/{name}"
        if old is not None:
            upstream = f"{upstream}@{next(self._versions)}"
        load_adapter(self.config, upstream, path)
        self.adapters = {**self.adapters, name: upstream}
        if old is not None:
            unload_adapter(self.config, old)

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` here at once and unload it upstream."""
        upstream = self.adapters.get(name)
        if upstream is None:
            return
        self.adapters = {k: v for k, v in self.adapters.items() if k != name}
        if self.config.load_adapters:
            unload_adapter(self.config, upstream)

    def full(self) -> bool:
        bound = self.config.max_inflight
        return bound is not None and self._inflight >= bound

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def encode_text(self, prompt: str) -> list[int]:
        return encode_text(self.tokenizer, prompt)

    def check_format(self, key: str | None) -> None:
        """Formats are enforced upstream (vLLM's structured outputs, or Tailor's grammar);
        the gateway has already checked the schema itself (:func:`format_key`)."""

    async def stream(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        incremental: bool = True,
    ) -> AsyncGenerator[Chunk, None]:
        """The upstream's completion as chunks; closing the generator closes the HTTP
        stream (the upstream cancels the request). ``incremental=False`` (the client did not
        ask for a stream) asks the upstream for the whole answer in one response and yields
        it as one final chunk: a token stream costs both servers a JSON event per token."""
        bound = self.config.max_inflight
        if bound is not None and self._inflight >= bound:
            raise QueueFull(f"{self._inflight} requests are already at the model server")
        self._inflight += 1
        try:
            async for chunk in self._stream(prompt_ids, adapter, params, incremental):
                yield chunk
        finally:
            self._inflight -= 1

    async def _stream(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        incremental: bool,
    ) -> AsyncGenerator[Chunk, None]:
        body = self._body(prompt_ids, adapter, params, incremental)
        started = time.perf_counter()
        try:
            response = await self._client().post(f"{self.url}/v1/completions", json=body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EngineUnavailable(
                f"the model server at {self.url} is not reachable ({type(exc).__name__}); "
                "retry shortly"
            ) from exc
        finished = False  # read to the end: the connection goes back to the pool
        try:
            if response.status != 200:
                message = _error_text(await response.text(), response.reason or "")
                finished = True
                if response.status == 500 and not incremental:
                    # the generation failed there: the same as an error event in a stream
                    yield Chunk("", "error", 0, time.perf_counter() - started, error=message)
                    return
                if response.status == 429:
                    raise QueueFull(message)
                if 400 <= response.status < 500:
                    raise EngineRejected(response.status, message)
                raise EngineUnavailable(f"the model server answered {response.status}: {message}")
            if not incremental:
                chunk = await _whole(response, started)
                finished = chunk.finish_reason != "error"
                yield chunk
                return
            finish: str | None = None
            tokens = 0
            try:
                async for raw in response.content:
                    line = raw.decode()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:].strip()
                    if data == "[DONE]":
                        continue  # read on to the end of the body (it ends here)
                    event = json.loads(data)
                    if "error" in event:
                        yield Chunk("", "error", tokens, time.perf_counter() - started,
                                    error=str(event["error"].get("message", "generation failed")))  # fmt: skip
                        return
                    if event.get("usage"):
                        tokens = int(event["usage"].get("completion_tokens") or tokens)
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            yield Chunk(choice["text"])
                        finish = choice.get("finish_reason") or finish
                finished = True
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                yield Chunk("", "error", tokens, time.perf_counter() - started,
                            error=f"the model server's stream broke off: {type(exc).__name__}")  # fmt: skip
                return
            yield Chunk("", finish or "stop", tokens, time.perf_counter() - started)
        finally:
            if finished:
                response.release()
            else:  # a client that went away: closing the connection cancels upstream
                response.close()

    def _body(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        incremental: bool = True,
    ) -> dict[str, Any]:
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"unknown adapter {adapter}")
        body: dict[str, Any] = {
            "model": self.adapters[adapter] if adapter else self.config.model,
            "prompt": list(prompt_ids),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": incremental,
            **({"stream_options": {"include_usage": True}} if incremental else {}),
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.response_format is not None:
            body["response_format"] = response_format(params.response_format)
        return body

    def drain(self, timeout: float) -> bool:
        """Nothing to wait for here: the upstream runs the requests (a closed stream
        cancels its request there)."""
        return True

    def close(self) -> None:
        """Nothing to stop here: the server closes the HTTP session with :meth:`aclose`."""


async def _whole(response: aiohttp.ClientResponse, started: float) -> Chunk:
    """A non-streamed completion as one final chunk (an error chunk if it does not parse)."""
    try:
        answer = json.loads(await response.read())
        choice = (answer.get("choices") or [{}])[0]
        tokens = int((answer.get("usage") or {}).get("completion_tokens") or 0)
        text = str(choice.get("text") or "")
        finish = choice.get("finish_reason") or "stop"
        return Chunk(text, finish, tokens, time.perf_counter() - started)
    except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError, TypeError) as exc:
        return Chunk("", "error", 0, time.perf_counter() - started,
                     error=f"the model server's answer broke off: {type(exc).__name__}")  # fmt: skip


def response_format(key: str) -> dict[str, Any]:
    """The OpenAI ``response_format`` of a :func:`~tailor.workloads.serving.engine.grammar.format_key`."""
    wanted = json.loads(key)
    if wanted["type"] == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": wanted["schema"]}}  # fmt: skip
    return {"type": wanted["type"]}


def _error_message(response: httpx.Response) -> str:
    return _error_text(response.text, response.reason_phrase)


def _error_text(text: str, reason: str) -> str:
    """The upstream's error message out of its answer (OpenAI's error shape or any JSON)."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500] or reason
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(body.get("message") or body)[:500] if isinstance(body, dict) else str(body)[:500]


def wait_until_serving(config: UpstreamEngineConfig, deadline_seconds: float) -> None:
    """Block until the upstream lists ``config.model`` in ``/v1/models`` (vLLM takes
    minutes to load); the gateway is not ready before."""
    deadline = time.monotonic() + deadline_seconds
    last = ""
    while True:
        try:
            response = httpx.get(f"{config.url.rstrip('/')}/v1/models", timeout=5)
            if response.status_code == 200:
                ids = [m.get("id") for m in response.json().get("data") or []]
                if config.model in ids:
                    return
                last = f"it serves {ids}, not {config.model}"
            else:
                last = f"/v1/models answered {response.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        if time.monotonic() > deadline:
            raise EngineUnavailable(
                f"the model server at {config.url} was not serving {config.model} after "
                f"{deadline_seconds:.0f} s ({last})"
            )
        time.sleep(1.0)


def load_upstream(
    config: UpstreamEngineConfig,
    base_model: Any,
    adapters: Sequence[ServedAdapter],
    paths: Paths,
    max_context_tokens: int | None,
    metrics: ServingMetrics | None,
) -> UpstreamEngine:
    """The tokenizer (no weights) and context window of the base model, once the upstream
    serves it."""
    from transformers import AutoConfig

    from tailor.workloads.io.model_loading import resolve_model_dir

    tokenizer = load_tokenizer(base_model, paths)
    window = max_context_tokens
    if window is None:
        name, kwargs = resolve_model_dir(base_model, paths)
        model_config = AutoConfig.from_pretrained(name, **kwargs)
        window = int(getattr(model_config, "max_position_embeddings", 2048))
    wait_until_serving(config, config.startup_seconds)
    log.info("the model server at %s serves %s", config.url, config.model)
    if config.load_adapters:
        for adapter in adapters:
            load_adapter(config, f"{config.model}/{adapter.name}", adapter.path)
    return UpstreamEngine(config, tokenizer, [a.name for a in adapters], window, metrics)


def load_adapter(config: UpstreamEngineConfig, upstream_name: str, path: str | None) -> None:
    """Load one LoRA adapter into the upstream as ``upstream_name`` (vLLM's runtime
    adapter API; one that is already loaded is fine)."""
    try:
        response = httpx.post(
            f"{config.url.rstrip('/')}/v1/load_lora_adapter",
            json={"lora_name": upstream_name, "lora_path": path},
            timeout=600,
        )
    except httpx.HTTPError as exc:
        raise EngineUnavailable(f"the model server at {config.url} is unreachable: {exc}") from exc
    if response.status_code != 200 and "already" not in response.text:
        raise WorkloadError(
            "AdapterLoadFailed",
            f"the model server could not load adapter {upstream_name} from {path}: "
            f"{_error_message(response)}",
        )


def unload_adapter(config: UpstreamEngineConfig, upstream_name: str) -> None:
    """Unload an adapter from the upstream (one it does not have is fine: the goal holds)."""
    try:
        response = httpx.post(
            f"{config.url.rstrip('/')}/v1/unload_lora_adapter",
            json={"lora_name": upstream_name},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        raise EngineUnavailable(f"the model server at {config.url} is unreachable: {exc}") from exc
    if response.status_code not in (200, 404) and "not found" not in response.text.lower():
        log.warning("the model server did not unload %s: %s", upstream_name,
                    _error_message(response))  # fmt: skip


class UpstreamMetrics:
    """A collector that re-exports the upstream engine's own metrics (vLLM's ``vllm:*``,
    or the batch and token counters of Tailor's engine server) beside the gateway's, so
    one scrape of the gateway's metrics port sees both. Families the gateway has itself
    are left out (no duplicates); an upstream that does not answer adds nothing."""

    def __init__(self, url: str, registry: Any):
        self.url, self.registry = url.rstrip("/"), registry
        self._inside = threading.local()

    def describe(self) -> list[Any]:
        return []  # unknown until scraped: no name checks at registration

    def collect(self) -> Any:
        from prometheus_client.parser import text_string_to_metric_families

        if getattr(self._inside, "active", False):
            return  # the registry's own families are being listed (below)
        self._inside.active = True
        try:  # what the gateway measures itself (families with samples) is its own
            own = {f.name for f in self.registry.collect() if f.samples}
        finally:
            self._inside.active = False
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2).text
            families = list(text_string_to_metric_families(text))
        except (httpx.HTTPError, ValueError):
            return
        for family in families:
            if family.name not in own and family.samples:
                yield family


def export_upstream_metrics(metrics: ServingMetrics, url: str) -> None:
    """Add the metrics of the upstream at ``url`` to the gateway's registry (once per
    registry)."""
    if url in metrics.upstreams:
        return
    metrics.registry.register(UpstreamMetrics(url, metrics.registry))
    metrics.upstreams.add(url)
