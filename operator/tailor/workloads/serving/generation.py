"""One request on its way through the engine: what the gateway resolved for it
(:class:`Generation`), the timing the metrics and a rollout's books get once it ends
(:class:`Tracker`), and a non-streamed answer read whole."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from tailor.observability.serving import ServingMetrics
from tailor.workloads.serving.auth import Caller
from tailor.workloads.serving.engine.base import Chunk, SamplingParams
from tailor.workloads.serving.protocol import APIError, Kind, usage
from tailor.workloads.serving.rollout import Route


@dataclass
class Generation:
    """What the handlers resolved for one request, ready for the engine."""

    kind: Kind
    caller: Caller
    model: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    extension: dict[str, Any]
    stream: bool
    include_usage: bool
    asked: Any = None
    """What the caller sent (its messages, or the prompt), for capture."""
    seen: Any = None
    """What the engine saw (the messages after the profile and retrieval), for capture."""
    route: Route | None = None
    """The rollout's decision for this request (spec.rollout), if it is the rollout's."""
    question: str | None = None
    """The last user message (or the prompt): what a shadow judge is told was asked."""
    shadow_prompt: tuple[list[int], SamplingParams] | None = None
    """A shadow copy's own prompt and parameters, when the candidate's profile differs."""

    def exchange(
        self,
        reply_id: str,
        result: dict[str, Any],
        started: float,
        prompt_profile_revision: str | None,
        knowledge_base_version: str | None,
    ) -> dict[str, Any]:
        """The captured record of this request's answer (spec.feedback)."""
        sources = [
            {"id": s.get("id"), "document": s.get("document_id")}
            for s in self.extension.get("sources") or []
        ]
        route = self.route
        return {
            "type": "exchange",
            "id": reply_id,
            "time": time.time(),
            "caller": self.caller.identity or "",
            "model": self.model,
            "adapter": self.adapter,
            "promptProfileRevision": prompt_profile_revision,
            "knowledgeBaseVersion": knowledge_base_version,
            # a rollout's request: which variant (so which adapter, profile, index) answered
            "rollout": {"step": route.key, "variant": route.variant} if route else None,
            "kind": self.kind,
            "asked": self.asked,
            "seen": self.seen,
            "answer": result["text"],
            "finishReason": result["finish_reason"],
            "sources": sources,
            "retrieval": self.extension.get("retrieval"),
            "usage": result["usage"],
            "latencySeconds": round(time.perf_counter() - started, 4),
        }


class Tracker:
    """Per-request timing for the metrics: first token, totals, once at the end."""

    def __init__(
        self,
        metrics: ServingMetrics,
        gen: Generation,
        started: float,
        cache_key: str | None,
        ttft: bool = True,
        measured: Callable[[Generation, bool, float, int], None] | None = None,
    ):
        self.metrics, self.gen, self.started, self.cache_key = metrics, gen, started, cache_key
        self.measured = measured  # the rollout's books (a request routed by spec.rollout)
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
            self.metrics.inflight_dec()

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        self.metrics.inflight_dec()
        final = self.final
        seconds = time.perf_counter() - self.started
        completion = final.completion_tokens if final else 0
        self.metrics.observe_generation(
            self.gen.model,
            len(self.gen.prompt_ids),
            completion,
            seconds,
            self.first_token,
            final.device_seconds if final else 0.0,
        )
        if self.measured is not None:  # a client that went away is not the variant's error
            ok = final is not None and final.finish_reason not in ("error",)
            if final is None or final.finish_reason != "cancelled":
                self.measured(self.gen, ok, seconds, len(self.gen.prompt_ids) + completion)


async def whole(
    gen: Generation, first: Chunk, chunks: AsyncGenerator[Chunk, None], tracker: Tracker
) -> dict[str, Any]:
    """A non-streamed answer, its chunks read to the end: text, finish_reason and usage."""
    try:
        parts = [first.text]
        tracker.saw(first)
        last = first
        while last.finish_reason is None:
            last = await anext(chunks)
            tracker.saw(last)
            parts.append(last.text)
    finally:
        await finish(chunks, tracker)
    if last.finish_reason == "error":
        raise APIError(500, last.error or "generation failed", "server_error")
    return {
        "text": "".join(parts),
        "finish_reason": last.finish_reason,
        "usage": usage(len(gen.prompt_ids), last.completion_tokens),
    }


async def finish(chunks: AsyncGenerator[Chunk, None], tracker: Tracker) -> None:
    try:
        await chunks.aclose()  # cancels the engine request if it is still running
    finally:
        tracker.done()
