"""The operator's work queue: every reconcile goes through it, as in controller-runtime.

kopf handlers and child events only *add* a key (kind, namespace, name); a fixed set of
worker threads takes keys off the queue and runs the kind's ``sync``. The queue gives:

- **coalescing**: a key already waiting is not added twice, and a key added while a worker
  syncs it is synced once more afterwards: one sync in flight and one queued at most per
  object, however many pod or Job events arrive;
- **one worker per key**: an object is never synced by two threads at once, without a lock
  per object (and without threads blocked on such locks inside a pool);
- **retries with backoff**: a sync that raises is retried after 0.5 s, 1 s, 2 s, ... up to
  ``max_delay`` (events arriving meanwhile sync it sooner); a success resets the count.

Periodic resyncs (``resync``) add every unfinished object again, so an event lost while the
watch reconnected, or a failure after the last retry, is reconciled anyway.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from tailor.observability.operator import QUEUE_ADDS, QUEUE_DEPTH, QUEUE_RETRIES

log = logging.getLogger("tailor.operator")


class WorkQueue:
    """Keys processed by ``workers`` threads with ``handle(key)``; see the module doc."""

    def __init__(
        self,
        handle: Callable[[Any], None],
        workers: int = 8,
        base_delay: float = 0.5,
        max_delay: float = 60.0,
        name: str = "tailor-sync",
    ) -> None:
        self.handle = handle
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._later: list[tuple[float, int, Hashable]] = []
        self._order = itertools.count()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def add(self, key: Hashable) -> None:
        """Sync ``key`` soon: at once if idle, after the current sync if one runs."""
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        with self._cond:
            heapq.heappush(self._later, (time.monotonic() + delay, next(self._order), key))
            self._cond.notify()

    def _add_locked(self, key: Hashable, outcome: str = "queued") -> None:
        if key in self._queued:
            QUEUE_ADDS.labels("coalesced").inc()
            return
        if key in self._active:
            self._dirty.add(key)
            QUEUE_ADDS.labels("coalesced").inc()
            return
        self._queued.add(key)
        self._queue.append(key)
        QUEUE_ADDS.labels(outcome).inc()
        QUEUE_DEPTH.set(len(self._queue))
        self._cond.notify()

    def failures(self, key: Hashable) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def idle(self) -> bool:
        """Nothing waiting, nothing running (delayed retries aside)."""
        with self._cond:
            return not self._queue and not self._active

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _next(self) -> Hashable | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._add_locked(heapq.heappop(self._later)[2])
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._active.add(key)
                    QUEUE_DEPTH.set(len(self._queue))
                    return key
                wait = self._later[0][0] - now if self._later else None
                self._cond.wait(wait)
            return None

    def _work(self) -> None:
        while (key := self._next()) is not None:
            try:
                self.handle(key)
            except Exception as exc:
                with self._cond:
                    count = self._failures[key] = self._failures.get(key, 0) + 1
                delay = min(self.max_delay, self.base_delay * 2 ** (count - 1))
                QUEUE_RETRIES.labels(str(key[0]) if isinstance(key, tuple) else "").inc()
                log.warning("sync of %s failed (%s: %s); retry %d in %.1fs",
                            "/".join(map(str, key)) if isinstance(key, tuple) else key,
                            type(exc).__name__, exc, count, delay)  # fmt: skip
                self.add_after(key, delay)
            else:
                with self._cond:
                    self._failures.pop(key, None)
            finally:
                with self._cond:
                    self._active.discard(key)
                    if key in self._dirty:
                        self._dirty.discard(key)
                        self._add_locked(key, "requeued")
