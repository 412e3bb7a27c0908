"""The gateway: an OpenAI request made into a generation for the token engine, and its
answer. Every chat request goes through the mounted PromptProfile (re-read when the file
changes) and, with a knowledge base, retrieval: the top chunks for the last user message go
into the prompt and come back as ``"tailor": {"sources": [...], "retrieval": "ok"}``; an
unavailable vector store gives an answer without context and ``"retrieval": "unavailable"``
instead of an error. Deterministic responses (temperature 0, or a seed) are cached by
caller (a hash of its API key), model, adapter weights, prompt and parameters, at most
the admin's ``cacheMaxEntries``. The engine is known only as a
:class:`~tailor.workloads.serving.engine.base.TokenEngine` (the builtin scheduler or vLLM).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from tailor.api.workloads import ServedAdapter, ServeRun
from tailor.observability.serving import ServingMetrics
from tailor.workloads.io.storage import store_of
from tailor.workloads.serving.adapters import AdapterSet, pull_adapter
from tailor.workloads.serving.auth import Access, Caller, MountedSecret, check_scope
from tailor.workloads.serving.cache import ResponseCache
from tailor.workloads.serving.capture import CaptureLog, FeedbackDesk
from tailor.workloads.serving.engine.base import (
    Chunk,
    EngineClosed,
    EngineRejected,
    EngineUnavailable,
    QueueFull,
    SamplingParams,
    TokenEngine,
)
from tailor.workloads.serving.engine.loading import check_adapters
from tailor.workloads.serving.generation import Generation, Tracker, finish, whole
from tailor.workloads.serving.isolated import IsolatedRenderer
from tailor.workloads.serving.preparing import Preparer
from tailor.workloads.serving.prompting import (
    Message,
    ProfileFile,
    PromptError,
    build_messages,
    last_user_message,
    merge_parameters,
    parse_profile,
    select_examples,
)
from tailor.workloads.serving.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FeedbackRequest,
    GenerationParameters,
    Reply,
    TailorOptions,
    source,
    sse,
    usage,
)
from tailor.workloads.serving.rollout import Rollouts
from tailor.workloads.serving.shadow import ShadowTraffic

log = logging.getLogger("tailor.workloads.serving.gateway")


# ------------------------------------------------------------------ the server
class Server:
    """State shared by the handlers: the engine, profile, retriever, cache and metrics.

    ``engine`` is served at once; without one, :meth:`load` (run in a background thread)
    calls ``loader`` (default: ``make_engine`` with the run's adapters). ``make_engine``
    makes a new engine for another list of adapters, for an engine that cannot load
    them in place."""

    def __init__(
        self,
        run: ServeRun,
        metrics: ServingMetrics,
        engine: TokenEngine | None,
        loader: Callable[[], TokenEngine] | None,
        make_engine: Callable[[list[ServedAdapter]], TokenEngine],
        on_load_failure: Callable[[BaseException], None] | None,
    ):
        self.run = run
        self.name = run.served_name
        self.metrics = metrics
        self.engine = engine
        self.make_engine = make_engine
        self.loader = loader or (lambda: make_engine(self.run.adapters))
        self.on_load_failure = on_load_failure
        self.load_error: str | None = None
        self.created = int(time.time())
        self.adapter_set = AdapterSet(
            run.adapters, run.adapters_revision, run.paths, pull_adapter, check_adapters, metrics
        )
        self._changed_run: ServeRun | None = None  # a spec change that came while loading
        self._apply_lock = threading.Lock()
        self.access = Access(run.spec.auth, run.paths)
        self.test_key = (
            MountedSecret(run.test_key_secret_ref, run.paths) if run.test_key_secret_ref else None
        )
        self.renderer = IsolatedRenderer(run.limits.template_seconds)
        self.preparer = Preparer(run.limits.prepare_seconds)
        self.profile = (
            ProfileFile(run.prompt_profile_file, metrics.observe_profile_reload)
            if run.prompt_profile_file
            else None
        )
        cache = run.spec.cache
        entries = min(cache.max_entries, run.limits.cache_max_entries)  # the admin's cap
        self.cache = ResponseCache(entries, cache.ttl_seconds) if cache.enabled else None
        capture = (
            CaptureLog(
                run.spec.feedback,
                run.served_name,
                Path(run.paths.artifacts),
                store_of(run.paths),
                run.replica or os.environ.get("HOSTNAME") or socket.gethostname(),
                metrics.observe_capture,
            )
            if run.spec.feedback
            else None
        )
        self.rollouts = Rollouts(metrics, run.routing)
        self.desk = FeedbackDesk(capture, metrics, run.prompt_profile_revision or "")
        self.desk.on_rated = self.rollouts.rated
        self.shadows = ShadowTraffic(self.rollouts, max(1, run.spec.batching.max_batch_size // 2))
        self._retriever: Any = None
        self._retriever_lock = threading.Lock()
        self._example_vectors: dict[tuple[str, str], Any] = {}  # (embedder, text) -> vector
        self._example_lock = threading.Lock()
        if engine is not None:
            metrics.set_ready(True)

    def report(self) -> dict[str, Any]:
        """What the metrics port's ``GET /adapters`` answers: the adapters served, the
        rollout's measurements of the current step, and the ratings counted since the
        start (with the latest ones' times: an AdaptationLoop's trigger)."""
        desk = self.desk
        ratings = {"total": desk.ratings, "up": desk.rated_up,
                   "recent": [[round(t, 1), int(up)] for t, up in list(desk.recent)]}  # fmt: skip
        return {**self.adapter_set.report(), "rollout": self.rollouts.report(), "ratings": ratings}

    @property
    def capture(self) -> CaptureLog | None:
        """The capture writer (spec.feedback), or None."""
        return self.desk.capture

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
            if self.test_key is not None:  # requests may bring profiles: a worker ready
                self.renderer.start()
            self.engine = self.loader()
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
            self.run.routing = run.routing
            self.run.gated_adapters = dict(run.gated_adapters)
            self.rollouts.apply(run.routing)
            if self.engine is None:
                self._changed_run = run  # applied once the model is loaded
                return
            self._changed_run = None
            reload = None if self.engine.adapters_in_place else self._reload_engine
            self.adapter_set.apply(self.engine, run.adapters, run.adapters_revision, reload)
            self.run.adapters = list(self.adapter_set.served.values())

    def _reload_engine(self, adapters: list[ServedAdapter]) -> None:
        """A new engine with ``adapters`` (an int8 model on CPU takes no adapter once
        quantized), swapped in; the old one finishes its requests, then stops."""
        new = self.make_engine(adapters)
        old, self.engine = self.engine, new

        def retire() -> None:
            assert old is not None
            if not old.drain(600):
                log.warning("the replaced engine still had requests after 10 minutes")
            old.close()

        threading.Thread(target=retire, name="tailor-retire-engine", daemon=True).start()

    def model_names(self, caller: Caller | None = None) -> list[str]:
        """The models served now (those ``caller`` may use, when given)."""
        names = {None: self.name} | {a: f"{self.name}/{a}" for a in self.adapters}
        return [n for a, n in names.items() if caller is None or caller.may_use(a)]

    def listed_models(self, caller: Caller, test_key: str | None) -> list[str]:
        """GET /v1/models: the models ``caller`` may use, less the adapters behind their
        evaluation gate (listed to the test key only: they answer nobody else)."""
        gated = {} if self._has_test_key(test_key) else self.run.gated_adapters
        return [n for n in self.model_names(caller) if n.partition("/")[2] not in gated]

    def require_engine(self) -> TokenEngine:
        """The engine, if it is loaded and would take one more request (else 503 or 429)."""
        if self.engine is None:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                "server_error",
                None,
                "model_not_ready",
            )
        if self.engine.full():  # before any work on the request: overload answers at once
            refused = refusal(QueueFull("the queue is full"))
            assert refused is not None
            raise refused
        return self.engine

    def upstream_adapter(self, lora_name: str) -> str:
        """The adapter of a runtime adapter API name (``<served>/<adapter>``)."""
        prefix = self.name + "/"
        if not lora_name.startswith(prefix) or len(lora_name) == len(prefix):
            raise APIError(
                400, f"lora_name must be {prefix}<adapter>, got {lora_name!r}", param="lora_name"
            )
        return lora_name[len(prefix) :]

    def resolve_model(self, name: str, caller: Caller) -> str | None:
        """The adapter a model name refers to (None: the base model); 404 if unknown, 403
        if ``caller``'s key may not use it."""
        prefix = self.name + "/"
        if name == self.name:
            adapter = None
        elif name.startswith(prefix) and name[len(prefix) :] in self.adapters:
            adapter = name[len(prefix) :]
        else:
            usable = ", ".join(self.model_names(caller))
            raise APIError(
                404,
                f"The model `{name}` does not exist. Available: {usable}.",
                param="model",
                code="model_not_found",
            )
        check_scope(caller, adapter, name, self.model_names(caller))
        return adapter

    # -- retrieval
    def retriever(self) -> Any:
        with self._retriever_lock:
            if self._retriever is None:
                from tailor.workloads.knowledge.retriever import Retriever

                assert self.run.knowledge_base is not None
                self._retriever = Retriever(self.run.knowledge_base, self.run.paths)
            return self._retriever

    async def retrieve(
        self, query: str | None, version: int | None = None
    ) -> tuple[list[Any], str]:
        """(chunks, "ok" | "unavailable") for the query, from the served index or its
        ``version`` (a rollout variant's); never raises."""
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
                version=version,
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
        self,
        body: GenerationParameters,
        max_tokens: int | None,
        prompt_tokens: int,
        profile: Any,
        response_format: str | None,
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
        cap = self.run.limits.max_tokens
        budget = min(merged.max_tokens, cap)
        if max_tokens is not None and prompt_tokens + max_tokens > window:
            raise APIError(
                400,
                f"This model's maximum context length is {window} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion). Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > cap:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}, more than this server's limit of {cap} (the "
                "cluster admin's workloads.serving.limits.maxTokens): ask for fewer",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        return SamplingParams(
            max_tokens=min(budget, window - prompt_tokens),
            temperature=merged.temperature,
            top_p=merged.top_p,
            stop=tuple(merged.stop),
            seed=merged.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            response_format=response_format,
        )

    async def prepare_chat(
        self,
        body: ChatCompletionRequest,
        caller: Caller,
        test_key: str | None = None,
        session: str = "",
    ) -> Generation:
        """A chat request as a generation. ``test_key``: the X-Tailor-Test-Key header, the
        credential for bringing a prompt profile (``tailor.promptProfile``); ``session``:
        the request's session under a rollout's sticky rule."""
        adapter, route = self.rollouts.assign(
            self.ungated(self.resolve_model(body.model, caller), test_key), session, self.adapters
        )
        _reject(body.n not in (None, 1), "n", "only n=1 is supported: send one request per choice")
        _reject(bool(body.logprobs), "logprobs", "logprobs are not supported")
        _reject(bool(body.tools or body.functions), "tools", "tool calling is not supported")
        engine = self.require_engine()
        most = self.run.limits.max_messages
        if len(body.messages) > most:
            raise APIError(
                400,
                f"{len(body.messages)} messages, more than this server's limit of {most} (the "
                "cluster admin's workloads.serving.limits.maxMessages): send fewer",
                param="messages",
                code="too_many_messages",
            )
        conversation = [_message(i, m) for i, m in enumerate(body.messages)]
        options = body.tailor or TailorOptions()
        served = self._profile(options, test_key)
        profile = served
        if route is not None and route.profile is not None and options.prompt_profile is None:
            profile = route.profile  # a rollout variant's prompt-profile revision
        question = last_user_message(conversation)
        retrieval = self.run.knowledge_base is not None and options.retrieval
        documents: list[Any] = []
        extension: dict[str, Any] = {}
        if retrieval:
            version = route.knowledge_base_version if route else None
            documents, state = await self.retrieve(question, version)
            extension = {"sources": [source(d) for d in documents], "retrieval": state}
        chat, prompt_ids, params = await self._chat_prompt(
            engine, body, profile, conversation, documents, options, question
        )
        shadow = None
        if route is not None and route.shadow_differs:
            # the candidate's copy is asked under its own profile and index (else the served)
            if retrieval and route.shadow_knowledge_base_version != route.knowledge_base_version:
                documents, _ = await self.retrieve(question, route.shadow_knowledge_base_version)
            _, shadow_ids, shadow_params = await self._chat_prompt(
                engine, body, route.shadow_profile or served, conversation, documents, options,
                question,
            )  # fmt: skip
            shadow = (shadow_ids, shadow_params)
        return Generation(
            "chat",
            caller,
            body.model,
            adapter,
            prompt_ids,
            params,
            extension,
            body.stream,
            body.include_usage(),
            asked=[m.as_dict() for m in conversation] if self.capture else None,
            seen=chat if self.capture else None,
            route=route,
            question=question,
            shadow_prompt=shadow,
        )

    async def _chat_prompt(
        self,
        engine: TokenEngine,
        body: ChatCompletionRequest,
        profile: Any,
        conversation: list[Message],
        documents: list[Any],
        options: TailorOptions,
        question: str | None,
    ) -> tuple[list[dict[str, str]], list[int], SamplingParams]:
        """(the chat the engine sees, its tokens, the sampling parameters) of a chat request
        under ``profile``: its few-shot examples, template and defaults."""
        examples = await self.few_shot(profile, question)
        arguments = (profile, conversation, documents, options.variables, examples)
        try:
            if options.prompt_profile is not None:  # a template the caller wrote
                messages = await self.renderer.build_messages(*arguments)
            else:  # the namespace's own profile: off the event loop
                messages = await asyncio.to_thread(build_messages, *arguments)
        except PromptError as exc:
            raise APIError(
                400,
                f"the prompt profile could not be applied: {exc}",
                param="tailor.variables",
                code="invalid_prompt",
            ) from exc
        chat = [m.as_dict() for m in messages]
        prompt_ids = await self.preparer.tokens(engine.encode_chat, chat, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        response_format = await self.preparer.response_format(engine, body, profile)
        params = self.sampling(body, max_tokens, len(prompt_ids), profile, response_format)
        return chat, prompt_ids, params

    def ungated(self, adapter: str | None, test_key: str | None) -> str | None:
        """``adapter``, if it may answer this request: an adapter whose FineTuneJob's
        evaluation gate has not passed answers only requests with the test key (its
        Evaluation's), else 403 naming the gate."""
        why = self.run.gated_adapters.get(adapter or "")
        if why is None or self._has_test_key(test_key):
            return adapter
        raise APIError(
            403,
            f"adapter {adapter} is not served to users yet: {why}. It answers the "
            "deployment's Evaluations only (spec.adapters[].serveWithoutGate serves it anyway)",
            param="model",
            code="adapter_gated",
        )

    def _has_test_key(self, test_key: str | None) -> bool:
        return self.test_key is not None and hmac.compare_digest(
            (test_key or "").encode(), self.test_key.value().encode()
        )

    def _profile(self, options: TailorOptions, test_key: str | None) -> Any:
        """The prompt profile to answer with: the served one, or the revision the request
        brings (what a PromptProfile's test Job sends to try it), only with the test key:
        a profile replaces the operator's system prompt and runs a template."""
        served = self.profile.get() if self.profile else None
        if options.prompt_profile is None:
            return served
        if not self._has_test_key(test_key):
            raise APIError(
                403,
                "tailor.promptProfile is accepted only from this deployment's PromptProfile "
                "test Jobs (header X-Tailor-Test-Key with the deployment's test key, in its "
                "Secret *-test-key); send the request without it to use the served profile",
                param="tailor.promptProfile",
                code="prompt_profile_not_allowed",
            )
        try:
            return parse_profile(json.dumps(options.prompt_profile))
        except PromptError as exc:
            raise APIError(400, str(exc), param="tailor.promptProfile") from exc

    async def prepare_completion(
        self,
        body: CompletionRequest,
        caller: Caller,
        session: str = "",
        test_key: str | None = None,
    ) -> Generation:
        adapter, route = self.rollouts.assign(
            self.ungated(self.resolve_model(body.model, caller), test_key), session, self.adapters
        )
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
            prompt_ids = await self.preparer.tokens(engine.encode_text, prompt, "prompt")
        else:
            prompt_ids = [int(t) for t in prompt]
        _reject(not prompt_ids, "prompt", "the prompt is empty")
        profile = self.profile.get() if self.profile else None
        if route is not None and route.profile is not None:
            profile = route.profile  # its defaults (a completion's prompt is not templated)
        response_format = await self.preparer.response_format(engine, body, profile)
        params = self.sampling(body, body.max_tokens, len(prompt_ids), profile, response_format)
        return Generation(
            "completion",
            caller,
            body.model,
            adapter,
            prompt_ids,
            params,
            {},
            body.stream,
            body.include_usage(),
            asked=prompt if self.capture and isinstance(prompt, str) else None,
            seen=prompt if self.capture and isinstance(prompt, str) else None,
            route=route,
            question=prompt if isinstance(prompt, str) else None,
        )

    # -- answering
    async def respond(self, gen: Generation, started: float) -> Response:
        """Run a prepared generation (or find it in the cache) and answer it."""
        self.metrics.observe_adapter(gen.adapter)
        cache_key = self._cache_key(gen)
        if cache_key is not None and self.cache is not None:
            cached = self.cache.get(cache_key)
            self.metrics.observe_cache(gen.model, hit=cached is not None)
            if cached is not None:
                return self._answer_cached(gen, cached)

        reply = Reply.new(gen.kind, gen.model)
        self.remember(reply.id, gen)
        engine = self.require_engine()
        self.metrics.inflight_inc()
        # an engine that answers non-streamed requests whole has no first-token time then
        ttft = gen.stream or not engine.answers_whole
        tracker = Tracker(self.metrics, gen, started, cache_key, ttft, self._measured)
        chunks = engine.stream(gen.prompt_ids, gen.adapter, gen.params, incremental=gen.stream)
        try:
            first = await anext(chunks)  # submits; QueueFull surfaces here
        except BaseException as exc:
            tracker.abort()
            error = refusal(exc)
            if error is None:
                raise
            raise error from exc
        if gen.stream:
            return StreamingResponse(
                self._stream(gen, reply, first, chunks, tracker),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await whole(gen, first, chunks, tracker)
        if cache_key is not None and self.cache is not None:
            self.cache.put(cache_key, result)
        self.captured(gen, reply, result, started)
        self.shadow(gen, result["text"])
        return JSONResponse(reply.whole(result, {**self._extension(gen), "cached": False}))

    @staticmethod
    def _extension(gen: Generation) -> dict[str, Any]:
        """The response's ``tailor`` object: sources, and the rollout variant that answered."""
        if gen.route is None:
            return gen.extension
        return {**gen.extension, "variant": gen.route.variant}

    def _measured(self, gen: Generation, ok: bool, seconds: float, tokens: int) -> None:
        """A rollout request's answer (or failure), for its variant's book."""
        if gen.route is not None:
            self.rollouts.answered(gen.route, gen.route.variant, ok, seconds, tokens)

    def shadow(self, gen: Generation, stable_answer: str) -> None:
        """A shadow rollout's copy of ``gen`` for the candidate (never shown to the user)."""
        route, routing = gen.route, self.run.routing
        if route is not None and route.shadow and routing is not None and self.engine:
            judge = routing.rollout.analysis.judge
            prompt_ids, params = gen.shadow_prompt or (gen.prompt_ids, gen.params)
            self.shadows.copy(self.engine, route, prompt_ids, params, gen.question,
                              stable_answer, judge)  # fmt: skip

    def _cache_key(self, gen: Generation) -> str | None:
        """The response cache's key of a deterministic generation (temperature 0, or a
        seed); None when it is not cached. The caller is part of it: a hit (and its speed)
        would tell one caller what another one asked."""
        if self.cache is None or not (gen.params.temperature == 0 or gen.params.seed is not None):
            return None
        # the adapter's weights are part of the key: a replaced adapter answers anew
        served = self.adapter_set.served.get(gen.adapter) if gen.adapter else None
        weights = served.source if served else None
        return ResponseCache.key(
            gen.caller.identity, gen.kind, gen.model, weights, gen.prompt_ids, gen.params.__dict__
        )

    def _answer_cached(self, gen: Generation, cached: dict[str, Any]) -> Response:
        """A cached answer: remembered for ratings (of its variant, in a rollout), not
        measured (it cost nothing)."""
        reply = Reply.new(gen.kind, gen.model)
        self.remember(reply.id, gen)
        self.captured(gen, reply, cached, time.perf_counter())
        extension = {**self._extension(gen), "cached": True}
        if not gen.stream:
            return JSONResponse(reply.whole(cached, extension))

        async def events() -> AsyncIterator[str]:
            yield sse(reply.chunk("", None, role=True, extension=extension))
            yield sse(reply.chunk(cached["text"], None))
            yield sse(reply.chunk("", cached["finish_reason"]))
            if gen.include_usage:
                yield sse(reply.usage_chunk(cached["usage"]))
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _stream(
        self,
        gen: Generation,
        reply: Reply,
        first: Chunk,
        chunks: AsyncGenerator[Chunk, None],
        tracker: Tracker,
    ) -> AsyncIterator[str]:
        try:
            yield sse(reply.chunk("", None, role=True, extension=self._extension(gen)))
            chunk, parts = first, []
            while True:
                tracker.saw(chunk)
                parts.append(chunk.text)
                if chunk.finish_reason == "error":
                    error = APIError(500, chunk.error or "generation failed", "server_error")
                    yield sse(error.body())
                    break
                if chunk.text:
                    yield sse(reply.chunk(chunk.text, None))
                if chunk.finish_reason is not None:
                    yield sse(reply.chunk("", chunk.finish_reason))
                    counts = usage(len(gen.prompt_ids), chunk.completion_tokens)
                    if gen.include_usage:
                        yield sse(reply.usage_chunk(counts))
                    result = {
                        "text": "".join(parts),
                        "finish_reason": chunk.finish_reason,
                        "usage": counts,
                    }
                    if tracker.cache_key is not None and self.cache is not None:
                        self.cache.put(tracker.cache_key, result)
                    self.captured(gen, reply, result, tracker.started)
                    self.shadow(gen, "".join(parts))
                    break
                chunk = await anext(chunks)
            yield SSE_DONE
        finally:
            await finish(chunks, tracker)

    def remember(self, response_id: str, gen: Generation) -> None:
        self.desk.remember(response_id, gen.model, gen.caller.identity or "", gen.route)

    def captured(
        self, gen: Generation, reply: Reply, result: dict[str, Any], started: float
    ) -> None:
        """Queue an answered exchange for capture (spec.feedback), if it is sampled."""
        if self.capture is None or not self.capture.sampled(reply.id):
            return
        revisions = (self.run.prompt_profile_revision, self.run.knowledge_base_version)
        self.capture.append(gen.exchange(reply.id, result, started, *revisions))

    async def record_feedback(self, body: FeedbackRequest, caller: Caller) -> dict[str, Any]:
        return await self.desk.rate(body, caller, self.resolve_model)


def refusal(exc: BaseException) -> APIError | None:
    """The client's error for a request the engine did not take (None: not the client's)."""
    if isinstance(exc, QueueFull):
        return APIError(
            429,
            f"the server is busy ({exc}); retry later",
            "rate_limit_error",
            None,
            "queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineClosed):
        return APIError(503, "the server is shutting down", "server_error")
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc), "server_error", None, "engine_unavailable")
    if isinstance(exc, EngineRejected):
        return APIError(exc.status, str(exc), code="rejected_by_engine")
    if isinstance(exc, ValueError):  # the engine refused the prompt (submit)
        return APIError(400, str(exc), param="prompt", code="invalid_prompt")
    return None


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
