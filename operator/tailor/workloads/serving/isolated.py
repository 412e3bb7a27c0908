"""Prompt profiles a request brings (``tailor.promptProfile``, a PromptProfile's test Job
trying a revision) are rendered in a process of their own, with a time and a memory limit.

A Jinja2 template is a program: the sandbox stops it from reaching Python's internals and
caps ``*`` and ``**``, but not loops (``{% for a in range(99999) %}{% for b in range(99999)
%}{% endfor %}{% endfor %}``) or filters with huge arguments (``center``, ``lipsum``). In the
server's own process such a template would hold the event loop (``/healthz`` stalls, the
kubelet restarts the pod) or exhaust its memory. Here the worker is killed when it runs past
``ServingLimits.template_seconds`` and started again for the next request; its address space
is capped, so a memory bomb ends in a MemoryError there. The served profile (the namespace's
own PromptProfile, checked when it was applied) renders in the server, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import resource
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from tailor.workloads.serving.prompting import PromptError, build_messages

log = logging.getLogger("tailor.workloads.serving.isolated")

# Workers fork from a fork server that imported this module once (not from the serving
# process, whose threads make fork unsafe): a worker killed past its time is replaced in
# milliseconds, where a spawned one would import for seconds.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])

WORKER_MEMORY_BYTES = 1 << 30
"""Address space of the rendering process (its imports take ~150 MB)."""


@dataclass(frozen=True)
class Document:
    """A retrieved chunk as the template sees it (picklable)."""

    text: str
    title: str | None
    source: str | None


def _worker(conn: Connection) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    conn.send((True, "ready"))  # imports done: the time limit counts rendering only
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, build_messages(*args)))
        except PromptError as exc:
            conn.send((False, (str(exc), exc.param)))
        except MemoryError:
            conn.send((False, ("the template needs more memory than allowed", "template")))
        except Exception as exc:  # anything a template can raise is the template's fault
            conn.send((False, (f"{type(exc).__name__}: {exc}", "template")))


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """multiprocessing has each child import the parent's ``__main__`` (here the serving
    app: FastAPI, torch; seconds per worker) unless ``__main__`` names no module or file.
    The worker needs only this module, which its fork server has imported."""
    main = sys.modules["__main__"]
    saved: dict[str, Any] = {
        k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__
    }
    main.__dict__.update(__spec__=None)
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


class IsolatedRenderer:
    """``build_messages`` in a worker process, one request at a time, killed past
    ``seconds``; a refusal is a PromptError naming the limit."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._process: Any = None
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()  # one render at a time
        self._starting = threading.Lock()  # one worker start at a time

    def start(self) -> None:
        """Start the worker now (its imports take seconds), not on the first request."""
        threading.Thread(target=self._started, name="tailor-template-start", daemon=True).start()

    async def build_messages(
        self, profile: Any, conversation: list[Any], documents: list[Any], *rest: Any
    ) -> list[Any]:
        docs = [Document(d.text, d.title, d.source) for d in documents]
        async with self._lock:
            conn = await asyncio.to_thread(self._started)
            conn.send((profile, conversation, docs, *rest))
            if not await asyncio.to_thread(conn.poll, self.seconds):
                self.close()
                self.start()  # the next request finds a worker ready
                raise PromptError(
                    f"rendering the template took more than {self.seconds:g} s, this server's "
                    "limit (workloads.serving.limits.templateSeconds): simplify it",
                    "template",
                )
            try:
                ok, value = conn.recv()
            except EOFError:  # killed (out of memory beyond MemoryError)
                self.close()
                self.start()
                raise PromptError("the template could not be rendered", "template") from None
        if not ok:
            raise PromptError(*value)
        return list(value)

    def _started(self) -> Connection:
        with self._starting:
            return self._start_if_needed()

    def _start_if_needed(self) -> Connection:
        if self._conn is None or self._process is None or not self._process.is_alive():
            self.close()
            parent, child = _CONTEXT.Pipe()
            process = _CONTEXT.Process(
                target=_worker, args=(child,), name="tailor-template", daemon=True
            )
            with _without_main_module():
                process.start()
            child.close()
            if not parent.poll(60):
                process.kill()
                raise PromptError("the template worker did not start", "template")
            parent.recv()
            self._process, self._conn = process, parent
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
