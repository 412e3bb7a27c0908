"""Operator throughput on the real control plane: 300 FineTuneJobs.

Prints the time from creating a FineTuneJob to its child Job appearing (median, p99),
next to the floor measured in the same run: creating the same 300 Jobs directly and
seeing them appear in a watch. Also the operator's API requests per FineTuneJob (its own
counter, tailor_operator_api_requests_total) and its peak RSS.

    .venv/bin/python tests/bench/bench_operator.py [--count 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tailor.devcluster.cluster import DevCluster, state_root  # noqa: E402
from tests.cluster.test_operator import fine_tune, free_port  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class JobWatcher(threading.Thread):
    """Records when each Job in a namespace is first seen."""

    def __init__(self, namespace: str, expected: int):
        super().__init__(daemon=True)
        self.namespace, self.expected = namespace, expected
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        batch = client.BatchV1Api()
        w = watch.Watch()
        self.ready.set()
        for event in w.stream(batch.list_namespaced_job, self.namespace, timeout_seconds=600):
            name = event["object"].metadata.name
            self.seen.setdefault(name, time.monotonic())
            if len(self.seen) >= self.expected:
                w.stop()


def make_namespace(core: client.CoreV1Api, name: str) -> None:
    core.create_namespace({"metadata": {"name": name}})
    core.create_persistent_volume(
        {
            "metadata": {"name": f"{name}-artifacts"},
            "spec": {
                "capacity": {"storage": "50Gi"},
                "accessModes": ["ReadWriteOnce"],
                "hostPath": {"path": f"/tmp/{name}"},
                "claimRef": {"namespace": name, "name": "tailor-artifacts"},
            },
        }
    )
    for _ in range(100):
        if core.list_namespaced_service_account(name).items:
            return
        time.sleep(0.1)


def floor(count: int, namespace: str) -> list[float]:
    """Latency of creating plain Jobs directly (the floor)."""
    batch = client.BatchV1Api()
    watcher = JobWatcher(namespace, count)
    watcher.start()
    watcher.ready.wait()
    time.sleep(0.5)
    created: dict[str, float] = {}
    for i in range(count):
        name = f"plain-{i}"
        created[name] = time.monotonic()
        batch.create_namespaced_job(
            namespace,
            {
                "metadata": {"name": name},
                "spec": {
                    "suspend": True,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "c", "image": "busybox"}],
                        }
                    },
                },
            },
        )
    watcher.join(300)
    return [watcher.seen[n] - created[n] for n in created if n in watcher.seen]


def operator_latency(count: int, namespace: str) -> tuple[list[float], float]:
    custom = client.CustomObjectsApi()
    watcher = JobWatcher(namespace, count)
    watcher.start()
    watcher.ready.wait()
    time.sleep(0.5)
    created: dict[str, float] = {}
    start = time.monotonic()
    for i in range(count):
        name = f"ftj-{i}"
        manifest = fine_tune(name, 0, suspend=True)
        created[f"{name}-train"] = time.monotonic()
        custom.create_namespaced_custom_object(
            "tailor.dev", "v1alpha1", namespace, "finetunejobs", manifest
        )
    watcher.join(600)
    wall = time.monotonic() - start
    return [watcher.seen[n] - created[n] for n in created if n in watcher.seen], wall


def api_requests(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tailor_operator_api_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    cluster = DevCluster(state_root() / "bench")
    cluster.up(timeout=300)
    subprocess.run(
        [str(ROOT / ".venv/bin/kubectl"), "apply", "--server-side", "-f", str(ROOT / "crds")],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        check=True,
        capture_output=True,
    )
    time.sleep(2)
    config.load_kube_config(str(cluster.kubeconfig))
    core = client.CoreV1Api()
    suffix = str(int(time.time()))
    make_namespace(core, f"floor-{suffix}")
    floor_lat = floor(args.count, f"floor-{suffix}")

    metrics_port = free_port()
    log = open(f"/tmp/bench-operator-{suffix}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tailor.cli",
            "operator",
            "run",
            "--metrics-port",
            str(metrics_port),
            "--health-port",
            str(free_port()),
        ],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            try:
                api_requests(metrics_port)
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(2)
        ns = f"operator-{suffix}"
        make_namespace(core, ns)
        before = api_requests(metrics_port)
        op_lat, wall = operator_latency(args.count, ns)
        time.sleep(5)  # let status updates of the burst settle
        per_resource = (api_requests(metrics_port) - before) / args.count
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        cluster.down()

    rows = [
        ("plain Jobs created directly (floor)", floor_lat),
        ("FineTuneJob -> child Job via operator", op_lat),
    ]
    print(f"\n{args.count} objects; latency from create call to Job seen in a watch (ms)")
    print(f"{'path':48} {'n':>5} {'median':>9} {'p99':>9}")
    for label, values in rows:
        print(
            f"{label:48} {len(values):5d} {statistics.median(values) * 1000:9.1f} {percentile(values, 0.99) * 1000:9.1f}"
        )
    ratio = statistics.median(op_lat) / statistics.median(floor_lat)
    print(
        f"median ratio operator/floor: {ratio:.1f}x; operator wall time for the burst: {wall:.1f}s"
    )
    print(f"operator API requests per FineTuneJob: {per_resource:.1f}")
    print(f"operator peak RSS: {rss:.0f} MiB")
    print(
        json.dumps(
            {
                "floor_median_ms": statistics.median(floor_lat) * 1000,
                "operator_median_ms": statistics.median(op_lat) * 1000,
                "operator_p99_ms": percentile(op_lat, 0.99) * 1000,
                "requests_per_resource": per_resource,
                "peak_rss_mib": rss,
            }
        )
    )


if __name__ == "__main__":
    main()
