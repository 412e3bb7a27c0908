"""The serving workload: ``python -m tailor.workloads.serving.app --spec FILE`` (FILE = ServeRun).

An OpenAI-compatible HTTP server (FastAPI + uvicorn) for one base model and any number of
LoRA adapters: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both also as
server-sent events with ``data: [DONE]``), ``GET /v1/models``, ``POST /v1/feedback``
(thumbs up or down on a response id), ``/healthz``, ``/readyz`` (ready once the model is
loaded) and ``/metrics``. The request's ``model`` picks the base model (``<served name>``)
or an adapter (``<served name>/<adapter>``). Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

This module is the HTTP face: the routes, the request counter and the program's ``main``.
The wire models and bodies are :mod:`~tailor.workloads.serving.protocol`; a request becomes
a generation in :mod:`~tailor.workloads.serving.gateway` (prompt profiles, RAG, cache,
adapters, auth); generation itself is a token engine (:mod:`~tailor.workloads.serving.engine`:
the builtin continuous-batching scheduler, or vLLM over HTTP).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailor.api.workloads import TEST_KEY_HEADER, ServedAdapter, ServeRun
from tailor.observability.serving import ServingMetrics
from tailor.workloads.errors import RetryableError, WorkloadError
from tailor.workloads.program import limit_cpu_threads, run_main, spec_path
from tailor.workloads.serving.adapters import SpecWatcher, pull_adapters, serve_metrics
from tailor.workloads.serving.auth import Caller
from tailor.workloads.serving.engine.base import TokenEngine
from tailor.workloads.serving.engine.builtin import load_engine
from tailor.workloads.serving.engine.loading import check_adapters
from tailor.workloads.serving.engine.upstream import load_upstream
from tailor.workloads.serving.gateway import Server
from tailor.workloads.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    LoraAdapterRequest,
    model_card,
    validation_error,
)

log = logging.getLogger("tailor.workloads.serving.app")


# ------------------------------------------------------------------ the app
def create_app(
    run: ServeRun,
    *,
    engine: TokenEngine | None = None,
    metrics: ServingMetrics | None = None,
    loader: Callable[[], TokenEngine] | None = None,
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
    server = Server(run, metrics, engine, loader, engine_loader(run, metrics), on_load_failure)

    app = FastAPI(
        title=f"Tailor: {run.served_name}",
        lifespan=_lifespan(server, spec_file, owns_engine),
        exception_handlers=_error_handlers(),
    )
    app.state.server = server
    app.add_middleware(_LimitBody, max_bytes=run.limits.max_body_bytes)
    app.add_middleware(_LimitConcurrency, most=run.limits.max_concurrent_requests)
    app.add_middleware(_CountRequests, metrics=metrics)  # outermost: counts the 413s, 503s
    app.include_router(probes)
    if not run.metrics_port or run.metrics_port == run.port:
        # only without a metrics port of its own (in a pod it has one: the API port then
        # serves no /metrics, which would tell any client the traffic of every model)
        app.include_router(metrics_route)
    if run.adapter_api:
        # vLLM's runtime adapter API, for a gateway in front of this server (tests, and
        # Tailor's engine behind another gateway); off by default: it loads any path
        app.include_router(adapter_api)
    app.include_router(openai_api)
    return app


def engine_loader(
    run: ServeRun, metrics: ServingMetrics
) -> Callable[[list[ServedAdapter]], TokenEngine]:
    """What loads the run's engine with a list of adapters: vLLM (or another server) over
    HTTP when the run has an upstream, else the llama.cpp or the builtin engine on the run's
    model, as ``spec.engine`` resolves."""
    upstream = run.upstream
    if upstream is not None:

        def load_from_upstream(adapters: list[ServedAdapter]) -> TokenEngine:
            return load_upstream(
                upstream,
                run.spec.base_model,
                adapters,
                run.paths,
                run.spec.max_context_tokens,
                metrics,
            )

        return load_from_upstream

    def load_in_process(adapters: list[ServedAdapter]) -> TokenEngine:
        if run.spec.resolved_engine() == "llamacpp":
            from tailor.workloads.serving.engine.llamacpp import load_llama_engine

            return load_llama_engine(run.spec, adapters, run.paths, metrics)
        return load_engine(run.spec, adapters, run.paths, metrics)

    return load_in_process


def _lifespan(
    server: Server, spec_file: Path | None, owns_engine: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Startup (load the engine unless given one, watch the spec file) and shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if server.engine is None:
            threading.Thread(target=server.load, name="tailor-load", daemon=True).start()
        watcher = SpecWatcher(spec_file, server.apply_run).start() if spec_file else None
        yield
        if watcher is not None:
            watcher.stop()
        server.renderer.close()
        if server.capture is not None:  # the open segment is published, not left behind
            await asyncio.to_thread(server.capture.close)
        if owns_engine and server.engine is not None:
            await server.engine.aclose()

    return lifespan


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


async def _authorized(request: Request) -> None:
    request.state.caller = _server(request).access.caller(request)


def _caller(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller


async def _unscoped(request: Request) -> None:
    """The runtime adapter API changes what every caller is served: a key for every model
    only (without auth, anyone: the API is off unless the run turns it on)."""
    if _caller(request).adapters is not None:
        raise APIError(
            403,
            "this API key is scoped to some models (auth.keys); loading and unloading "
            "adapters needs the key for every model (auth.apiKeySecretRef)",
            "permission_error",
            code="key_scoped",
        )


# ------------------------------------------------------------------ errors
def _error_response(request: Request, error: APIError) -> JSONResponse:
    request.state.error_type = error.type
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(request, exc)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(request, validation_error(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(request, APIError(exc.status_code, str(exc.detail), code=code))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # the exception's text stays in the log: it may hold paths, hosts or data
    incident = uuid.uuid4().hex[:12]
    log.exception("unhandled error (incident %s)", incident)
    message = f"internal error (incident {incident}); the server's log has the details"
    return _error_response(request, APIError(500, message, "server_error"))


def _error_handlers() -> dict[
    int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]
]:
    """Every error answered in OpenAI's shape (an unexpected one without its details)."""
    return {
        APIError: _api_error,
        RequestValidationError: _invalid_request,
        StarletteHTTPException: _http_error,
        Exception: _internal_error,
    }


