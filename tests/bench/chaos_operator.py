"""Chaos drills for the operator on the real control plane (kwok runs the pods).

Three drills, each a burst of FineTuneJobs with real Jobs, bounded in time, printing one
row each:

- ``kill-leader``: two replicas with leader election (the chart's default); the active one
  is SIGKILLed a third of the way into the burst. Takeover: from the kill to the standby
  reporting ``tailor_operator_leader 1``.
- ``restart-apiserver``: the same two replicas; kube-apiserver is restarted a third of the
  way in. Outage: seconds until the API server is healthy again (a leader that cannot
  renew its Lease for 10 s exits, and the row says whether it did).
- ``refuse-success``: one operator; a ValidatingAdmissionPolicy refuses every status write
  that sets ``phase: Succeeded`` until every child Job has completed (each sync the Job's
  completion triggers fails), then the policy is removed: the retries must get through.

Each row: FineTuneJobs Succeeded of those created, child Jobs per FineTuneJob (duplicates:
more than one Job, or a Job of a name the operator does not use), objects left
unreconciled (not Succeeded at the end), the operator's failed-sync retries, wall time.

    .venv/bin/python tests/bench/chaos_operator.py [--count 100] [--drills kill-leader,...]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tailor.devcluster.cluster import DevCluster, state_root  # noqa: E402
from tailor.devcluster.kube import Kube  # noqa: E402
from tests.cluster.helpers import (  # noqa: E402
    Replica,
    fine_tune,
    refuse_success,
)

DRILLS = ("kill-leader", "restart-apiserver", "refuse-success")


def wait(what: str, check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def get_json(kube: Kube, *args: str) -> dict[str, Any]:
    """kubectl get -o json, retried while the API server is away."""
    for _ in range(120):
        result = kube.kubectl("get", *args, "-o", "json", check=False)
        if result.returncode == 0:
            return dict(json.loads(result.stdout))
        time.sleep(1)
    raise RuntimeError(f"kubectl get {' '.join(args)}: {result.stderr}")


def create(kube: Kube, ns: str, names: list[str]) -> None:
    manifests = []
    for name in names:
        manifest = fine_tune(name, 0)
        manifest["spec"]["resources"] = {"gpus": 0, "cpu": "10m", "memory": "16Mi"}
        manifests.append(manifest)
    text = "\n---\n".join(json.dumps(m) for m in manifests)
    for _ in range(120):  # the API server may be restarting
        if kube.kubectl("apply", "-n", ns, "-f", "-", input=text, check=False).returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"could not create {names[0]}..{names[-1]}")


def tally(kube: Kube, ns: str, names: list[str]) -> dict[str, Any]:
    ftjs = get_json(kube, "finetunejobs", "-n", ns)["items"]
    phases = {f["metadata"]["name"]: (f.get("status") or {}).get("phase") for f in ftjs}
    jobs = get_json(kube, "jobs", "-n", ns)["items"]
    owners = Counter(
        (j["metadata"].get("labels") or {}).get("tailor.dev/finetunejob") for j in jobs
    )
    stray = [
        j["metadata"]["name"]
        for j in jobs
        if j["metadata"]["name"]
        != f"{(j['metadata'].get('labels') or {}).get('tailor.dev/finetunejob')}-train"
    ]
    return {
        "succeeded": sum(phases.get(n) == "Succeeded" for n in names),
        "duplicates": sum(c - 1 for c in owners.values() if c > 1) + len(stray),
        "unreconciled": sum(phases.get(n) != "Succeeded" for n in names),
        "jobs": len(jobs),
    }


def retries(replicas: list[Replica]) -> int:
    total = 0.0
    for replica in replicas:
        for line in replica.get(replica.metrics_port, "/metrics").splitlines():
            if line.startswith("tailor_operator_workqueue_retries_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def burst(
    kube: Kube, ns: str, count: int, chaos: Callable[[], float], replicas: list[Replica]
) -> dict[str, Any]:
    """Create ``count`` FineTuneJobs in batches of 10; run ``chaos`` a third of the way in."""
    names = [f"chaos-{i}" for i in range(count)]
    started = time.monotonic()
    takeover = float("nan")
    seen_retries = 0
    for at in range(0, count, 10):
        if at == (count // 3) // 10 * 10:
            takeover = chaos()
        create(kube, ns, names[at : at + 10])
        seen_retries = max(seen_retries, retries(replicas))

    def settled() -> bool:
        nonlocal seen_retries
        seen_retries = max(seen_retries, retries(replicas))
        return tally(kube, ns, names)["succeeded"] == count

    try:
        wait("every FineTuneJob Succeeded", settled, timeout=max(300.0, count * 3.0))
    except TimeoutError as error:
        print(f"  {error}", file=sys.stderr)
    row = tally(kube, ns, names)
    row.update(
        created=count,
        takeover_s=round(takeover, 1),
        retries=seen_retries,
        wall_s=round(time.monotonic() - started, 1),
    )
    return row


def namespace(kube: Kube, name: str) -> str:
    kube.kubectl("create", "namespace", name)
    wait("the default ServiceAccount", lambda: bool(
        kube.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0), 60)  # fmt: skip
    return name


def two_replicas(kube: Kube, ns: str, logs: Path) -> list[Replica]:
    first = Replica(kube, ns, logs / f"{ns}-first.log")
    wait("the first replica to lead", first.leading, 90)
    second = Replica(kube, ns, logs / f"{ns}-second.log")
    wait("the standby to answer its liveness probe", second.alive, 90)
    return [first, second]


def kill_leader(kube: Kube, ns: str, count: int, logs: Path) -> dict[str, Any]:
    replicas = two_replicas(kube, ns, logs)

    def chaos() -> float:
        leader = next(r for r in replicas if r.leading())
        standby = next(r for r in replicas if r is not leader)
        killed = time.monotonic()
        leader.stop(signal.SIGKILL)
        wait("the standby to take over", standby.leading, 120)
        return time.monotonic() - killed

    try:
        return burst(kube, ns, count, chaos, replicas)
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL)


def restart_apiserver(
    kube: Kube, cluster: DevCluster, ns: str, count: int, logs: Path
) -> dict[str, Any]:
    replicas = two_replicas(kube, ns, logs)
    try:
        row = burst(kube, ns, count, lambda: cluster.restart("kube-apiserver"), replicas)
        # A leader that cannot renew its Lease within 10 s exits (no two writers); the
        # standby then takes over once the API server is back.
        row["leader_exited"] = replicas[0].proc.poll() is not None
        return row
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL)


def refuse_success_drill(kube: Kube, ns: str, count: int, logs: Path) -> dict[str, Any]:
    policy = f"chaos-refuse-success-{ns}"
    refusal = refuse_success(policy, ns, "chaos drill: phase Succeeded refused")
    kube.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(m) for m in refusal))
    time.sleep(2)  # the API server's policy informer picks it up
    replica = Replica(kube, ns, logs / f"{ns}.log")  # with leader election, alone
    wait("the operator to lead", replica.leading, 90)
    names = [f"chaos-{i}" for i in range(count)]

    def completed() -> int:
        jobs = get_json(kube, "jobs", "-n", ns)["items"]
        return sum(
            any(c["type"] == "Complete" and c["status"] == "True"
                for c in (j.get("status") or {}).get("conditions") or [])
            for j in jobs
        )  # fmt: skip

    started = time.monotonic()
    try:
        for at in range(0, count, 10):
            create(kube, ns, names[at : at + 10])
        wait("every child Job to complete", lambda: completed() == count, max(300.0, count * 3.0))
        time.sleep(5)  # a few refused writes and their retries
        refused = tally(kube, ns, names)["succeeded"]
        kube.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                     policy, "--ignore-not-found")  # fmt: skip
        try:
            wait("every FineTuneJob Succeeded",
                 lambda: tally(kube, ns, names)["succeeded"] == count, 180)  # fmt: skip
        except TimeoutError as error:
            print(f"  {error}", file=sys.stderr)
        row = tally(kube, ns, names)
        row.update(
            created=count,
            takeover_s=float("nan"),
            retries=retries([replica]),
            wall_s=round(time.monotonic() - started, 1),
            succeeded_while_refused=refused,
        )
        return row
    finally:
        kube.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                     policy, "--ignore-not-found", check=False)  # fmt: skip
        replica.stop(signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100, help="FineTuneJobs per drill")
    parser.add_argument("--drills", default=",".join(DRILLS))
    args = parser.parse_args()
    drills = [d.strip() for d in args.drills.split(",") if d.strip()]
    if unknown := sorted(set(drills) - set(DRILLS)):
        parser.error(f"--drills: unknown {unknown}; choose from {list(DRILLS)}")
    cluster = DevCluster(state_root() / "bench")
    cluster.down(purge=True)  # a fresh control plane: nothing left from an earlier run
    cluster.up(timeout=300)
    kube = Kube(cluster.kubeconfig)
    kube.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    logs = Path(tempfile.mkdtemp(prefix="tailor-chaos-"))
    suffix = str(int(time.time()))
    rows: dict[str, dict[str, Any]] = {}
    for drill in drills:
        ns = namespace(kube, f"{drill}-{suffix}")
        print(f"drill {drill}: {args.count} FineTuneJobs in {ns} (logs in {logs})", flush=True)
        if drill == "kill-leader":
            rows[drill] = kill_leader(kube, ns, args.count, logs)
        elif drill == "restart-apiserver":
            rows[drill] = restart_apiserver(kube, cluster, ns, args.count, logs)
        else:
            rows[drill] = refuse_success_drill(kube, ns, args.count, logs)
        print(f"  {rows[drill]}", flush=True)
    print()
    header = (
        "drill", "Succeeded", "duplicates", "unreconciled", "takeover / outage s", "retries",
        "wall s",
    )  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for drill, row in rows.items():
        cells = [
            drill,
            f"{row['succeeded']}/{row['created']}",
            str(row["duplicates"]),
            str(row["unreconciled"]),
            f"{row['takeover_s']}",
            str(row["retries"]),
            f"{row['wall_s']}",
        ]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(rows))
    ok = all(r["duplicates"] == 0 and r["unreconciled"] == 0 for r in rows.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
