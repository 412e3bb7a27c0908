"""Operator throughput on the real control plane: a burst of FineTuneJobs.

Prints the time from creating a FineTuneJob to its child Job appearing (median, p99),
next to the floor measured in the same run: creating the same number of Jobs directly and
seeing them appear in a watch. The FineTuneJobs' Jobs are real (not suspended): kwok runs
their pods on the fake nodes and completes them, so each FineTuneJob lives its whole life
(Pending, Running, Succeeded). Also: FineTuneJobs handled per second (first create to
last child Job), the operator's API requests per FineTuneJob (its own counter,
tailor_operator_api_requests_total) by the time every Job exists and over the whole life
to Succeeded, and its peak RSS.

    .venv/bin/python tests/bench/bench_operator.py [--count 300] [--clients 4] [--suspended]
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tailor.devcluster.cluster import DevCluster, state_root  # noqa: E402
from tests.cluster.helpers import fine_tune, free_port  # noqa: E402


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


def in_parallel(count: int, clients: int, create: Callable[[int], None]) -> None:
    """Call ``create(i)`` for i in range(count) from ``clients`` threads (a burst from
    several clients, as a CI system or a sweep would send it)."""
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(create, range(count)))


def floor(count: int, namespace: str, clients: int) -> tuple[list[float], float]:
    """Latency of creating plain Jobs directly (the floor)."""
    batch = client.BatchV1Api()
    watcher = JobWatcher(namespace, count)
    watcher.start()
    watcher.ready.wait()
    time.sleep(0.5)
    created: dict[str, float] = {}
    start = time.monotonic()

    def create(i: int) -> None:
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

    in_parallel(count, clients, create)
    create_wall = time.monotonic() - start
    watcher.join(300)
    return [watcher.seen[n] - created[n] for n in created if n in watcher.seen], create_wall


class FinishedWatcher(threading.Thread):
    """Records when each FineTuneJob in a namespace first reaches a final phase."""

    def __init__(self, namespace: str, expected: int, final: tuple[str, ...]):
        super().__init__(daemon=True)
        self.namespace, self.expected, self.final = namespace, expected, final
        self.done: dict[str, tuple[float, str]] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        custom = client.CustomObjectsApi()
        w = watch.Watch()
        self.ready.set()
        for event in w.stream(
            custom.list_namespaced_custom_object,
            "tailor.dev",
            "v1alpha1",
            self.namespace,
            "finetunejobs",
            timeout_seconds=1200,
        ):
            obj = event["object"]
            phase = (obj.get("status") or {}).get("phase")
            if phase in self.final:
                self.done.setdefault(obj["metadata"]["name"], (time.monotonic(), phase))
            if len(self.done) >= self.expected:
                w.stop()


def operator_burst(
    count: int, namespace: str, suspend: bool, metrics_port: int, clients: int
) -> dict[str, object]:
    """Create ``count`` FineTuneJobs as fast as one client can; wait for every child Job
    (counting the operator's requests then) and for every FineTuneJob's final phase."""
    custom = client.CustomObjectsApi()
    watcher = JobWatcher(namespace, count)
    final = ("Suspended", "Failed") if suspend else ("Succeeded", "Failed")
    finished = FinishedWatcher(namespace, count, final)
    for thread in (watcher, finished):
        thread.start()
        thread.ready.wait()
    time.sleep(0.5)
    before = requests_by_kind(metrics_port)
    created: dict[str, float] = {}
    start = time.monotonic()

    def create(i: int) -> None:
        name = f"ftj-{i}"
        # tiny requests so that the fake nodes (4 x 110 pods) run them all in turn
        manifest = fine_tune(name, 0, suspend=suspend)
        manifest["spec"]["resources"] = {"gpus": 0, "cpu": "10m", "memory": "16Mi"}
        created[f"{name}-train"] = time.monotonic()
        custom.create_namespaced_custom_object(
            "tailor.dev", "v1alpha1", namespace, "finetunejobs", manifest
        )

    in_parallel(count, clients, create)
    create_wall = time.monotonic() - start
    watcher.join(900)
    jobs_wall = time.monotonic() - start
    at_jobs = sum(requests_by_kind(metrics_port).values()) - sum(before.values())
    finished.join(1200)
    life_wall = time.monotonic() - start
    time.sleep(5)  # the last status writes and events of the burst
    at_end = requests_by_kind(metrics_port)
    latencies = [watcher.seen[n] - created[n] for n in created if n in watcher.seen]
    phases = [phase for _, phase in finished.done.values()]
    return {
        "latencies": latencies,
        "create_wall": create_wall,
        "jobs_wall": max(watcher.seen.values()) - start if watcher.seen else jobs_wall,
        "life_wall": max(t for t, _ in finished.done.values()) - start
        if finished.done
        else life_wall,
        "requests_at_jobs": at_jobs / count,
        "requests_lifetime": (sum(at_end.values()) - sum(before.values())) / count,
        "requests_by_kind": {
            k: (v - before.get(k, 0.0)) / count
            for k, v in sorted(at_end.items())
            if v - before.get(k, 0.0) > 0
        },
        "finished": len(finished.done),
        "succeeded": sum(p == final[0] for p in phases),
    }


def requests_by_kind(port: int) -> dict[str, float]:
    """The operator's API requests so far, by "METHOD resource" (its own counter)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tailor_operator_api_requests_total{"):
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            key = f"{labels['method'].strip(chr(34))} {labels.get('resource', '').strip(chr(34))}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def api_requests(port: int) -> float:
    return sum(requests_by_kind(port).values())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(cluster: DevCluster, operator_pid: int) -> dict[str, float]:
    out = {"operator": cpu_seconds(operator_pid), "benchmark client": cpu_seconds(os.getpid())}
    for component in cluster.status():
        if component.pid is not None:
            out[component.name] = cpu_seconds(component.pid)
    return out


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument(
        "--clients", type=int, default=4, help="threads creating the burst (floor and operator)"
    )
    parser.add_argument(
        "--suspended", action="store_true", help="suspended Jobs (no pods), as before issue 16"
    )
    args = parser.parse_args()
    cluster = DevCluster(state_root() / "bench")
    cluster.down(purge=True)  # a fresh control plane: nothing left from an earlier run
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
    floor_lat, floor_wall = floor(args.count, f"floor-{suffix}", args.clients)

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
        cpu_before = cpu_by_process(cluster, proc.pid)
        burst = operator_burst(args.count, ns, args.suspended, metrics_port, args.clients)
        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_by_process(cluster, proc.pid).items()}
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        cluster.down()

    op_lat = burst["latencies"]
    assert isinstance(op_lat, list)
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
    final = "Suspended" if args.suspended else "Succeeded"
    per_second = len(op_lat) / float(burst["jobs_wall"])  # type: ignore[arg-type]
    print(f"median ratio operator/floor: {ratio:.1f}x")
    print(f"floor: {args.clients} clients created {args.count / floor_wall:.0f} plain Jobs/s")
    print(
        f"creates took {burst['create_wall']:.1f}s ({args.clients} clients); last child Job after "
        f"{burst['jobs_wall']:.1f}s: {per_second:.1f} FineTuneJobs/s handled"
    )
    print(
        f"{burst['succeeded']}/{args.count} {final} ({burst['finished']} final) after "
        f"{burst['life_wall']:.1f}s"
    )
    print(
        f"operator API requests per FineTuneJob: {burst['requests_at_jobs']:.1f} by the time "
        f"every Job exists, {burst['requests_lifetime']:.1f} over the whole life"
    )
    by_kind = burst["requests_by_kind"]
    assert isinstance(by_kind, dict)
    print("  per FineTuneJob over its life: " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))  # fmt: skip
    print(f"operator peak RSS: {rss:.0f} MiB")
    print(
        f"CPU seconds during the burst ({burst['life_wall']:.0f}s wall, 2 cores here): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
    )
    print(
        json.dumps(
            {
                "count": args.count,
                "clients": args.clients,
                "suspended": args.suspended,
                "floor_median_ms": statistics.median(floor_lat) * 1000,
                "floor_creates_per_second": args.count / floor_wall,
                "operator_median_ms": statistics.median(op_lat) * 1000,
                "operator_p99_ms": percentile(op_lat, 0.99) * 1000,
                "objects_per_second": per_second,
                "requests_per_resource": burst["requests_at_jobs"],
                "requests_per_resource_lifetime": burst["requests_lifetime"],
                "succeeded": burst["succeeded"],
                "peak_rss_mib": rss,
                "cpu_seconds": cpu,
            }
        )
    )


if __name__ == "__main__":
    main()