# ------------------------------------------------------------------ routes
probes = APIRouter()


@probes.get("/healthz", response_class=PlainTextResponse)
async def healthz(request: Request) -> Response:
    server = _server(request)
    if server.load_error:  # its text (paths, hosts) stays in the log
        return PlainTextResponse("model failed to load; the server's log has the details", 503)
    return PlainTextResponse("ok")


@probes.get("/readyz", response_class=PlainTextResponse)
async def readyz(request: Request) -> Response:
    server = _server(request)
    if server.engine is None:
        return PlainTextResponse("model failed to load" if server.load_error else "loading", 503)
    return PlainTextResponse("ready")


metrics_route = APIRouter()


@metrics_route.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    registry = _server(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


adapter_api = APIRouter(dependencies=[Depends(_authorized), Depends(_unscoped)])


@adapter_api.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoraAdapterRequest, request: Request) -> Response:
    server = _server(request)
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
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@adapter_api.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: LoraAdapterRequest, request: Request) -> Response:
    server = _server(request)
    adapter = server.upstream_adapter(body.lora_name)
    if adapter not in server.adapters:
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.")
    await asyncio.to_thread(server.require_engine().unload_adapter, adapter)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


openai_api = APIRouter(dependencies=[Depends(_authorized)])


@openai_api.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    server = _server(request)
    # a scoped key sees only its own; a gated adapter only the test key
    names = server.listed_models(_caller(request), request.headers.get(TEST_KEY_HEADER))
    cards = [model_card(m, server.name, server.created) for m in names]
    return {"object": "list", "data": cards}


@openai_api.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    server = _server(request)
    server.resolve_model(model, _caller(request))
    return model_card(model, server.name, server.created)


@openai_api.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    server = _server(request)
    request.state.model = body.model if body.model in server.model_names() else "unknown"
    test_key = request.headers.get(TEST_KEY_HEADER)
    caller = _caller(request)
    session = server.rollouts.session(request.headers, body.user, caller)
    gen = await server.prepare_chat(body, caller, test_key, session)
    return await server.respond(gen, request.state.started)


