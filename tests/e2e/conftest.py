"""The local-runtime operator fixture shared by the end-to-end flows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailor.devcluster.kube import Kube


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def local_operator(kube: Kube, tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "local"
    log = tmp_path / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.kubeconfig),
        "TAILOR_RUNTIME": "local",
        "TAILOR_LOCAL_STATE_DIR": str(state),
        "TAILOR_PROGRESS_INTERVAL_SECONDS": "0",
        "TAILOR_LOCAL_BACKOFF_SECONDS": "1",
    }
    argv = [sys.executable, "-m", "tailor.cli", "operator", "run", "--runtime", "local"]
    argv += ["--metrics-port", str(free_port()), "--health-port", str(free_port())]
    proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    yield state
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    # The local runtime's processes outlive the operator by design (like pods); stop them.
    for record in state.glob("*/runs/*.json"):
        pid = json.loads(record.read_text()).get("pid")
        if pid:
            try:
                os.killpg(int(pid), 15)
            except OSError:
                pass
    if os.environ.get("TAILOR_SHOW_OPERATOR_LOG"):
        print(log.read_text()[-20000:])
        for attempt in sorted(state.glob("*/runs/*/attempt-*.log")):
            print(f"==== {attempt}\n{attempt.read_text()[-5000:]}")


def wait_phase(
    kube: Kube, ns: str, kind: str, name: str, phases: set[str], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kube.get_json(kind, name, "-n", ns)
        phase = (obj.get("status") or {}).get("phase")
        if phase in phases:
            return obj
        if phase in ("Failed", "Invalid"):
            raise AssertionError(f"{kind}/{name} failed: {obj.get('status')}")
        time.sleep(1)
    raise AssertionError(f"{kind}/{name} not in {phases} after {timeout}s: {obj.get('status')}")
