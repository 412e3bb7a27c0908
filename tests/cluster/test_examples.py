"""Every file in docs/examples, applied unchanged as a user would, on the dev cluster with
``tailor operator run``: the ConfigMaps they read come from ``tailor example-data``, the
artifacts claim binds through the dev cluster's default StorageClass, and each resource
reaches its final phase. kwok plays the pods (the workloads' real runs are covered by
tests/e2e with the local runtime), so this checks what the control plane decides: that
nothing waits forever on storage, data, a dependency or a GPU node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import OperatorProcess, phase_is, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
FINAL = {
    "promptprofile": ("api-assistant", "Valid"),
    "knowledgebase": ("torchhub-docs", "Ready"),
    "finetunejob": ("torchhub-lora", "Succeeded"),
    "modeldeployment": ("api-assistant", "Ready"),
    "raftjob": ("torchhub-raft", "Succeeded"),
    "modeldeployment-feedback": ("assistant-feedback", "Ready"),
    "finetunejob-kto": ("assistant-kto", "Succeeded"),
    "knowledgebase-adaptive": ("torchhub-docs-adaptive", "Ready"),
    "evaluation": ("torchhub-ladder", "Succeeded"),
    "modeldeployment-rollout": ("assistant-canary", "Ready"),
    "adaptationloop": ("assistant-loop", "Waiting"),
}


def test_every_example_reaches_its_final_phase_unchanged(
    kube: Kube,
    namespace: str,
    operator_process: OperatorProcess,
) -> None:
    files = sorted((ROOT / "docs" / "examples").glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(FINAL)  # a new example gets a row here
    subprocess.run(
        [sys.executable, "-m", "tailor.cli", "example-data", "-n", namespace,
         "--kubeconfig", str(kube.kubeconfig)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    for file in files:
        kube.kubectl("apply", "-n", namespace, "-f", str(file))
    for example, (name, phase) in FINAL.items():
        kind = example.split("-")[0]
        try:
            wait_for(f"{kind}/{name} {phase}", phase_is(kube, namespace, kind, name, phase), 240)
        except AssertionError as error:
            status = kube.get_json(kind, name, "-n", namespace).get("status")
            raise AssertionError(f"{error}; its status: {status}") from None
