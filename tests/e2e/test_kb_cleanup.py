"""Deleting a KnowledgeBase whose Qdrant cannot be reached: the cleanup is retried for a
bounded time (TAILOR_CLEANUP_TIMEOUT_SECONDS, 20 s here), then the object goes and an Event
names the collections left behind; ``tailor.dev/skip-cleanup`` lets it go at once. Real
operator (local runtime), real index workload processes, real API server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tailor.devcluster.kube import Kube

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]


def unreachable_kb(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "KnowledgeBase",
        "metadata": {"name": name},
        "spec": {
            "sources": [{"inline": [{"id": "a", "text": "hello world"}]}],
            "store": {"qdrant": {"url": "http://qdrant.invalid:6333"}},
        },
    }


def gone(kube: Kube, ns: str, name: str) -> bool:
    return (
        f"knowledgebase.tailor.dev/{name}"
        not in kube.kubectl("get", "kb", "-n", ns, "-o", "name").stdout.split()
    )


def events(kube: Kube, ns: str, name: str) -> dict[str, str]:
    items = kube.get_json("events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
    return {e["reason"]: e["message"] for e in items["items"]}


def apply_then_delete(kube: Kube, ns: str, manifest: dict[str, Any], limit: float) -> float:
    """Apply, wait for a build to be recorded, delete; seconds until the object is gone."""
    name = manifest["metadata"]["name"]
    kube.apply(manifest, "-n", ns)
    deadline = time.monotonic() + 180
    while not (kube.get_json("kb", name, "-n", ns).get("status") or {}).get("build"):
        assert time.monotonic() < deadline, "no build recorded"
        time.sleep(1)
    started = time.monotonic()
    kube.kubectl("delete", "kb", name, "-n", ns, "--wait=false")
    while not gone(kube, ns, name):
        assert time.monotonic() - started < limit, events(kube, ns, name)
        time.sleep(0.5)
    return time.monotonic() - started


def test_a_knowledge_base_with_qdrant_down_still_deletes_and_names_what_it_left(
    kube: Kube, namespace: str, local_operator: Path
) -> None:
    took = apply_then_delete(kube, namespace, unreachable_kb("down"), limit=120)
    seen = events(kube, namespace, "down")
    assert "CleanupAbandoned" in seen and "qdrant.invalid" in seen["CleanupAbandoned"]
    assert "alias" in seen["CleanupAbandoned"]
    assert took >= 20  # not before the timeout (it kept trying until then)


def test_the_skip_cleanup_annotation_deletes_at_once(
    kube: Kube, namespace: str, local_operator: Path
) -> None:
    manifest = unreachable_kb("skipped")
    manifest["metadata"]["annotations"] = {"tailor.dev/skip-cleanup": "true"}
    apply_then_delete(kube, namespace, manifest, limit=30)
    assert "CleanupSkipped" in events(kube, namespace, "skipped")
