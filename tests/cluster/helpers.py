"""What the cluster tests (and the operator benchmarks) share: the example manifests, the
operator as a child process, waiting for a condition, and manifests built from the examples.
Fixtures live in conftest.py; no test module imports another."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tailor.devcluster.kube import Kube

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"


def example(kind: str, **spec_changes: Any) -> dict[str, Any]:
    manifest = yaml.safe_load((EXAMPLES / f"{kind}.yaml").read_text())
    manifest["spec"].update(spec_changes)
    return manifest


def bare_deployment(**spec_changes: Any) -> dict[str, Any]:
    """The example ModelDeployment without its KnowledgeBase and PromptProfile references
    (nothing to wait for) or autoscaling, with ``spec_changes``."""
    manifest = example("modeldeployment", autoscaling=None, **spec_changes)
    for ref in ("knowledgeBaseRef", "promptProfileRef"):
        manifest["spec"].pop(ref, None)
    return manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """``tailor operator run`` as a child process, restartable."""

    def __init__(self, kube: Kube, log: Path):
        self.kube, self.log = kube, log
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        """More environment for the operator (settings: TAILOR_*)."""
        self.namespaces: list[str] = []
        """The namespaces it watches (``-n``); empty: the whole cluster."""

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kube.kubeconfig),
            "TAILOR_IMAGE": "tailor-workloads:test",
            "TAILOR_GPU_IMAGE": "tailor-workloads:test-cuda",
            "TAILOR_PROGRESS_INTERVAL_SECONDS": "1",
            **self.env,
        }
        argv = [sys.executable, "-m", "tailor.cli", "operator", "run"]
        argv += [f"--namespace={namespace}" for namespace in self.namespaces]
        argv += ["--metrics-port", str(self.metrics_port), "--health-port", str(free_port())]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 90.0, interval: float = 0.5
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def get(kube: Kube, ns: str, kind: str, name: str) -> dict[str, Any]:
    return kube.get_json(kind, name, "-n", ns)


def phase_is(kube: Kube, ns: str, kind: str, name: str, *phases: str) -> Callable[[], Any]:
    def check() -> Any:
        obj = kube.get_json(kind, name, "-n", ns)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    return check


def fine_tune(name: str, gpus: int, **extra: Any) -> dict[str, Any]:
    manifest = example("finetunejob")
    manifest["metadata"]["name"] = name
    manifest["spec"]["resources"] = {"gpus": gpus, "cpu": "1", "memory": "1Gi"}
    manifest["spec"].update(extra)
    return manifest


def refuse_success(policy: str, ns: str, message: str) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy (and its binding) under which the API server refuses
    every FineTuneJob status write in ``ns`` that sets ``phase: Succeeded``."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["tailor.dev"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["finetunejobs/status"],
                        }
                    ]
                },
                "matchConditions": [
                    {"name": "this-namespace", "expression": f"object.metadata.namespace == '{ns}'"}
                ],
                "validations": [
                    {
                        "expression": "!has(object.status.phase) || "
                        "object.status.phase != 'Succeeded'",
                        "message": message,
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {"policyName": policy, "validationActions": ["Deny"]},
        },
    ]


def gpu_job(name: str, gpus: int, queue: str | None) -> dict[str, Any]:
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    request = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "template": {
                # kwok keeps the pod Running for ten minutes
                "metadata": {"annotations": {"pod-complete.stage.kwok.x-k8s.io/delay": "600s"}},
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "train",
                            "image": "tailor/workload",
                            "resources": {
                                "requests": request,
                                "limits": {"nvidia.com/gpu": str(gpus)},
                            },
                        }
                    ],
                },
            },
        },
    }


def queued_run(name: str, gpus: int, **spec: Any) -> dict[str, Any]:
    manifest = example("finetunejob")
    manifest["metadata"]["name"] = name
    manifest["spec"]["resources"] = {"gpus": gpus, "cpu": "1", "memory": "1Gi"}
    manifest["spec"].pop("activeDeadlineSeconds", None)
    manifest["spec"].update({"queueName": "gpus", **spec})
    return manifest


class Replica:
    """``tailor operator run --leader-election -n NS`` as a child process."""

    def __init__(self, kube: Kube, ns: str, log: Path) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kube.kubeconfig),
            "TAILOR_IMAGE": "tailor-workloads:test",
            "TAILOR_PROGRESS_INTERVAL_SECONDS": "1",
        }
        argv = [sys.executable, "-m", "tailor.cli", "operator", "run", "-n", ns]
        argv += ["--leader-election", "--lease-namespace", ns]
        argv += ["--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port)]
        self.proc = subprocess.Popen(argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def get(self, port: int, path: str) -> str:
        try:
            return (
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3).read().decode()
            )
        except OSError:
            return ""

    def leading(self) -> bool:
        return "tailor_operator_leader 1.0" in self.get(self.metrics_port, "/metrics")

    def alive(self) -> bool:
        return self.proc.poll() is None and bool(self.get(self.health_port, "/healthz"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
