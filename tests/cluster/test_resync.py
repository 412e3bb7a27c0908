"""The operator's periodic resync, against the real API server."""

from __future__ import annotations

import json

import pytest

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import fine_tune, get

pytestmark = pytest.mark.cluster


def test_the_resync_enqueues_every_unfinished_or_unhandled_object(
    kube: Kube, namespace: str
) -> None:
    """``Operator.resync`` against the real API server: it lists each kind and enqueues
    what is not settled (not in a final phase, or a generation not yet handled). A module
    of its own: no operator process runs while it does (test_operator's is module-scoped),
    so the statuses it writes stay as written."""
    from kubernetes import client, config

    from tailor.api.settings import OperatorSettings
    from tailor.controllers import context, finetunejob, promptprofile  # noqa: F401

    names = {"done": "Succeeded", "running": "Running", "fresh": None, "respecced": "Succeeded"}
    for name in names:
        kube.apply(fine_tune(name, 0), "-n", namespace)  # no operator runs in this namespace
    for name, phase in names.items():
        if phase:
            generation = get(kube, namespace, "ftj", name)["metadata"]["generation"]
            seen = generation - 1 if name == "respecced" else generation
            patch = {"status": {"phase": phase, "observedGeneration": seen}}
            kube.kubectl("patch", "ftj", name, "-n", namespace, "--subresource=status",
                         "--type=merge", "-p", json.dumps(patch))  # fmt: skip

    # A settled PromptProfile that reads its pool from a ConfigMap is resynced anyway (no
    # watch sees the ConfigMap change); one with an inline pool is not.
    for name, selection in (
        ("pooled", {"k": 1, "poolFrom": {"name": "examples", "key": "pool.jsonl"}}),
        ("inline", {"k": 1, "pool": [{"user": "a", "assistant": "b"}]}),
    ):
        pp = {"apiVersion": "tailor.dev/v1alpha1", "kind": "PromptProfile",
              "metadata": {"name": name}, "spec": {"fewShotSelection": selection}}  # fmt: skip
        kube.apply(pp, "-n", namespace)
        generation = get(kube, namespace, "pp", name)["metadata"]["generation"]
        patch = {"status": {"phase": "Valid", "observedGeneration": generation}}
        kube.kubectl("patch", "pp", name, "-n", namespace, "--subresource=status",
                     "--type=merge", "-p", json.dumps(patch))  # fmt: skip

    class Recording(context.Operator):
        def enqueue(self, kind: str, ns: str, name: str) -> None:
            self.seen.append((kind, ns, name))

    api = config.new_client_from_config(str(kube.kubeconfig))  # type: ignore[no-untyped-call]
    op = Recording(OperatorSettings(), runtime=None, api_client=api, namespaces=[namespace])  # type: ignore[arg-type]
    op.seen = []  # type: ignore[attr-defined]
    assert isinstance(api, client.ApiClient)
    count = op.resync()
    queued = sorted(n for k, ns, n in op.seen if k == "FineTuneJob")  # type: ignore[attr-defined]
    assert queued == ["fresh", "respecced", "running"] and count == len(op.seen)  # type: ignore[attr-defined]
    profiles = [n for k, ns, n in op.seen if k == "PromptProfile"]  # type: ignore[attr-defined]
    assert profiles == ["pooled"]
