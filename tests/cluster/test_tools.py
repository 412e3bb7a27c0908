"""The kubectl and helm that ship in PyPI packages are found and work against the cluster."""

from __future__ import annotations

import os
import subprocess

import pytest

from tailor.devcluster.kube import Kube
from tailor.devcluster.tools import helm_path, kubectl_path

pytestmark = pytest.mark.cluster


def test_packaged_kubectl_is_used(kube: Kube) -> None:
    assert kubectl_path().name == "kubectl"
    client = kube.kubectl("version", "--client", "-o", "json").stdout
    assert '"gitVersion": "v1.' in client


def test_packaged_helm_talks_to_the_cluster(kube: Kube, namespace: str) -> None:
    helm = helm_path()
    assert os.access(helm, os.X_OK)
    result = subprocess.run(
        [str(helm), "list", "-n", namespace, "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
