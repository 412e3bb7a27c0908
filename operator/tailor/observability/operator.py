"""Prometheus metrics of the operator: reconciliations, errors, durations, resources by
phase, time spent Queued and run durations. Names are the contract of the Grafana
dashboards and alert rules in the Helm chart (a test checks every name they use exists).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from threading import Lock

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RECONCILES = Counter(
    "tailor_operator_reconciliations_total",
    "Reconciliations by kind and result (ok, error).",
    ["kind", "result"],
)
RECONCILE_ERRORS = Counter(
    "tailor_operator_reconcile_errors_total", "Failed reconciliations by kind.", ["kind"]
)
RECONCILE_SECONDS = Histogram(
    "tailor_operator_reconcile_duration_seconds",
    "Time one reconciliation takes.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_DEPTH = Gauge("tailor_operator_workqueue_depth", "Keys waiting in the work queue.")
QUEUE_ADDS = Counter(
    "tailor_operator_workqueue_adds_total",
    "Keys added to the work queue, by outcome (queued, coalesced, requeued after a sync).",
    ["outcome"],
)
QUEUE_RETRIES = Counter(
    "tailor_operator_workqueue_retries_total", "Syncs retried after an error, by kind.", ["kind"]
)


IS_LEADER = Gauge("tailor_operator_leader", "1 while this replica holds the operator's Lease.")
RESOURCES = Gauge("tailor_operator_resources", "Resources by kind and phase.", ["kind", "phase"])
PROMPT_TEST_CASES = Gauge(
    "tailor_operator_prompt_test_cases",
    "Test cases of a PromptProfile revision by result (passed, failed), from its last run.",
    ["namespace", "profile", "revision", "result"],
)
EVALUATION_SCORES = Gauge(
    "tailor_operator_evaluation_score",
    "A finished Evaluation's result per candidate: each metric's value and the bounds of "
    "its 95% interval (0-1).",
    ["namespace", "evaluation", "candidate", "metric", "bound"],
)
EVALUATION_COST = Gauge(
    "tailor_operator_evaluation_cost_per_query_device_seconds",
    "A finished Evaluation's cost per question per candidate, in device-seconds.",
    ["namespace", "evaluation", "candidate"],
)
PHASE_TRANSITIONS = Counter(
    "tailor_operator_phase_transitions_total",
    "Phase changes by kind and new phase.",
    ["kind", "phase"],
)
QUEUED_SECONDS = Histogram(
    "tailor_operator_queued_seconds",
    "Time runs spent Queued (unschedulable) before they started, by kind.",
    ["kind"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
QUEUE_WAIT_SECONDS = Histogram(
    "tailor_operator_kueue_wait_seconds",
    "Time runs waited in a Kueue queue before each admission, by kind and LocalQueue.",
    ["kind", "queue"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
QUEUE_ADMISSIONS = Counter(
    "tailor_operator_kueue_admissions_total",
    "Admissions of runs by Kueue, by kind and LocalQueue.",
    ["kind", "queue"],
)
QUEUE_PREEMPTIONS = Counter(
    "tailor_operator_kueue_preemptions_total",
    "Preemptions of runs by Kueue, by kind and LocalQueue.",
    ["kind", "queue"],
)
RUN_SECONDS = Histogram(
    "tailor_operator_run_duration_seconds",
    "Duration of finished runs (training, indexing, RAFT) by kind and result.",
    ["kind", "result"],
    buckets=(10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
KB_LAST_INDEXED = Gauge(
    "tailor_knowledgebase_last_indexed_timestamp_seconds",
    "When each knowledge base last finished an index build.",
    ["namespace", "name"],
)
KB_NEXT_REFRESH = Gauge(
    "tailor_knowledgebase_next_refresh_timestamp_seconds",
    "When each scheduled knowledge base is next due for a refresh.",
    ["namespace", "name"],
)


class PhaseBook:
    """Keeps ``tailor_operator_resources`` exact: the phase of every resource seen."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str, str], str] = {}
        self._queued_since: dict[tuple[str, str, str], float] = {}
        self._lock = Lock()

    def record(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        key = (kind, namespace, name)
        with self._lock:
            old = self._phases.get(key)
            if old == phase:
                self._tick_queue(key, phase)
                return
            if old is not None:
                RESOURCES.labels(kind, old).dec()
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
                RESOURCES.labels(kind, phase).inc()
                PHASE_TRANSITIONS.labels(kind, phase).inc()
            self._tick_queue(key, phase)

    def _tick_queue(self, key: tuple[str, str, str], phase: str | None) -> None:
        now = time.monotonic()
        if phase == "Queued":
            self._queued_since.setdefault(key, now)
        elif key in self._queued_since:
            QUEUED_SECONDS.labels(key[0]).observe(now - self._queued_since.pop(key))

    def queued_for(self) -> list[tuple[tuple[str, str, str], float]]:
        """How long each run now Queued has waited, measured now (at scrape time): a run
        that no event touches while it waits still shows its wait growing."""
        now = time.monotonic()
        with self._lock:
            return [(key, now - since) for key, since in self._queued_since.items()]

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.record(kind, namespace, name, None)


PHASES = PhaseBook()


class QueuedFor(Collector):
    """``tailor_operator_queued_for_seconds``, computed from the PhaseBook at each scrape."""

    def __init__(self, book: PhaseBook) -> None:
        self._book = book

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for key, seconds in self._book.queued_for():
            family.add_metric(list(key), seconds)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "tailor_operator_queued_for_seconds",
            "How long each currently queued run has waited.",
            labels=["kind", "namespace", "name"],
        )


