"""Child events coalesce per parent: a burst of real pod events from the API server's watch
ends in at most two reconciles of the FineTuneJob they name (one running, one queued),
however many events arrive."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import fine_tune

pytestmark = pytest.mark.cluster


def test_a_burst_of_pod_events_ends_in_at_most_two_syncs(
    kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes import client, config, watch

    from tailor.api.settings import OperatorSettings
    from tailor.controllers import context, finetunejob  # noqa: F401 (registers its sync)
    from tailor.controllers.children import owners_of

    ns = namespace
    kube.apply(fine_tune("busy", 0), "-n", ns)  # no operator runs in this namespace
    labels = {"app.kubernetes.io/managed-by": "tailor", "tailor.dev/finetunejob": "busy"}
    pod = {
        "metadata": {"name": "busy-train-0", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "cpu-0"},
    }
    api = config.new_client_from_config(str(kube.kubeconfig))  # type: ignore[no-untyped-call]
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(ns, pod)

    syncs: list[float] = []

    def slow_sync(op: context.Operator, body: dict[str, Any]) -> None:
        syncs.append(time.monotonic())
        time.sleep(1.5)  # a reconcile that takes a while, as under load

    monkeypatch.setitem(context.SYNCERS, "FineTuneJob", slow_sync)
    op = context.Operator(OperatorSettings(), runtime=None, api_client=api, namespaces=[ns])  # type: ignore[arg-type]
    events: list[str] = []
    done = threading.Event()

    def route() -> None:  # what the operator's pod watch handler does with each event
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_pod, ns, timeout_seconds=60):
            obj = event["object"]
            if obj.metadata.name != "busy-train-0" or not obj.metadata.annotations:
                continue
            events.append(event["type"])
            for kind, name in owners_of(obj.metadata.labels or {}):
                op.enqueue(kind, ns, name)
            if len(events) >= 20 or done.is_set():
                w.stop()

    watcher = threading.Thread(target=route, daemon=True)
    watcher.start()
    time.sleep(1)
    try:
        for i in range(20):  # 20 real MODIFIED events of the run's pod
            core.patch_namespaced_pod(
                "busy-train-0", ns, {"metadata": {"annotations": {"n": str(i)}}}
            )
        watcher.join(30)
        deadline = time.monotonic() + 30
        while not op.queue.idle() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        done.set()
        op.stop()
    assert len(events) >= 20, events
    assert 1 <= len(syncs) <= 2, f"{len(events)} pod events, {len(syncs)} syncs"
