"""Kueue in the dev control plane: the real Kueue (built from the module proxy) admits Jobs
on kwok's fake GPU nodes against a ClusterQueue's GPU quota.

A private dev cluster (the session cluster keeps serving the other tests, and Kueue's Job
webhook must not outlive the test there): a ClusterQueue of 4 GPUs and three Jobs of 2 GPUs
each. Two run, the third waits with Kueue's quota message and its position from the
visibility API (an aggregated API the local process serves); deleting a running Job admits
it. A Job without a queue runs as before, and ``down`` leaves Jobs creatable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tailor.devcluster.cli import main
from tailor.devcluster.cluster import DevCluster
from tailor.devcluster.kueue import Kueue
from tests.cluster.helpers import gpu_job

pytestmark = pytest.mark.cluster

JOBS = "/apis/batch/v1/namespaces/default/jobs"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[DevCluster]:
    directory = tmp_path / "cluster"
    assert main(["up", "--dir", str(directory), "--kueue"]) == 0
    try:
        yield DevCluster(directory)
    finally:
        main(["down", "--dir", str(directory)])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def running(cluster: DevCluster, name: str) -> bool:
    pods = cluster.api(f"/api/v1/namespaces/default/pods?labelSelector=job-name%3D{name}")
    return any(p.get("status", {}).get("phase") == "Running" for p in pods["items"])


def suspended(cluster: DevCluster, name: str) -> bool:
    return bool(cluster.api(f"{JOBS}/{name}")["spec"].get("suspend"))


def workload_of(cluster: DevCluster, name: str) -> dict[str, Any] | None:
    workloads = cluster.api("/apis/kueue.x-k8s.io/v1beta2/namespaces/default/workloads")
    for workload in workloads["items"]:
        if any(o["name"] == name for o in workload["metadata"].get("ownerReferences", [])):
            return dict(workload)
    return None


def test_a_gpu_quota_admits_two_jobs_queues_the_third_and_admits_it_when_one_ends(
    cluster: DevCluster,
) -> None:
    Kueue(cluster).gpu_queue("gpus", gpus=4, namespaces=["default"])
    for name in ("train-a", "train-b", "train-c"):
        cluster.api(JOBS, "POST", gpu_job(name, 2, "gpus"))
        # one at a time, so the queue's order is the creation order
        wait_for(f"{name}'s workload", lambda n=name: workload_of(cluster, n))

    # Kueue's webhook suspended every queued Job; it unsuspends the two that fit the quota
    wait_for(
        "two Jobs running", lambda: running(cluster, "train-a") and running(cluster, "train-b")
    )
    assert suspended(cluster, "train-c") and not running(cluster, "train-c")
    waiting = workload_of(cluster, "train-c")
    assert waiting is not None
    reserved = next(c for c in waiting["status"]["conditions"] if c["type"] == "QuotaReserved")
    assert reserved["status"] == "False"
    assert "insufficient unused quota for nvidia.com/gpu" in reserved["message"], reserved

    # its position, from the visibility API served by Kueue through the aggregation layer
    pending = cluster.api(
        "/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/default/localqueues/gpus/pendingworkloads"
    )
    assert [(w["metadata"]["name"], w["positionInLocalQueue"]) for w in pending["items"]] == [
        (waiting["metadata"]["name"], 0)
    ]

    # the quota frees: the waiting Job is admitted and runs
    cluster.api(f"{JOBS}/train-a", "DELETE", {"propagationPolicy": "Background"})
    wait_for("train-c running", lambda: running(cluster, "train-c"))
    assert not suspended(cluster, "train-c")

    # a Job without a queue is not Kueue's: it is neither suspended nor held
    cluster.api(JOBS, "POST", gpu_job("plain", 1, None))
    wait_for("the plain Job running", lambda: running(cluster, "plain"))

    # down: Kueue's webhooks go with it, so the cluster still takes Jobs
    Kueue(cluster).down()
    hooks = cluster.api("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations")
    assert not [h for h in hooks["items"] if h["metadata"]["name"].startswith("kueue-")]
    services = cluster.api("/apis/apiregistration.k8s.io/v1/apiservices")["items"]
    assert not [s for s in services if s["spec"].get("group") == "visibility.kueue.x-k8s.io"]
    cluster.api(JOBS, "POST", gpu_job("after", 1, None))
    wait_for("a Job created after Kueue stopped", lambda: running(cluster, "after"))