@openai_api.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    server = _server(request)
    request.state.model = body.model if body.model in server.model_names() else "unknown"
    caller = _caller(request)
    session = server.rollouts.session(request.headers, body.user, caller)
    test_key = request.headers.get(TEST_KEY_HEADER)
    gen = await server.prepare_completion(body, caller, session, test_key)
    return await server.respond(gen, request.state.started)


@openai_api.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
    answer = await _server(request).record_feedback(body, _caller(request))
    request.state.model = answer["model"]
    return answer


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


class _LimitConcurrency:
    """At most ``most`` requests at once (Helm: workloads.serving.limits.
    maxConcurrentRequests), counted from their first byte, so also while their bodies come
    in (each buffered up to maxBodyBytes: many slow uploads could take the replica's
    memory); past it 503 with Retry-After, naming the limit. The probes are not counted and
    never refused: a flood must not fail the liveness probe and have the kubelet restart
    a replica (a model load). Not uvicorn's ``limit_concurrency``: it refuses the probes
    too, and counts idle connections."""

    PROBES = ("/healthz", "/readyz")

    def __init__(self, app: Any, most: int):
        self.app, self.most, self.running = app, most, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.PROBES:
            await self.app(scope, receive, send)
            return
        if self.running >= self.most:
            scope.setdefault("state", {})["error_type"] = "server_error"
            error = APIError(
                503,
                f"this server already handles {self.most} requests, its limit (the cluster "
                "admin's workloads.serving.limits.maxConcurrentRequests); retry shortly",
                "server_error",
                code="too_many_requests_at_once",
                headers={"Retry-After": "1"},
            )
            response = JSONResponse(error.body(), 503, headers=error.headers)
            await response(scope, receive, send)
            return
        self.running += 1  # one event loop: no lock
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


class _LimitBody:
    """Request bodies over ``max_bytes`` (Helm: workloads.serving.limits.maxBodyBytes) are
    answered 413 before the app reads them: by Content-Length when the client sends one,
    else while the body streams in (it is buffered up to the limit, as FastAPI would)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode() or "0"
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("state", {})["error_type"] = "invalid_request_error"
        error = APIError(
            413,
            f"the request body is larger than {self.max_bytes} bytes, this server's limit "
            "(the cluster admin's workloads.serving.limits.maxBodyBytes): send less",
            code="request_too_large",
        )
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


# ------------------------------------------------------------------ entry point
def serve(run: ServeRun, spec_file: Path) -> None:
    """Serve ``run`` until stopped (SIGTERM); a model that fails to load stops the server
    and is raised here: its WorkloadError, else a RetryableError (ModelLoadFailed)."""
    import uvicorn

    pull_adapters(run)
    check_adapters(run.adapters)
    if run.upstream is None and run.spec.resolved_engine() == "llamacpp":
        # llama.cpp's threads do the model's work; torch (the sampler, a retriever's query
        # embedding) keeps one thread: torch ships a libgomp.so.1 of the same name, so the two
        # share one OpenMP runtime, and once torch had run on two threads llama.cpp's
        # tokens/s halved on 2 cores (70 -> 34, 2026-12-07)
        limit_cpu_threads(1)
    elif run.upstream is None:  # the builtin engine runs torch here
        limit_cpu_threads()
    metrics = ServingMetrics(run.served_name)
    failure: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    app = create_app(run, metrics=metrics, on_load_failure=stop, spec_file=spec_file)
    if run.metrics_port and run.metrics_port != run.port:
        serve_metrics(run.metrics_port, metrics.registry, app.state.server.report)
    server = uvicorn.Server(
        uvicorn.Config(app, host=run.host, port=run.port, timeout_graceful_shutdown=30)
    )
    server.run()
    if failure:
        error = failure[0]
        if isinstance(error, WorkloadError):
            raise error
        raise RetryableError(
            "ModelLoadFailed", f"the model could not be loaded: {type(error).__name__}: {error}"
        ) from error


def main(argv: list[str] | None = None) -> int:
    """Serve until stopped. Exit codes (:func:`~tailor.workloads.program.run_main`): 0
    stopped, 2 a problem the user can fix (invalid spec, missing adapter or secret, nf4
    without a GPU), 1 anything else."""
    return run_main(
        ServeRun, lambda run: serve(run, spec_path(argv)), argv, failure_reason="ServingFailed"
    )


if __name__ == "__main__":
    sys.exit(main())
