"""``up``/``status``/``env``/``down`` of a second, private dev cluster.

These tests start their own cluster in a temporary directory (the session
cluster keeps serving the other tests) and check that ``up`` is idempotent,
repairs a cluster that lost a component, reports readiness failures with the
log file to read, and that ``down`` leaves no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tailor
from tailor.cli import main as tailor_cli
from tailor.devcluster.cluster import COMPONENTS, ClusterError, DevCluster
from tailor.devcluster.kube import Kube

pytestmark = pytest.mark.cluster


def processes_referencing(directory: Path) -> list[int]:
    """Pids of every live process whose command line mentions ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(directory) in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def test_up_is_idempotent_repairs_and_down_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "cluster"
    where = ["--dir", str(directory)]
    cluster = DevCluster(directory)
    try:
        assert tailor_cli(["dev", "cluster", "up", *where]) == 0
        pids = cluster.pids()
        assert len(pids) == len(COMPONENTS)

        started = time.monotonic()
        assert tailor_cli(["dev", "cluster", "up", *where]) == 0
        assert time.monotonic() - started < 10
        assert cluster.pids() == pids

        capsys.readouterr()
        assert tailor_cli(["dev", "cluster", "status", *where]) == 0
        status = capsys.readouterr().out
        for component in COMPONENTS:
            assert f"{component} " in status
        assert status.count("healthy") == len(COMPONENTS)

        env = subprocess.run(
            [sys.executable, "-m", "tailor.devcluster", "env", *where],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(tailor.__file__).parents[1])},
            check=True,
        )
        assert env.stdout == f"export KUBECONFIG={directory / 'kubeconfig'}\n"
        nodes = Kube(cluster.kubeconfig).kubectl("get", "nodes", "-o", "name").stdout.split()
        assert sorted(nodes) == ["node/cpu-0", "node/gpu-a", "node/gpu-b", "node/gpu-c"]

        scheduler = int((directory / "run" / "kube-scheduler.pid").read_text())
        os.killpg(scheduler, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tailor_cli(["dev", "cluster", "status", *where]) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tailor_cli(["dev", "cluster", "status", *where]) == 1
        assert tailor_cli(["dev", "cluster", "up", *where]) == 0
        assert cluster.is_healthy()
        assert set(cluster.pids()).isdisjoint(pids)
    finally:
        assert tailor_cli(["dev", "cluster", "down", *where]) == 0
    assert processes_referencing(directory) == []
    assert tailor_cli(["dev", "cluster", "status", *where]) == 1


def test_readiness_timeout_names_the_log_file(tmp_path: Path) -> None:
    cluster = DevCluster(tmp_path / "slow")
    try:
        with pytest.raises(ClusterError, match="timed out waiting for") as error:
            cluster.up(timeout=0.01)
        named = re.search(r"; see (\S+\.log)\n", str(error.value))
        assert named, str(error.value)
        log = Path(named[1])
        assert log.parent == cluster.log_dir
        assert log.read_text().startswith("\n=== ")  # the command line that was started
    finally:
        cluster.down()
    assert processes_referencing(cluster.dir) == []
