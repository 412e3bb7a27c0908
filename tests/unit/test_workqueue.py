"""The operator's work queue with real threads: coalescing, one worker per key, retries."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from tailor.controllers.workqueue import WorkQueue


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_events_during_a_sync_coalesce_into_one_more_sync() -> None:
    release = threading.Event()
    calls: Counter[Any] = Counter()

    def handle(key: Any) -> None:
        calls[key] += 1
        release.wait(5)

    queue = WorkQueue(handle, workers=4)
    try:
        queue.add("a")
        wait_until(lambda: calls["a"] == 1)
        for _ in range(50):  # 50 pod events while the first sync runs
            queue.add("a")
        release.set()
        wait_until(queue.idle)
        time.sleep(0.05)
        assert calls["a"] == 2  # the one in flight, and one for everything that came meanwhile
    finally:
        queue.stop()


def test_waiting_keys_are_not_added_twice() -> None:
    gate = threading.Event()
    calls: Counter[Any] = Counter()

    def handle(key: Any) -> None:
        if key == "blocker":
            gate.wait(5)
        calls[key] += 1

    queue = WorkQueue(handle, workers=1)
    try:
        queue.add("blocker")  # the only worker is busy: "b" waits in the queue
        wait_until(lambda: not queue.idle() and queue.failures("b") == 0)
        for _ in range(20):
            queue.add("b")
        gate.set()
        wait_until(queue.idle)
        time.sleep(0.05)
        assert calls == Counter({"blocker": 1, "b": 1})
    finally:
        queue.stop()


def test_a_key_is_never_synced_by_two_workers_at_once() -> None:
    running: Counter[Any] = Counter()
    most: Counter[Any] = Counter()
    lock = threading.Lock()
    total = Counter[Any]()

    def handle(key: Any) -> None:
        with lock:
            running[key] += 1
            most[key] = max(most[key], running[key])
            total[key] += 1
        time.sleep(0.002)
        with lock:
            running[key] -= 1

    queue = WorkQueue(handle, workers=8)
    try:
        for i in range(400):
            queue.add(f"k{i % 4}")
            if i % 10 == 0:
                time.sleep(0.001)
        wait_until(queue.idle)
        time.sleep(0.05)
        assert set(most.values()) == {1}
        assert all(total[f"k{i}"] >= 1 for i in range(4))
    finally:
        queue.stop()


def test_a_failing_sync_is_retried_with_growing_delays_until_it_succeeds() -> None:
    attempts: list[float] = []

    def handle(key: Any) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 3:
            raise RuntimeError("the API server said 500")

    queue = WorkQueue(handle, workers=2, base_delay=0.05, max_delay=1.0)
    try:
        queue.add(("FineTuneJob", "ns", "a"))
        wait_until(lambda: len(attempts) == 4)
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.195  # 0.05, 0.1, 0.2
        wait_until(queue.idle)
        assert queue.failures(("FineTuneJob", "ns", "a")) == 0  # a success resets the count
        time.sleep(0.3)
        assert len(attempts) == 4  # and nothing retries a success
    finally:
        queue.stop()
