"""Uninstalling the operator must not wedge a tenant's namespace (docs/security.md).

A KnowledgeBase carries Tailor's finalizer (``tailor.dev/finalizer``) so that deleting it
removes its Qdrant collections first. With the operator uninstalled, nothing would ever
remove the finalizer: the object, and a namespace being deleted around it, would hang in
Terminating forever. The chart's post-delete hook runs ``tailor operator
release-finalizers``, shown here against the real API server with no operator running."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import wait_for

pytestmark = pytest.mark.cluster


def knowledge_base(name: str, finalizers: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "KnowledgeBase",
        "metadata": {"name": name, "finalizers": finalizers},
        "spec": {
            "sources": [{"configMap": {"name": "docs", "key": "a.md"}}],
            "embedding": {"model": {"builtin": "minilm-l6-v2"}},
        },
    }


def test_released_finalizers_let_a_deleted_knowledge_base_go(kube: Kube, namespace: str) -> None:
    kube.apply(knowledge_base("docs", ["tailor.dev/finalizer"]), "-n", namespace)
    kube.apply(
        knowledge_base("kept", ["tailor.dev/finalizer", "example.com/keep"]), "-n", namespace
    )
    kube.kubectl("delete", "kb", "docs", "-n", namespace, "--wait=false")
    stuck = kube.get_json("kb", "docs", "-n", namespace)
    assert stuck["metadata"].get("deletionTimestamp")  # Terminating, held by the finalizer

    released = subprocess.run(
        [sys.executable, "-m", "tailor.cli", "operator", "release-finalizers", "-n", namespace],
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "released the finalizer of 2 objects" in released.stderr + released.stdout

    def gone() -> bool:
        names = [kb["metadata"]["name"] for kb in kube.get_json("kb", "-n", namespace)["items"]]
        return names == ["kept"]

    wait_for("the deleted KnowledgeBase to go", gone, timeout=30, interval=0.3)
    kept = kube.get_json("kb", "kept", "-n", namespace)
    assert kept["metadata"]["finalizers"] == ["example.com/keep"]  # only Tailor's removed
    kube.kubectl("patch", "kb", "kept", "-n", namespace, "--type=merge",
                 "-p", '{"metadata":{"finalizers":null}}')  # fmt: skip
