"""The CPU work a request brings before generation (tokenising it, checking and compiling its
``response_format``), off the event loop and bounded in time: the admin's
``workloads.serving.limits.prepareSeconds``.

Before, a JSON schema of 1500 properties (42 KB) took xgrammar ~25 s to compile on the event
loop: every request and probe waited. Now the request is answered 400 when its work is not
done in time. A thread cannot be stopped, so work past the limit goes on until it ends (for a
schema, its compile; bodies are capped by ``maxBodyBytes``): formats are compiled one at a
time (a lane), so such leftovers hold at most one core, and a request that waited for the lane
longer than the limit is refused without starting. Requests without a format never wait for
the lane.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tailor.workloads.serving.engine.base import TokenEngine
from tailor.workloads.serving.engine.grammar import FormatError, format_key
from tailor.workloads.serving.protocol import APIError, GenerationParameters

T = TypeVar("T")


class PrepareTimeout(Exception):
    """The work was not done within the limit (it may still be running)."""


class Preparer:
    """Runs a request's preparation in daemon threads (a server that stops does not wait
    for a leftover compile), each answered within ``seconds`` or PrepareTimeout."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._format_lane = threading.Lock()  # one format compile at a time

    async def tokens(self, encode: Callable[[Any], list[int]], what: Any, param: str) -> list[int]:
        """A prompt's token ids (any number tokenised at once: bodies are capped); 413
        naming the limit when not done in time."""
        try:
            return await self._bounded(None, encode, what)
        except PrepareTimeout as exc:
            raise APIError(
                413,
                f"the {param} were not tokenised within {self.seconds:g} s, this server's "
                "limit (the cluster admin's workloads.serving.limits.prepareSeconds): send less",
                param=param,
                code="request_too_large",
            ) from exc

    async def response_format(
        self, engine: TokenEngine, body: GenerationParameters, profile: Any
    ) -> str | None:
        """The format key of the request's ``response_format``, else the profile's; checked
        and compiled here (one at a time), so a schema that cannot be enforced, or not in
        time, is a 400 naming the field."""
        if body.response_format is not None:
            param, given = "response_format", body.response_format
            if given.type == "json_schema" and given.json_schema is None:
                raise APIError(
                    400,
                    "response_format: json_schema needs response_format.json_schema.schema",
                    param=param,
                    code="invalid_response_format",
                )
            kind, schema = given.type, given.json_schema.schema_ if given.json_schema else None
        elif profile is not None and profile.response_format is not None:
            param = "promptProfile.responseFormat"
            kind, schema = profile.response_format.type, profile.response_format.schema_
        else:
            return None

        def compiled() -> str | None:
            key = format_key(kind, schema)
            engine.check_format(key)
            return key

        try:
            return await self._bounded(self._format_lane, compiled)
        except FormatError as exc:
            message = f"{param}: {exc}"
        except PrepareTimeout:
            message = (
                f"{param}: not checked and compiled within {self.seconds:g} s, this server's "
                "limit (the cluster admin's workloads.serving.limits.prepareSeconds; formats "
                "are compiled one at a time): send a smaller schema, or retry"
            )
        raise APIError(400, message, param=param, code="invalid_response_format")

    async def _bounded(self, lane: threading.Lock | None, work: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        abandoned = threading.Event()

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():  # answered already (timed out, or the client went away)
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def run() -> None:
            if lane is not None and not lane.acquire(timeout=self.seconds):
                return  # the request has been answered by now
            try:
                if abandoned.is_set():
                    return
                result, error = work(*args), None
            except BaseException as exc:  # raised in the request's task
                result, error = None, exc
            finally:
                if lane is not None:
                    lane.release()
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                pass  # the event loop has stopped: no one waits

        threading.Thread(target=run, name="tailor-prepare", daemon=True).start()
        try:
            return await asyncio.wait_for(done, self.seconds)
        except TimeoutError as exc:
            raise PrepareTimeout(f"not done within {self.seconds:g} s") from exc
        finally:
            abandoned.set()
