"""What the end-to-end flows share: the local-runtime operator as a child process, a chat
request, and waiting for phases. The fixture that starts the operator is in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tailor.devcluster.kube import Kube


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalOperator:
    """``tailor operator run --runtime local`` watching one namespace, as a child process
    that a test may kill and start again (the local runtime's workloads live on, as pods
    do when an operator restarts)."""

    def __init__(self, kube: Kube, namespace: str, tmp_path: Path, settings: dict[str, str]):
        self.state = tmp_path / "local"
        self.log = tmp_path / "operator.log"
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kube.kubeconfig),
            "TAILOR_RUNTIME": "local",
            "TAILOR_LOCAL_STATE_DIR": str(self.state),
            "TAILOR_PROGRESS_INTERVAL_SECONDS": "0",
            "TAILOR_LOCAL_BACKOFF_SECONDS": "1",
            "TAILOR_CLEANUP_TIMEOUT_SECONDS": "20",
            **settings,
        }
        self.argv = [sys.executable, "-m", "tailor.cli", "operator", "run", "--runtime", "local"]
        self.argv += ["--namespace", namespace]
        self.start()

    def start(self) -> None:
        argv = [*self.argv, "--metrics-port", str(free_port()), "--health-port", str(free_port())]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as when a node dies."""
        self.proc.kill()
        self.proc.wait(20)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_local_operator(
    kube: Kube, namespace: str, tmp_path: Path, settings: dict[str, str]
) -> Iterator[Path]:
    """:func:`operating`, yielding the local runtime's state folder."""
    running = operating(kube, namespace, tmp_path, settings)
    yield next(running).state
    next(running, None)


def operating(
    kube: Kube, namespace: str, tmp_path: Path, settings: dict[str, str]
) -> Iterator[LocalOperator]:
    """A :class:`LocalOperator` watching the test's ``namespace``, with ``settings``
    (TAILOR_* variables), until the generator is closed. Watching one namespace keeps a
    test's operator from starting the workloads of an earlier test's namespace, still
    being deleted; on the way out the operator's finalizers are taken off what is left, so
    that namespace can go."""
    operator = LocalOperator(kube, namespace, tmp_path, settings)
    yield operator
    operator.stop()
    state, log = operator.state, operator.log
    left = kube.kubectl("get", KINDS, "-n", namespace, "-o", "name").stdout.split()
    for name in left:
        kube.kubectl("patch", name, "-n", namespace, "--type=merge",
                     "-p", '{"metadata": {"finalizers": null}}')  # fmt: skip
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


KINDS = "knowledgebases,finetunejobs,raftjobs,modeldeployments,promptprofiles,evaluations,adaptationloops"


def chat(endpoint: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """POST an OpenAI chat completion to a served endpoint (``.../v1``); the decoded answer."""
    import urllib.request

    request = urllib.request.Request(
        f"{endpoint}/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    answer: dict[str, Any] = json.loads(urllib.request.urlopen(request, timeout=timeout).read())
    return answer


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


# Where each phase stands in a resource's life; a phase with a lower rank than one seen
# before (with the spec unchanged) is a flap, e.g. a KnowledgeBase Ready, then Indexing.
PHASE_RANK = {
    "Pending": 0,
    "Queued": 1,
    "Indexing": 1,
    "Progressing": 1,
    "Running": 2,
    "Ready": 3,
    "Succeeded": 3,
}


class PhaseWatch:
    """``kubectl get KIND NAME --watch``: every phase an object's status goes through, as
    the API server delivers each change (not a poll that could miss one)."""

    def __init__(self, kube: Kube, ns: str, kind: str, name: str) -> None:
        from tailor.devcluster.tools import kubectl_path

        self.what = f"{kind}/{name}"
        env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
        template = '{.metadata.generation} {.status.phase}{"\\n"}'
        argv = [str(kubectl_path()), "get", kind, "-n", ns, "--watch"]
        argv += ["--field-selector", f"metadata.name={name}"]  # may not exist yet
        self.proc = subprocess.Popen(
            [*argv, "-o", f"jsonpath={template}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def phases(self) -> list[str]:
        """The distinct successive phases seen so far (stops the watch)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        seen: list[str] = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and (not seen or seen[-1] != parts[1]):
                seen.append(parts[1])
        return seen

    def assert_monotonic(self) -> list[str]:
        seen = self.phases()
        ranks = [PHASE_RANK[p] for p in seen]
        assert ranks == sorted(ranks), f"{self.what} went backwards: {' -> '.join(seen)}"
        return seen


def wait_for(what: str, probe: Any, timeout: float = 600) -> Any:
    """``probe()``'s first truthy value, polled every second; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")