REGISTRY.register(QueuedFor(PHASES))


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    """Count and time one reconciliation."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        RECONCILE_ERRORS.labels(kind).inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - start)


API_REQUESTS = Counter(
    "tailor_operator_api_requests_total",
    "Requests the operator sent to the Kubernetes API, by client library, method and "
    "resource (plural, with its subresource: finetunejobs/status).",
    ["client", "method", "resource"],
)


def resource_of(url: object) -> str:
    """The resource a Kubernetes API URL addresses: ``jobs``, ``finetunejobs/status``."""
    from urllib.parse import urlsplit

    parts = [p for p in urlsplit(str(url)).path.split("/") if p]
    if "namespaces" in parts:
        at = parts.index("namespaces")
        rest = parts[at + 2 :] if len(parts) > at + 2 else ["namespaces"]
    else:
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if not rest:
        return ""
    return rest[0] + (f"/{rest[2]}" if len(rest) >= 3 else "")


def instrument_api_clients() -> None:
    """Count every API request of the operator process: kopf's watches and patches
    (aiohttp) and the runtime's reads and applies (kubernetes client, urllib3)."""
    import functools

    import aiohttp
    from kubernetes.client import rest

    original_rest = rest.RESTClientObject.request
    if getattr(original_rest, "_tailor_counted", False):
        return

    @functools.wraps(original_rest)
    def counted_rest(self: object, method: str, *args: object, **kwargs: object) -> object:
        url = args[0] if args else kwargs.get("url", "")
        API_REQUESTS.labels("kubernetes", method.upper(), resource_of(url)).inc()
        return original_rest(self, method, *args, **kwargs)  # type: ignore[arg-type,no-untyped-call]

    counted_rest._tailor_counted = True  # type: ignore[attr-defined]
    rest.RESTClientObject.request = counted_rest  # type: ignore[method-assign]

    original_aio = aiohttp.ClientSession._request

    @functools.wraps(original_aio)
    async def counted_aio(
        self: aiohttp.ClientSession, method: str, *args: object, **kwargs: object
    ) -> object:
        url = args[0] if args else kwargs.get("url", "")
        API_REQUESTS.labels("kopf", method.upper(), resource_of(url)).inc()
        return await original_aio(self, method, *args, **kwargs)  # type: ignore[arg-type]

    aiohttp.ClientSession._request = counted_aio  # type: ignore[method-assign,assignment]
