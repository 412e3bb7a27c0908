"""The serving workload: ``python -m tailor.workloads.serving.app --spec FILE`` (FILE = ServeRun).

An OpenAI-compatible HTTP server (FastAPI + uvicorn) for one base model and any number of
LoRA adapters: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both also as
server-sent events with ``data: [DONE]``), ``GET /v1/models``, ``POST /v1/feedback``
(thumbs up or down on a response id), ``/healthz``, ``/readyz`` (ready once the model is
loaded) and ``/metrics``. The request's ``model`` picks the base model (``<served name>``)
or an adapter (``<served name>/<adapter>``). Every chat request goes through the mounted
PromptProfile (re-read when the file changes) and, with a knowledge base, retrieval: the
top chunks for the last user message go into the prompt and come back as
``"tailor": {"sources": [...], "retrieval": "ok"}``; an unavailable vector store gives an
answer without context and ``"retrieval": "unavailable"`` instead of an error.
Deterministic responses (temperature 0, or a seed) are cached by model, prompt and
parameters. Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
Generation itself is :mod:`tailor.workloads.serving.engine.builtin` (continuous batching).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailor.api.base import describe_errors
from tailor.api.common import split_s3_uri
from tailor.api.workloads import Paths, ServedAdapter, ServeRun
from tailor.observability.serving import ServingMetrics
from tailor.workloads.errors import RetryableError, WorkloadError
from tailor.workloads.io.sources import read_secret
from tailor.workloads.io.storage import pull_model, store_of
from tailor.workloads.program import read_spec, setup_logging, spec_path
from tailor.workloads.serving.adapters import AdapterSet, SpecWatcher, serve_metrics
from tailor.workloads.serving.engine.builtin import (
    Chunk,
    Engine,
    EngineClosed,
    EngineRejected,
    EngineUnavailable,
    QueueFull,
    SamplingParams,
    check_adapters,
    load_engine,
)
from tailor.workloads.serving.engine.grammar import FormatError, format_key
from tailor.workloads.serving.engine.upstream import export_upstream_metrics, load_upstream
from tailor.workloads.serving.prompting import (
    ContextDocument,
    Message,
    ProfileFile,
    PromptError,
    build_messages,
    last_user_message,
    merge_parameters,
    parse_profile,
    select_examples,
)

log = logging.getLogger("tailor.workloads.serving.app")

MAX_REMEMBERED_RESPONSES = 100_000


# ------------------------------------------------------------------ OpenAI wire models
class _Wire(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class TailorOptions(_Wire):
    """The ``tailor`` extension of a request (``extra_body={"tailor": {...}}`` in the SDK)."""

    variables: dict[str, str] = Field(default_factory=dict, description="Template variables.")
    retrieval: bool = Field(default=True, description="Retrieve context when a KB is set.")
    prompt_profile: dict[str, Any] | None = Field(
        default=None,
        alias="promptProfile",
        description="A profile revision to answer with instead of the served one (what a "
        "PromptProfile's test Job sends to try a revision before it is served).",
    )


class LoraAdapterRequest(_Wire):
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` body."""

    lora_name: str
    lora_path: str | None = None


