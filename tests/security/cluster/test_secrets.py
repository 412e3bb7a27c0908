"""A Secret is used only when it opts in (docs/security.md, "Secrets"), against the real
API server with the operator running.

Before, a user who may create a ModelDeployment (or a KnowledgeBase, a RAFTJob, a
FineTuneJob) could name any Secret of the namespace and have a pod mount it, e.g. as a
Qdrant API key sent to a URL they choose. Now the object waits, before any pod, until the
Secret carries ``tailor.dev/usable-by`` naming it; the operator reads only the Secret's
metadata."""

from __future__ import annotations

from typing import Any

import pytest

from tailor.controllers.secrets import allows
from tailor.devcluster.kube import Kube
from tests.cluster.helpers import get, wait_for

pytestmark = pytest.mark.cluster


def deployment(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "auth": {"apiKeySecretRef": {"name": "team-db", "key": "password"}},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }


def test_a_secret_that_did_not_opt_in_is_refused_before_any_pod(kube: Kube, ns: str) -> None:
    kube.kubectl("create", "secret", "generic", "team-db", "-n", ns,
                 "--from-literal=password=hunter2")  # fmt: skip
    kube.apply(deployment("chat"), "-n", ns)

    def waiting() -> Any:
        status = get(kube, ns, "md", "chat").get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return ready if ready.get("reason") == "SecretNotUsable" else None

    ready = wait_for("the Secret to be refused", waiting, timeout=60, interval=0.3)
    assert ready["message"].startswith("spec.auth.apiKeySecretRef.name: Secret team-db")
    assert "tailor.dev/usable-by=ModelDeployment/chat" in ready["message"]
    assert get(kube, ns, "md", "chat")["status"]["phase"] == "Pending"
    listed = kube.get_json("deployments,jobs,pods", "-n", ns)["items"]
    assert listed == []  # nothing mounts it
    assert "hunter2" not in str(get(kube, ns, "md", "chat"))

    # the opt-in starts it, with no edit of the ModelDeployment: the operator looks again
    kube.kubectl("annotate", "secret", "team-db", "-n", ns,
                 "tailor.dev/usable-by=KnowledgeBase, ModelDeployment/chat")  # fmt: skip
    wait_for(
        "the serving Deployment",
        lambda: kube.get_json("deployments", "-n", ns)["items"],
        timeout=60,
        interval=0.5,
    )


def test_an_opt_in_names_kinds_or_objects() -> None:
    assert allows("*", "RAFTJob", "r")
    assert allows("KnowledgeBase, ModelDeployment/chat", "ModelDeployment", "chat")
    assert allows("modeldeployment", "ModelDeployment", "chat")  # kinds in any case
    assert not allows("ModelDeployment/other", "ModelDeployment", "chat")
    assert not allows("ModelDeployment/chat", "KnowledgeBase", "chat")
    assert not allows(None, "ModelDeployment", "chat") and not allows("", "FineTuneJob", "x")
