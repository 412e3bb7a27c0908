"""The operator's phase book: the queued-for gauge is measured at scrape time."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from tailor.observability.operator import PHASES

LABELS = {"kind": "FineTuneJob", "namespace": "unit-metrics", "name": "waits"}


def queued_for() -> float | None:
    return REGISTRY.get_sample_value("tailor_operator_queued_for_seconds", LABELS)


def test_a_queued_run_shows_its_wait_growing_without_another_event() -> None:
    PHASES.record("FineTuneJob", "unit-metrics", "waits", "Queued")
    try:
        first = queued_for()
        assert first is not None and first >= 0
        time.sleep(0.2)
        later = queued_for()
        assert later is not None and later >= first + 0.15  # no record() in between
        before = (
            REGISTRY.get_sample_value(
                "tailor_operator_queued_seconds_count", {"kind": "FineTuneJob"}
            )
            or 0.0
        )
        PHASES.record("FineTuneJob", "unit-metrics", "waits", "Running")
        assert queued_for() is None  # no longer queued: the series is gone
        after = REGISTRY.get_sample_value(
            "tailor_operator_queued_seconds_count", {"kind": "FineTuneJob"}
        )
        assert after == before + 1  # the wait went into the histogram once
    finally:
        PHASES.forget("FineTuneJob", "unit-metrics", "waits")
