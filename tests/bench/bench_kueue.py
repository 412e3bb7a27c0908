"""Admission latency with Kueue: quota frees -> training pod created.

On a private dev cluster with the real Kueue (built from the module proxy) and Tailor's
operator, a ClusterQueue of 2 GPUs is held by a plain 2-GPU Job. Behind it waits either a
FineTuneJob (2 GPUs, ``spec.queueName``) or, as the baseline in the same run, a plain
2-GPU Job in the same queue. The bench deletes the holder (the quota frees when the DELETE
returns) and times the first pod of the waiting Job appearing in a pod watch. Rounds
alternate Tailor and plain, so both see the same cluster state; Tailor's path has no step
of its own (Kueue unsuspends the training Job, the Job controller creates the pod), and
the numbers show whether the operator adds anything.

    .venv/bin/python tests/bench/bench_kueue.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tailor.cli import main as tailor  # noqa: E402
from tailor.devcluster.cluster import DevCluster  # noqa: E402
from tailor.devcluster.kube import (  # noqa: E402
    Kube,
    apply_crds,
    create_namespace,
    wait_established,
)
from tailor.devcluster.kueue import Kueue  # noqa: E402
from tests.cluster.helpers import (  # noqa: E402
    OperatorProcess,
    queued_run,
    wait_for,
)
from tests.cluster.helpers import gpu_job as plain_job  # noqa: E402

NS = "bench"


class PodWatcher(threading.Thread):
    """When the first pod of each Job appears in the namespace (a watch, not polling)."""

    def __init__(self, cluster: DevCluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.first: dict[str, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        from kubernetes import client, config, watch

        config.load_kube_config(str(self.cluster.kubeconfig))
        core = client.CoreV1Api()
        self.ready.set()
        try:
            for event in watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=3600):
                labels = event["object"].metadata.labels or {}
                job = labels.get("job-name")
                if job and event["type"] == "ADDED":
                    self.first.setdefault(job, time.monotonic())
        except Exception:  # the cluster stops at the end of the bench
            return


def wait(what: str, check: Any, timeout: float = 120.0) -> Any:
    """Polled every 50 ms: the latencies measured are about a second."""
    return wait_for(what, check, timeout, interval=0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds of each kind")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tailor-bench-kueue-"))
    directory = work / "cluster"
    started = time.monotonic()
    assert tailor(["dev", "cluster", "up", "--dir", str(directory), "--kueue"]) == 0
    cluster = DevCluster(directory)
    kube = Kube(cluster.kubeconfig)
    operator = OperatorProcess(kube, work / "operator.log")
    # training pods keep their GPUs until deleted
    operator.env = {
        "TAILOR_POD_ANNOTATIONS": json.dumps({"pod-complete.stage.kwok.x-k8s.io/delay": "3600s"})
    }
    try:
        wait_established(cluster.kubeconfig, apply_crds(cluster.kubeconfig, ROOT / "crds"))
        create_namespace(kube, NS)
        Kueue(cluster).gpu_queue("bench", gpus=2, namespaces=[NS])
        operator.start()
        watcher = PodWatcher(cluster)
        watcher.start()
        watcher.ready.wait()
        print(f"cluster with Kueue and the operator up in {time.monotonic() - started:.0f} s")
        jobs = f"/apis/batch/v1/namespaces/{NS}/jobs"
        results: dict[str, list[float]] = {"warm-up": [], "tailor": [], "plain": []}
        for i in range(-1, args.rounds * 2):
            # round -1 warms up (a plain Job, not counted): the first admission after the
            # queue is made waits 13-15 s in Kueue whichever kind of Job it is
            kind = "warm-up" if i < 0 else ("tailor" if i % 2 == 0 else "plain")
            holder = f"holder-{i + 1}"
            cluster.api(jobs, "POST", _namespaced(plain_job(holder, 2, "gpus")))
            wait(f"{holder}'s pod", lambda h=holder: h in watcher.first)
            if kind == "tailor":
                name = f"ftj-{i + 1}"
                manifest = queued_run(name, 2)
                kube.apply(manifest, "-n", NS)
                job_name = f"{name}-train"
            else:
                job_name = f"plain-{i + 1}"
                cluster.api(jobs, "POST", _namespaced(plain_job(job_name, 2, "gpus")))
            # waiting: suspended by Kueue, its workload pending for quota
            wait(f"{job_name} pending in Kueue", lambda j=job_name: _pending(cluster, j))
            time.sleep(1.0)  # settle: the operator has written its Queued status
            cluster.api(f"{jobs}/{holder}", "DELETE", {"propagationPolicy": "Background"})
            freed = time.monotonic()
            wait(f"{job_name}'s pod", lambda j=job_name: j in watcher.first)
            results[kind].append(watcher.first[job_name] - freed)
            # clean up: the admitted run leaves the queue empty for the next round
            if kind == "tailor":
                kube.kubectl("delete", "ftj", name, "-n", NS, "--wait=true")
            else:
                cluster.api(f"{jobs}/{job_name}", "DELETE", {"propagationPolicy": "Background"})
            wait("an empty queue", lambda: _reserved(cluster) == 0)
        print()
        print(f"Admission latency, quota frees -> first pod created ({args.rounds} rounds each):")
        print("| waiting run | median s | p90 s | max s |")
        print("|---|---:|---:|---:|")
        for kind, label in (("tailor", "FineTuneJob (Tailor)"), ("plain", "plain Job (Kueue)")):
            values = sorted(results[kind])
            p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
            print(f"| {label} | {statistics.median(values):.3f} | {p90:.3f} | {values[-1]:.3f} |")
        print("per round (s):", {k: [round(v, 3) for v in vs] for k, vs in results.items()})
        return 0
    finally:
        operator.stop()
        tailor(["dev", "cluster", "down", "--dir", str(directory)])
        shutil.rmtree(work, ignore_errors=True)


def _namespaced(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"]["namespace"] = NS
    return manifest


def _pending(cluster: DevCluster, job_name: str) -> bool:
    workloads = cluster.api(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NS}/workloads")
    for workload in workloads["items"]:
        if any(o["name"] == job_name for o in workload["metadata"].get("ownerReferences", [])):
            conds = {c["type"]: c for c in (workload.get("status") or {}).get("conditions") or []}
            return conds.get("QuotaReserved", {}).get("status") == "False"
    return False


def _reserved(cluster: DevCluster) -> float:
    cq = cluster.api("/apis/kueue.x-k8s.io/v1beta2/clusterqueues/bench")
    total = 0.0
    for flavor in (cq.get("status") or {}).get("flavorsReservation") or []:
        for res in flavor.get("resources") or []:
            if res["name"] == "nvidia.com/gpu":
                total += float(res.get("total") or 0)
    return total


if __name__ == "__main__":
    raise SystemExit(main())