class ContentPart(_Wire):
    type: str
    text: str | None = None


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class JsonSchemaFormat(_Wire):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatRequest(_Wire):
    """OpenAI's ``response_format``: text, json_object, or json_schema with a schema."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class _GenerationRequest(_Wire):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    response_format: ResponseFormatRequest | None = None
    tailor: TailorOptions | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = None
    suffix: str | None = None


class FeedbackRequest(_Wire):
    id: str = Field(min_length=1, max_length=200, description="The response's id.")
    rating: Literal["up", "down"]
    model: str | None = Field(default=None, description="The model, for responses not seen here.")
    comment: str | None = Field(default=None, max_length=4096)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# ------------------------------------------------------------------ response cache
class MountedSecret:
    """A mounted Secret key, re-read when the kubelet updates the file (a rotated API key
    takes effect without a restart); stat per use, read only on change."""

    def __init__(self, ref: Any, paths: Any):
        self.ref, self.paths = ref, paths
        self.path = Path(paths.secrets) / ref.name / ref.key
        self._seen: tuple[int, int, int] | None = None
        self._value = read_secret(ref, paths)
        self._changed()

    def _changed(self) -> bool:
        """Whether the file is another one than at the last look (False mid-swap)."""
        try:
            stat = self.path.stat()  # follows the kubelet's ..data symlink
        except OSError:
            return False  # mid-swap: keep the last key
        seen, self._seen = self._seen, (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return seen is not None and seen != self._seen

    def value(self) -> str:
        if self._changed():
            try:
                self._value = read_secret(self.ref, self.paths)
                log.info("the API key Secret %s changed: using the new key", self.ref.name)
            except WorkloadError:
                pass  # removed mid-update: keep the last key
        return self._value


class ResponseCache:
    """Exact-match cache of finished responses: LRU, bounded in entries and age."""

    def __init__(self, max_entries: int, ttl_seconds: float):
        self.max_entries, self.ttl = max_entries, ttl_seconds
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if time.monotonic() - found[0] > self.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return found[1]

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


# ------------------------------------------------------------------ the server
@dataclass
class Generation:
    """What the handlers resolved for one request, ready for the engine."""

    kind: Literal["chat", "completion"]
    model: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    extension: dict[str, Any]
    stream: bool
    include_usage: bool


class Server:
    """State shared by the handlers: the engine, profile, retriever, cache and metrics."""

    def __init__(
        self,
        run: ServeRun,
        metrics: ServingMetrics,
        engine: Engine | None,
        loader: Callable[[], Engine] | None,
        on_load_failure: Callable[[BaseException], None] | None,
    ):
        self.run = run
        self.name = run.served_name
        self.metrics = metrics
        self.engine = engine
        self.loader = loader
        self.on_load_failure = on_load_failure
        self.load_error: str | None = None
        self.created = int(time.time())
        self.adapter_set = AdapterSet(
            run.adapters, run.adapters_revision, run.paths, pull_adapter, check_adapters, metrics
        )
        self._changed_run: ServeRun | None = None  # a spec change that came while loading
        self._apply_lock = threading.Lock()
        self.api_key = (
            MountedSecret(run.spec.auth.api_key_secret_ref, run.paths) if run.spec.auth else None
        )
        self.profile = (
            ProfileFile(run.prompt_profile_file, metrics.observe_profile_reload)
            if run.prompt_profile_file
            else None
        )
        cache = run.spec.cache
        self.cache = ResponseCache(cache.max_entries, cache.ttl_seconds) if cache.enabled else None
        self.responses: OrderedDict[str, str] = OrderedDict()  # response id -> model
        self._retriever: Any = None
        self._retriever_lock = threading.Lock()
        self._example_vectors: dict[tuple[str, str], Any] = {}  # (embedder, text) -> vector
        self._example_lock = threading.Lock()
        if engine is not None:
            export_upstream_metrics(metrics, engine)
            metrics.set_ready(True)

    # -- lifecycle
    def load(self) -> None:
        """Load the model (and warm the retriever); runs in a background thread."""
        try:
            if self.run.knowledge_base is not None:
                try:
                    self.retriever()
                except Exception as exc:
                    log.warning("knowledge base not reachable yet (%s); retrying per request", exc)
            if self.profile is not None:
                self.profile.get()
            assert self.loader is not None
            self.engine = self.loader()
            export_upstream_metrics(self.metrics, self.engine)
            if self._changed_run is not None:
                self.apply_run(self._changed_run)
            self.metrics.set_ready(True)
            log.info("ready: serving %s", ", ".join(self.model_names()))
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")
            if self.on_load_failure:
                self.on_load_failure(exc)

    @property
    def adapters(self) -> list[str]:
        """The adapters served now (the engine's, which change without a restart)."""
        if self.engine is None:
            return [a.name for a in self.run.adapters]
        return list(self.engine.adapter_names)

    def apply_run(self, run: ServeRun) -> None:
        """A changed spec file: serve its adapters (loaded and unloaded in place). Other
        changes come with a new pod (the operator rolls the Deployment for them)."""
        with self._apply_lock:
            if self.engine is None:
                self._changed_run = run  # applied once the model is loaded
                return
            self._changed_run = None
            in_place = getattr(self.engine, "adapters_in_place", True)
            reload = None if in_place else self._reload_engine
            self.adapter_set.apply(self.engine, run.adapters, run.adapters_revision, reload)
            self.run.adapters = list(self.adapter_set.served.values())

    def _reload_engine(self, adapters: list[ServedAdapter]) -> None:
        """A new engine with ``adapters`` (an int8 model on CPU takes no adapter once
        quantized), swapped in; the old one finishes its requests, then stops."""
        new = load_engine(self.run.spec, adapters, self.run.paths, self.metrics)
        old, self.engine = self.engine, new

        def retire() -> None:
            assert old is not None
            if not old.drain(600):
                log.warning("the replaced engine still had requests after 10 minutes")
            old.close()

        threading.Thread(target=retire, name="tailor-retire-engine", daemon=True).start()

    def model_names(self) -> list[str]:
        return [self.name] + [f"{self.name}/{a}" for a in self.adapters]

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                "server_error",
                None,
                "model_not_ready",
            )
        return self.engine

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.value().encode()
        ):
            raise APIError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key "
                "from the deployment's auth.apiKeySecretRef.",
                code="invalid_api_key",
            )

    def upstream_adapter(self, lora_name: str) -> str:
        """The adapter of a runtime adapter API name (``<served>/<adapter>``)."""
        prefix = self.name + "/"
        if not lora_name.startswith(prefix) or len(lora_name) == len(prefix):
            raise APIError(
                400, f"lora_name must be {prefix}<adapter>, got {lora_name!r}", param="lora_name"
            )
        return lora_name[len(prefix) :]

    def resolve_model(self, name: str) -> str | None:
        """The adapter a model name refers to (None: the base model); 404 if unknown."""
        if name == self.name:
            return None
        prefix = self.name + "/"
        if name.startswith(prefix) and name[len(prefix) :] in self.adapters:
            return name[len(prefix) :]
        raise APIError(
            404,
            f"The model `{name}` does not exist. Available: {', '.join(self.model_names())}.",
            param="model",
            code="model_not_found",
        )

    # -- retrieval
    def retriever(self) -> Any:
        with self._retriever_lock:
            if self._retriever is None:
                from tailor.workloads.knowledge.retriever import Retriever

                assert self.run.knowledge_base is not None
                self._retriever = Retriever(self.run.knowledge_base, self.run.paths)
            return self._retriever

    async def retrieve(self, query: str | None) -> tuple[list[Any], str]:
        """(chunks, "ok" | "unavailable") for the query; never raises."""
        if not query:
            return [], "skipped"
        binding = self.run.spec.knowledge_base_ref
        started = time.perf_counter()
        try:
            retriever = await asyncio.to_thread(self.retriever)
            chunks = await asyncio.to_thread(
                retriever.search,
                query,
                top_k=binding.top_k if binding else None,
                score_threshold=binding.score_threshold if binding else None,
            )
        except Exception as exc:  # RetrieverUnavailable, or a store that fails otherwise
            self.metrics.observe_retrieval(time.perf_counter() - started, ok=False)
            log.warning("retrieval failed, answering without context: %s", exc)
            return [], "unavailable"
        self.metrics.observe_retrieval(time.perf_counter() - started, ok=True)
        return list(chunks), "ok"

    async def few_shot(self, profile: Any, question: str | None) -> list[Any]:
        """The profile's few-shot examples chosen for this question (fewShotSelection)."""
        selection = profile.few_shot_selection if profile is not None else None
        if selection is None:
            return []
        if selection.select == "static" or not question:
            return select_examples(selection, question, None)
        return await asyncio.to_thread(select_examples, selection, question, self.embed_texts)

    def embed_texts(self, texts: list[str]) -> Any:
        """Normalised vectors of texts with the knowledge base's embedding model (the builtin
        MiniLM without one); vectors of texts seen before (a pool) come from a cache."""
        import numpy as np

        from tailor.api.knowledgebase import Embedding
        from tailor.workloads.knowledge.retriever import load_embedder

        config = self.run.knowledge_base
        embedder = load_embedder(config.embedding if config else Embedding(), self.run.paths)
        cache = self._example_vectors
        with self._example_lock:
            missing = list(dict.fromkeys(t for t in texts if (embedder.key, t) not in cache))
            if missing:
                for text, vector in zip(missing, embedder.embed_queries(missing), strict=True):
                    cache[(embedder.key, text)] = vector
                while len(cache) > 20_000:
                    cache.pop(next(iter(cache)))
            return np.stack([cache[(embedder.key, t)] for t in texts])

    # -- request preparation
    def sampling(
        self, body: _GenerationRequest, max_tokens: int | None, prompt_tokens: int, profile: Any
    ) -> SamplingParams:
        """Request parameters over the profile's defaults, fitted into the context window."""
        merged = merge_parameters(
            profile,
            {
                "temperature": body.temperature,
                "top_p": body.top_p,
                "max_tokens": max_tokens,
                "stop": body.stop_list(),
                "seed": body.seed,
            },
        )
        window = self.run.spec.max_context_tokens or self.require_engine().context_window
        if prompt_tokens >= window:
            raise APIError(
                400,
                f"This model's maximum context length is {window} tokens, but the prompt has "
                f"{prompt_tokens} tokens. Shorten the messages or the prompt.",
                param="messages",
                code="context_length_exceeded",
            )
        budget = merged.max_tokens
        if max_tokens is not None and prompt_tokens + max_tokens > window:
            raise APIError(
                400,
                f"This model's maximum context length is {window} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion). Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_tokens=min(budget, window - prompt_tokens),
            temperature=merged.temperature,
            top_p=merged.top_p,
            stop=tuple(merged.stop),
            seed=merged.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            response_format=self.response_format(body, profile),
        )

    def response_format(self, body: _GenerationRequest, profile: Any) -> str | None:
        """The format key of the request's ``response_format``, else the profile's; compiled
        here, so a schema that cannot be enforced is a 400 naming the field."""
        param = "response_format"
        try:
            if body.response_format is not None:
                given = body.response_format
                if given.type == "json_schema" and given.json_schema is None:
                    raise FormatError("json_schema needs response_format.json_schema.schema")
                schema = given.json_schema.schema_ if given.json_schema else None
                key = format_key(given.type, schema)
            elif profile is not None and profile.response_format is not None:
                param = "promptProfile.responseFormat"
                wanted = profile.response_format
                key = format_key(wanted.type, wanted.schema_)
            else:
                return None
            self.require_engine().check_format(key)
        except FormatError as exc:
            raise APIError(
                400, f"{param}: {exc}", param=param, code="invalid_response_format"
            ) from exc
        return key

    async def prepare_chat(self, body: ChatCompletionRequest) -> Generation:
        adapter = self.resolve_model(body.model)
        _reject(body.n not in (None, 1), "n", "only n=1 is supported: send one request per choice")
        _reject(bool(body.logprobs), "logprobs", "logprobs are not supported")
        _reject(bool(body.tools or body.functions), "tools", "tool calling is not supported")
        engine = self.require_engine()
        conversation = [_message(i, m) for i, m in enumerate(body.messages)]
        options = body.tailor or TailorOptions()
        profile = self.profile.get() if self.profile else None
        if options.prompt_profile is not None:
            try:
                profile = parse_profile(json.dumps(options.prompt_profile))
            except PromptError as exc:
                raise APIError(400, str(exc), param="tailor.promptProfile") from exc
        documents: list[Any] = []
        extension: dict[str, Any] = {}
        if self.run.knowledge_base is not None and options.retrieval:
            documents, state = await self.retrieve(last_user_message(conversation))
            extension = {"sources": [_source(d) for d in documents], "retrieval": state}
        examples = await self.few_shot(profile, last_user_message(conversation))
        try:
            messages = build_messages(profile, conversation, documents, options.variables, examples)
        except PromptError as exc:
            raise APIError(
                400,
                f"the prompt profile could not be applied: {exc}",
                param="tailor.variables",
                code="invalid_prompt",
            ) from exc
        prompt_ids = engine.encode_chat([m.as_dict() for m in messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self.sampling(body, max_tokens, len(prompt_ids), profile)
        return Generation(
            "chat",
            body.model,
            adapter,
            prompt_ids,
            params,
            extension,
            body.stream,
            _include_usage(body),
        )

    def prepare_completion(self, body: CompletionRequest) -> Generation:
        adapter = self.resolve_model(body.model)
        _reject(body.n not in (None, 1), "n", "only n=1 is supported: send one request per choice")
        _reject(body.best_of not in (None, 1), "best_of", "only best_of=1 is supported")
        _reject(body.echo, "echo", "echo is not supported")
        _reject(body.logprobs is not None, "logprobs", "logprobs are not supported")
        _reject(body.suffix is not None, "suffix", "suffix is not supported")
        engine = self.require_engine()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            _reject(len(prompt) != 1, "prompt", "send one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = engine.encode_text(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        _reject(not prompt_ids, "prompt", "the prompt is empty")
        profile = self.profile.get() if self.profile else None
        params = self.sampling(body, body.max_tokens, len(prompt_ids), profile)
        return Generation(
            "completion",
            body.model,
            adapter,
            prompt_ids,
            params,
            {},
            body.stream,
            _include_usage(body),
        )

    # -- answering
    async def respond(self, gen: Generation, started: float) -> Response:
        """Run a prepared generation (or find it in the cache) and answer it."""
        self.metrics.observe_adapter(gen.adapter)
        cache_key = None
        if self.cache is not None and (gen.params.temperature == 0 or gen.params.seed is not None):
            # the adapter's weights are part of the key: a replaced adapter answers anew
            served = self.adapter_set.served.get(gen.adapter) if gen.adapter else None
            weights = served.source if served else None
            cache_key = ResponseCache.key(
                gen.kind, gen.model, weights, gen.prompt_ids, gen.params.__dict__
            )
            cached = self.cache.get(cache_key)
            self.metrics.observe_cache(gen.model, hit=cached is not None)
            if cached is not None:
                return self._answer_cached(gen, cached)

        response_id = _response_id(gen.kind)
        self.remember(response_id, gen.model)
        engine = self.require_engine()
        self.metrics.inflight_inc()
        # an engine that answers non-streamed requests whole has no first-token time then
        ttft = gen.stream or not getattr(engine, "answers_whole", False)
        tracker = _Tracker(self, gen, started, cache_key, ttft)
        chunks = engine.stream(gen.prompt_ids, gen.adapter, gen.params, incremental=gen.stream)
        try:
            first = await anext(chunks)  # submits; QueueFull surfaces here
        except BaseException as exc:
            tracker.abort()
            if isinstance(exc, QueueFull):
                raise APIError(
                    429,
                    f"the server is busy ({exc}); retry later",
                    "rate_limit_error",
                    None,
                    "queue_full",
                ) from exc
            if isinstance(exc, EngineClosed):
                raise APIError(503, "the server is shutting down", "server_error") from exc
            if isinstance(exc, EngineUnavailable):
                raise APIError(503, str(exc), "server_error", None, "engine_unavailable") from exc
            if isinstance(exc, EngineRejected):
                raise APIError(exc.status, str(exc), code="rejected_by_engine") from exc
            if isinstance(exc, ValueError):  # the engine refused the prompt (submit)
                raise APIError(400, str(exc), param="prompt", code="invalid_prompt") from exc
            raise
        if gen.stream:
            return StreamingResponse(
                self._stream(gen, response_id, first, chunks, tracker),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            parts = [first.text]
            tracker.saw(first)
            last = first
            while last.finish_reason is None:
                last = await anext(chunks)
                tracker.saw(last)
                parts.append(last.text)
        finally:
            try:
                await chunks.aclose()  # cancels the engine request if it is still running
            finally:
                tracker.done()
        if last.finish_reason == "error":
            raise APIError(500, last.error or "generation failed", "server_error")
        result = {
            "text": "".join(parts),
            "finish_reason": last.finish_reason,
            "usage": _usage(len(gen.prompt_ids), last.completion_tokens),
        }
        if cache_key is not None and self.cache is not None:
            self.cache.put(cache_key, result)
        return JSONResponse(_full_body(gen, response_id, result, cached=False))

    def _answer_cached(self, gen: Generation, cached: dict[str, Any]) -> Response:
        response_id = _response_id(gen.kind)
        self.remember(response_id, gen.model)
        if not gen.stream:
            return JSONResponse(_full_body(gen, response_id, cached, cached=True))

        async def events() -> AsyncIterator[str]:
            extension = {**gen.extension, "cached": True}
            yield _sse(_chunk_body(gen, response_id, "", None, role=True, extension=extension))
            yield _sse(_chunk_body(gen, response_id, cached["text"], None))
            yield _sse(_chunk_body(gen, response_id, "", cached["finish_reason"]))
            if gen.include_usage:
                yield _sse(_usage_chunk(gen, response_id, cached["usage"]))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _stream(
        self,
        gen: Generation,
        response_id: str,
        first: Chunk,
        chunks: AsyncGenerator[Chunk, None],
        tracker: _Tracker,
    ) -> AsyncIterator[str]:
        try:
            yield _sse(_chunk_body(gen, response_id, "", None, role=True, extension=gen.extension))
            chunk, parts = first, []
            while True:
                tracker.saw(chunk)
                parts.append(chunk.text)
                if chunk.finish_reason == "error":
                    error = APIError(500, chunk.error or "generation failed", "server_error")
                    yield _sse(error.body())
                    break
                if chunk.text:
                    yield _sse(_chunk_body(gen, response_id, chunk.text, None))
                if chunk.finish_reason is not None:
                    yield _sse(_chunk_body(gen, response_id, "", chunk.finish_reason))
                    usage = _usage(len(gen.prompt_ids), chunk.completion_tokens)
                    if gen.include_usage:
                        yield _sse(_usage_chunk(gen, response_id, usage))
                    if tracker.cache_key is not None and self.cache is not None:
                        result = {
                            "text": "".join(parts),
                            "finish_reason": chunk.finish_reason,
                            "usage": usage,
                        }
                        self.cache.put(tracker.cache_key, result)
                    break
                chunk = await anext(chunks)
            yield "data: [DONE]\n\n"
        finally:
            try:
                await chunks.aclose()  # cancels the engine request if it is still running
            finally:
                tracker.done()

    def remember(self, response_id: str, model: str) -> None:
        self.responses[response_id] = model
        while len(self.responses) > MAX_REMEMBERED_RESPONSES:
            self.responses.popitem(last=False)


class _CountRequests:
    """Counts every /v1/ request by model, path, status and error type (a plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` ran each request in an extra task and
    memory stream, ~8% of the gateway's time per request). Handlers set ``state.model``
    and ``state.error_type``; ``state.started`` is when the request arrived."""

    def __init__(self, app: Any, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state.update(started=time.perf_counter(), model="unknown", error_type="")
        path = scope["path"]
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def sent(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except Exception:
            self.metrics.observe_request(state["model"], path, 500, "server_error")
            raise
        self.metrics.observe_request(state["model"], path, status, state["error_type"])


class _Tracker:
    """Per-request timing for the metrics: first token, totals, once at the end."""

    def __init__(
        self,
        server: Server,
        gen: Generation,
        started: float,
        cache_key: str | None,
        ttft: bool = True,
    ):
        self.server, self.gen, self.started, self.cache_key = server, gen, started, cache_key
        self.ttft = ttft  # observe the time to the first token
        self.first_token: float | None = None
        self.final: Any = None
        self._done = False

    def saw(self, chunk: Any) -> None:
        if self.ttft and self.first_token is None and (chunk.text or chunk.completion_tokens):
            self.first_token = time.perf_counter() - self.started
        if chunk.finish_reason is not None:
            self.final = chunk

    def abort(self) -> None:
        """The request never reached the engine."""
        if not self._done:
            self._done = True
            self.server.metrics.inflight_dec()

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        self.server.metrics.inflight_dec()
        final = self.final
        self.server.metrics.observe_generation(
            self.gen.model,
            len(self.gen.prompt_ids),
            final.completion_tokens if final else 0,
            time.perf_counter() - self.started,
            self.first_token,
            final.device_seconds if final else 0.0,
        )


# ------------------------------------------------------------------ wire helpers
def _reject(condition: bool, param: str, message: str) -> None:
    if condition:
        raise APIError(400, message, param=param, code="unsupported_parameter")


def _message(index: int, message: ChatMessage) -> Message:
    role = {"developer": "system"}.get(message.role, message.role)
    if role not in ("system", "user", "assistant"):
        raise APIError(
            400,
            f"role {message.role} is not supported (no tool calling)",
            param=f"messages[{index}].role",
            code="unsupported_parameter",
        )
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" for part in content):
            raise APIError(
                400,
                "only text content parts are supported",
                param=f"messages[{index}].content",
                code="unsupported_parameter",
            )
        content = "".join(part.text or "" for part in content)
    return Message(role, content or "")


def _source(chunk: ContextDocument) -> dict[str, Any]:
    return {
        "id": getattr(chunk, "id", None),
        "document_id": getattr(chunk, "document_id", None),
        "title": chunk.title,
        "source": chunk.source,
        "score": getattr(chunk, "score", None),
        "text": chunk.text,
        "metadata": getattr(chunk, "metadata", None) or {},
    }


def _include_usage(body: _GenerationRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _response_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _full_body(
    gen: Generation, response_id: str, result: dict[str, Any], cached: bool
) -> dict[str, Any]:
    if gen.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": result["text"]},
            "finish_reason": result["finish_reason"],
            "logprobs": None,
        }
    else:
        choice = {
            "index": 0,
            "text": result["text"],
            "finish_reason": result["finish_reason"],
            "logprobs": None,
        }
    return {
        "id": response_id,
        "object": "chat.completion" if gen.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": gen.model,
        "choices": [choice],
        "usage": result["usage"],
        "system_fingerprint": None,
        "tailor": {**gen.extension, "cached": cached},
    }


def _chunk_body(
    gen: Generation,
    response_id: str,
    text: str,
    finish_reason: str | None,
    role: bool = False,
    extension: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if gen.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
        if text and not role:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "finish_reason": finish_reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    body: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk" if gen.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": gen.model,
        "choices": [choice],
    }
    if extension:
        body["tailor"] = extension
    return body


def _usage_chunk(gen: Generation, response_id: str, usage: dict[str, int]) -> dict[str, Any]:
    body = _chunk_body(gen, response_id, "", None)
    body["choices"] = []
    body["usage"] = usage
    return body


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "json-or-python"}


def _validation_param(error: dict[str, Any]) -> str | None:
    loc = [p for p in error.get("loc", ()) if p != "body"]
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and not part.startswith("function-") and "[" not in part:
            out += ("." if out else "") + part
    return out or None


# ------------------------------------------------------------------ the app
def create_app(
    run: ServeRun,
    *,
    engine: Engine | None = None,
    metrics: ServingMetrics | None = None,
    loader: Callable[[], Engine] | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    spec_file: Path | None = None,
) -> FastAPI:
    """The FastAPI app of a ServeRun.

    With ``engine`` the app serves it at once (tests share one loaded model); otherwise
    ``loader`` (default: load the run's model) runs in a background thread at startup and
    ``/readyz`` turns ready when it returns. With ``spec_file`` (the file ``run`` was read
    from), a changed adapter list in it is served without a restart.
    """
    if metrics is None:
        metrics = engine.metrics if engine and engine.metrics else ServingMetrics(run.served_name)
    owns_engine = engine is None and loader is None  # else the caller closes it
    if engine is None and loader is None and run.upstream is not None:
        upstream = run.upstream

        def loader() -> Engine:
            return cast(
                Engine,
                load_upstream(
                    upstream,
                    run.spec.base_model,
                    run.adapters,
                    run.paths,
                    run.spec.max_context_tokens,
                    metrics,
                ),
            )

    elif engine is None and loader is None:

        def loader() -> Engine:
            return load_engine(run.spec, run.adapters, run.paths, metrics)

    server = Server(run, metrics, engine, loader, on_load_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if server.engine is None:
            threading.Thread(target=server.load, name="tailor-load", daemon=True).start()
        watcher = SpecWatcher(spec_file, server.apply_run).start() if spec_file else None
        yield
        if watcher is not None:
            watcher.stop()
        if owns_engine and server.engine is not None:
            if hasattr(server.engine, "aclose"):  # an upstream's HTTP session
                await server.engine.aclose()
            await asyncio.to_thread(server.engine.close)

    app = FastAPI(title=f"Tailor: {run.served_name}", lifespan=lifespan)
    app.state.server = server

    app.add_middleware(_CountRequests, metrics=metrics)

    def error_response(request: Request, error: APIError) -> JSONResponse:
        request.state.error_type = error.type
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            message = "We could not parse the JSON body of your request: " + str(
                first.get("ctx", {}).get("error", first.get("msg", ""))
            )
            return error_response(request, APIError(400, message, code="invalid_json"))
        param = _validation_param(first)
        message = "; ".join(
            f"{_validation_param(e) or 'body'}: {e.get('msg', 'invalid')}" for e in exc.errors()
        )
        return error_response(request, APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(request, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the exception's text stays in the log: it may hold paths, hosts or data
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error (incident %s)", incident)
        message = f"internal error (incident {incident}); the server's log has the details"
        return error_response(request, APIError(500, message, "server_error"))

    async def authorized(request: Request) -> None:
        server.check_auth(request)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> Response:
        if server.load_error:
            return PlainTextResponse(f"model failed to load: {server.load_error}", 503)
        return PlainTextResponse("ok")

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> Response:
        if server.engine is None:
            return PlainTextResponse(server.load_error or "loading", 503)
        return PlainTextResponse("ready")

    if not run.metrics_port or run.metrics_port == run.port:
        # only without a metrics port of its own (in a pod it has one: the API port then
        # serves no /metrics, which would tell any client the traffic of every model)
        @app.get("/metrics")
        async def metrics_endpoint() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if run.adapter_api:
        # vLLM's runtime adapter API, for a gateway in front of this server (tests, and
        # Tailor's engine behind another gateway); off by default: it loads any path
        @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorized)])
        async def load_lora_adapter(body: LoraAdapterRequest) -> Response:
            adapter = server.upstream_adapter(body.lora_name)
            if adapter in server.adapters:
                raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.")
            if not body.lora_path:
                raise APIError(400, "lora_path is required", param="lora_path")
            engine = server.require_engine()
            try:
                await asyncio.to_thread(engine.load_adapter, adapter, body.lora_path)
            except WorkloadError as exc:
                raise APIError(400, exc.message, param="lora_path") from exc
            return PlainTextResponse(
                f"Success: LoRA adapter '{body.lora_name}' added successfully."
            )

        @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorized)])
        async def unload_lora_adapter(body: LoraAdapterRequest) -> Response:
            adapter = server.upstream_adapter(body.lora_name)
            if adapter not in server.adapters:
                raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.")
            await asyncio.to_thread(server.require_engine().unload_adapter, adapter)
            return PlainTextResponse(
                f"Success: LoRA adapter '{body.lora_name}' removed successfully."
            )

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server, m) for m in server.model_names()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def get_model(model: str) -> dict[str, Any]:
        server.resolve_model(model)
        return _model_card(server, model)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        request.state.model = body.model if body.model in server.model_names() else "unknown"
        gen = await server.prepare_chat(body)
        return await server.respond(gen, request.state.started)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        request.state.model = body.model if body.model in server.model_names() else "unknown"
        gen = server.prepare_completion(body)
        return await server.respond(gen, request.state.started)

    @app.post("/v1/feedback", dependencies=[Depends(authorized)])
    async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
        if not body.id.startswith(("chatcmpl-", "cmpl-")):
            raise APIError(
                400,
                "id must be the id of a chat.completion or text_completion",
                param="id",
                code="invalid_value",
            )
        model = server.responses.get(body.id)
        known = model is not None
        if model is None and body.model is not None:
            server.resolve_model(body.model)
            model = body.model
        model = model or "unknown"
        request.state.model = model
        metrics.observe_feedback(model, body.rating)
        log.info(
            "feedback %s on %s (%s)%s",
            body.rating,
            body.id,
            model,
            f": {body.comment!r}" if body.comment else "",
        )
        return {
            "id": body.id,
            "object": "feedback",
            "rating": body.rating,
            "model": model,
            "known": known,
        }

    return app


def _model_card(server: Server, model: str) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": server.created,
        "owned_by": "tailor",
        "root": server.name,
        "parent": None if model == server.name else server.name,
    }


