"""The one OpenAI-compatible chat client every workload that talks to a model uses.

A :class:`ChatClient` sends ``/chat/completions`` (and ``/models``) requests to one endpoint
with httpx: an optional API key (a bearer token), a timeout, no proxy from the environment
(``trust_env=False``: endpoints are in-cluster Services or checked external URLs), an
optional transport (the RAFT teacher passes ``io.fetch.GuardedTransport`` so every request's
URL is checked) and bounded retries with exponential backoff on connection errors, timeouts
and the statuses a retry can change (408, 429, 5xx). Any other 4xx is a refusal and is not
retried. A request that fails for good raises :class:`ChatError`, whose text is the last
error (``HTTP 503: <the body's first 300 characters>`` or ``ConnectError: ...``); callers
turn it into their own reasons. Used by the prompt tests, the RAFT teacher and the RAFT
evaluation.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

import httpx

log = logging.getLogger("tailor.workloads.evaluation.chat")

ATTEMPTS = 4
"""Requests per call, the first included."""
BACKOFF_SECONDS = 1.0
"""The wait before the first retry; it doubles before each next one (1, 2, 4 s)."""
ERROR_BODY_CHARS = 300
"""How much of a failed response's body an error quotes."""


def retryable(status: int) -> bool:
    """Whether a retry can change an HTTP status: timeouts, rate limits, server errors."""
    return status in (408, 429) or status >= 500


class ChatError(RuntimeError):
    """A request that failed for good. ``refused``: the server answered with a status no
    retry changes (a 4xx other than 408 and 429); otherwise the retries ran out.
    ``status`` is the last HTTP status (``None`` when no response came)."""

    def __init__(self, message: str, *, refused: bool, status: int | None = None):
        super().__init__(message)
        self.refused = refused
        self.status = status


class ChatClient:
    """An OpenAI-compatible endpoint; thread-safe (one per endpoint, shared by workers)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 300,
        attempts: int = ATTEMPTS,
        backoff: float = BACKOFF_SECONDS,
        transport: httpx.BaseTransport | None = None,
    ):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.attempts = attempts
        self.backoff = backoff
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={
                **({"Authorization": f"Bearer {api_key}"} if api_key else {}),
                **(headers or {}),
            },
            timeout=timeout,
            transport=transport,
            trust_env=False,
        )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON answer to one request, retried as the module says; ``ChatError`` else."""
        error, status = "", None
        for attempt in range(self.attempts):
            try:
                response = self.http.request(method, path, json=body)
            except httpx.HTTPError as exc:
                error, status = f"{type(exc).__name__}: {exc}", None
            else:
                if response.status_code < 400:
                    return dict(response.json())
                status = response.status_code
                error = f"HTTP {status}: {response.text[:ERROR_BODY_CHARS]}"
                if not retryable(status):
                    raise ChatError(error, refused=True, status=status)
            if attempt + 1 < self.attempts:
                delay = self.backoff * 2**attempt
                log.warning(
                    "%s %s%s failed (%s); retry %d of %d in %.1f s",
                    method,
                    self.http.base_url,
                    path,
                    error,
                    attempt + 1,
                    self.attempts - 1,
                    delay,
                )
                time.sleep(delay)
        raise ChatError(error, refused=False, status=status)

    def models(self) -> list[str]:
        """The ids the endpoint's ``GET /models`` lists, in its order."""
        return [str(m["id"]) for m in self.request("GET", "/models").get("data") or []]

    def complete(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """The whole ``/chat/completions`` response (choices, usage, a server's extras such
        as Tailor's ``tailor.sources``); ``params`` are the request's other fields (model,
        temperature, max_tokens, tailor, ...)."""
        return self.request("POST", "/chat/completions", {"messages": messages, **params})

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> str:
        """The first choice's text (empty when the model wrote none)."""
        response = self.complete(messages, **params)
        return str(response["choices"][0]["message"]["content"] or "")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
