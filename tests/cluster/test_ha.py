"""High availability: two operator replicas, one Lease, one writer; the standby takes over
when the leader dies, and the takeover creates nothing twice. Real processes against the
real API server (kwok runs the pods)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import Replica, fine_tune, phase_is, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def replicas(kube: Kube, namespace: str, tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop(signal.SIGKILL)


def holder(kube: Kube, ns: str) -> str:
    lease: dict[str, Any] = kube.get_json("lease", "tailor-operator", "-n", ns)
    return str(lease["spec"].get("holderIdentity") or "")


def children(kube: Kube, ns: str, kind: str, name: str) -> list[str]:
    out = kube.kubectl("get", kind, "-n", ns, "-l", f"tailor.dev/finetunejob={name}", "-o", "name")
    return out.stdout.split()


def leader_and_standby(
    kube: Kube, ns: str, tmp_path: Path, replicas: list[Replica]
) -> tuple[Replica, Replica]:
    first = Replica(kube, ns, tmp_path / "first.log")
    replicas.append(first)
    wait_for("the first replica to lead", first.leading, timeout=60)
    second = Replica(kube, ns, tmp_path / "second.log")
    replicas.append(second)
    wait_for("the standby to answer its liveness probe", second.alive, timeout=60)
    return first, second


def test_one_replica_leads_and_the_standby_takes_over_without_duplicates(
    kube: Kube, namespace: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    ns = namespace
    first, second = leader_and_standby(kube, ns, tmp_path, replicas)
    leader_identity = holder(kube, ns)
    assert leader_identity and not second.leading()

    kube.apply(fine_tune("before", 0), "-n", ns)
    wait_for("Succeeded", phase_is(kube, ns, "ftj", "before", "Succeeded"))
    assert not second.leading()  # the standby did not reconcile
    assert "Handler" not in (tmp_path / "second.log").read_text()

    # The leader dies mid-burst: FineTuneJobs are created around the kill.
    for i in range(3):
        kube.apply(fine_tune(f"burst-{i}", 0), "-n", ns)
    killed = time.monotonic()
    first.stop(signal.SIGKILL)
    for i in range(3, 6):
        kube.apply(fine_tune(f"burst-{i}", 0), "-n", ns)
    wait_for("the standby to take over", second.leading, timeout=60)
    takeover = time.monotonic() - killed
    assert holder(kube, ns) not in ("", leader_identity)
    assert takeover <= 15 + 2 + 5, takeover  # lease duration + retry period + slack
    for i in range(6):
        wait_for(f"burst-{i} Succeeded", phase_is(kube, ns, "ftj", f"burst-{i}", "Succeeded"))
    for name in ["before", *(f"burst-{i}" for i in range(6))]:
        assert children(kube, ns, "jobs", name) == [f"job.batch/{name}-train"]
    lease = kube.get_json("lease", "tailor-operator", "-n", ns)
    assert lease["spec"]["leaseTransitions"] >= 1


def test_a_clean_shutdown_hands_the_lease_over_at_once(
    kube: Kube, namespace: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    first, second = leader_and_standby(kube, namespace, tmp_path, replicas)
    stopped = time.monotonic()
    first.stop(signal.SIGTERM)  # released on the way out
    wait_for("the standby to take over", second.leading, timeout=30)
    assert time.monotonic() - stopped < 10  # well under the 15 s lease duration