# ------------------------------------------------------------------ entry point
def pull_adapters(run: ServeRun) -> None:
    """Adapters published to the object store, downloaded into this pod (each file checked
    against the upload's marker) before anything loads."""
    for adapter in run.adapters:
        pull_adapter(adapter, run.paths)


def pull_adapter(adapter: ServedAdapter, paths: Paths) -> None:
    """One adapter from the object store into this pod (nothing for one on a volume);
    ``adapter.path`` is then where it is."""
    location = split_s3_uri(adapter.uri)
    if location is None:
        return
    store = store_of(paths)
    if store is not None and adapter.path and store.holds(adapter.path):
        store.pull(store.relative(adapter.path))
    else:  # written by a run with its own store: fetched once into the model cache
        bucket, key = location
        adapter.path = str(pull_model((bucket, key.strip("/")), paths))


def main(argv: list[str] | None = None) -> int:
    """Serve until stopped. Exit codes: 0 stopped, 2 a problem the user can fix (invalid
    spec, missing adapter or secret, nf4 without a GPU), 1 anything else."""
    import uvicorn

    setup_logging()
    failure: list[BaseException] = []
    try:
        path = spec_path(argv)
        run = read_spec(ServeRun, argv)
        pull_adapters(run)
        check_adapters(run.adapters)
        metrics = ServingMetrics(run.served_name)

        def stop(error: BaseException) -> None:
            failure.append(error)
            server.should_exit = True

        app = create_app(run, metrics=metrics, on_load_failure=stop, spec_file=path)
    except ValidationError as exc:
        log.error("invalid spec file: %s", "; ".join(describe_errors(exc)))
        return 2
    except RetryableError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        return 1
    except WorkloadError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        return 2
    if run.metrics_port and run.metrics_port != run.port:
        serve_metrics(run.metrics_port, metrics.registry, app.state.server.adapter_set.report)
    server = uvicorn.Server(
        uvicorn.Config(app, host=run.host, port=run.port, timeout_graceful_shutdown=30)
    )
    server.run()
    if failure:
        error = failure[0]
        if isinstance(error, WorkloadError):
            log.error("%s: %s", error.reason, error.message)
            return 2
        log.error("the model could not be loaded: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
