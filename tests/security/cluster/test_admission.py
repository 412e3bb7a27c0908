"""What the operator refuses before any pod, against the real API server with the operator
running: S3 outside the namespace's own folder and the folders the admin shares
(docs/security.md, "Storage"), and placement the admin did not allow.

Before, every artifact key was ``<prefix>/<kind>/<name>/<uid>`` and an ``s3://`` URI in a
spec was read with the cluster's one S3 identity wherever it pointed: a tenant could index
another tenant's datasets or load its weights by naming them. Now keys are under
``<prefix>/<namespace>/`` and the operator refuses, before any pod, an ``s3://`` URI outside
the namespace's folder and the admin's ``artifacts.s3.sharedReadable``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tailor.api import KINDS, parse_spec
from tailor.api.base import TailorModel
from tailor.api.settings import OperatorSettings
from tailor.controllers.storage import refused_storage
from tailor.devcluster.kube import Kube
from tests.cluster.helpers import OperatorProcess, bare_deployment, fine_tune, get, wait_for

pytestmark = pytest.mark.cluster

SHARED = "s3://shared-models/published/"
KB = KINDS["KnowledgeBase"]
API_SERVER = {
    "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
    "ports": [{"protocol": "TCP", "port": 443}],
}


@pytest.fixture(scope="module")
def operator_process(
    kube: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """This module's operator has an S3 connection (bucket ``models``, prefix ``tailor``)
    and shares one folder with every namespace; nothing here reaches S3 itself."""
    op = OperatorProcess(kube, tmp_path_factory.mktemp("operator") / "operator.log")
    op.env = {
        "TAILOR_S3_BUCKET": "models",
        "TAILOR_S3_PREFIX": "tailor",
        "TAILOR_S3_SHARED_READABLE": json.dumps([SHARED]),
        "TAILOR_NETWORK_POLICY": json.dumps({"egress": {"enabled": True, "allow": [API_SERVER]}}),
    }
    op.start()
    yield op
    op.stop()


def knowledge_base(uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "KnowledgeBase",
        "metadata": {"name": "docs"},
        "spec": {"sources": [{"uri": uri}], "embedding": {"model": {"builtin": "minilm-l6-v2"}}},
    }


def ready_reason(kube: Kube, ns: str, kind: str, name: str) -> dict[str, Any]:
    status = get(kube, ns, kind, name).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})


def test_another_namespaces_artifacts_are_refused_before_any_pod(kube: Kube, ns: str) -> None:
    stolen = "s3://models/tailor/team-b/raftjob/r/u1/data/train.jsonl"
    kube.apply(knowledge_base(stolen), "-n", ns)
    ready = wait_for(
        "the spec to be refused",
        lambda: (
            (r := ready_reason(kube, ns, "kb", "docs")).get("reason") == "StorageNotAllowed" and r
        ),
        timeout=60,
        interval=0.3,
    )
    assert ready["message"].startswith(f"spec.sources[0].uri: {stolen} is outside")
    assert f"s3://models/tailor/{ns}/" in ready["message"]
    assert "artifacts.s3.sharedReadable" in ready["message"]
    assert kube.get_json("jobs,pods", "-n", ns)["items"] == []  # nothing was started

    # its own folder, and the shared one, are readable: the runs start
    kube.apply(knowledge_base(f"s3://models/tailor/{ns}/docs/handbook.md"), "-n", ns)
    base = fine_tune("shared-base", 0)
    base["spec"]["baseModel"] = {"uri": f"{SHARED}smollm2/"}
    kube.apply(base, "-n", ns)
    wait_for("the index Job", lambda: kube.get_json("jobs", "-n", ns)["items"], timeout=60)
    wait_for(
        "the training Job",
        lambda: any(
            j["metadata"]["name"] == "shared-base-train"
            for j in kube.get_json("jobs", "-n", ns)["items"]
        ),
        timeout=60,
    )
    assert ready_reason(kube, ns, "kb", "docs").get("reason") != "StorageNotAllowed"

    # with the admin's egress policy on, each workload's pods reach DNS, their namespace and
    # the admin's destinations only (enforced by the network plugin; the object is checked)
    policy = get(kube, ns, "networkpolicy", "shared-base-train-egress")
    pods = get(kube, ns, "job", "shared-base-train")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
    assert policy["spec"]["policyTypes"] == ["Egress"]
    dns, own_namespace, admins = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and own_namespace == {
        "to": [{"podSelector": {}}]
    }
    assert admins == API_SERVER
    owner = policy["metadata"]["ownerReferences"][0]
    assert owner["uid"] == get(kube, ns, "ftj", "shared-base")["metadata"]["uid"]


def test_only_the_namespaces_folder_and_shared_folders_are_readable() -> None:
    settings = OperatorSettings(s3_bucket="models", s3_prefix="tailor", s3_shared_readable=[SHARED])

    def refused(uri: str, namespace: str = "team-a") -> str | None:
        return refused_storage(parse_spec(KB, knowledge_base(uri)["spec"]), settings, namespace)

    assert refused("s3://models/tailor/team-a/kb/docs.md") is None
    assert refused("s3://models/tailor/team-a/") is None
    assert refused(f"{SHARED}handbook.md") is None
    assert refused("s3://models/tailor/team-ab/kb/docs.md")  # a namespace sharing a prefix
    assert refused("s3://models/tailor/team-a")  # not inside the folder
    assert refused("s3://models/tailor/finetunejob/x/u/model/")  # the old, shared layout
    assert refused("s3://shared-models/published-other/x")
    assert refused("s3://other-bucket/tailor/team-a/x")
    # without an S3 connection nothing is readable from S3 (the builders say so)
    kb = parse_spec(KB, knowledge_base("s3://bucket-b/x")["spec"])
    assert refused_storage(kb, OperatorSettings(), "t") is None
    with pytest.raises(ValueError, match="sharedReadable"):
        OperatorSettings(s3_bucket="models", s3_shared_readable=["s3://models/tailor"])
    with pytest.raises(ValueError, match="sharedReadable"):
        OperatorSettings(s3_bucket="models", s3_shared_readable=["s3://models/a/../b/"])


def test_a_priority_class_or_toleration_the_admin_did_not_allow_is_refused(
    kube: Kube, ns: str
) -> None:
    """The same gate for what a spec asks of the scheduler (controllers/placement.py):
    ``system-node-critical`` would preempt every tenant's pods; a keyless toleration would
    land pods on nodes tainted for others."""
    critical = fine_tune("critical", 0)
    critical["spec"]["resources"]["priorityClassName"] = "system-node-critical"
    kube.apply(critical, "-n", ns)
    ready = wait_for(
        "the spec to be refused",
        lambda: (
            (r := ready_reason(kube, ns, "ftj", "critical")).get("reason") == "PlacementNotAllowed"
            and r
        ),
        timeout=60,
        interval=0.3,
    )
    assert ready["message"].startswith("spec.resources.priorityClassName: system-node-critical")
    assert "workloads.pods.allowedPriorityClasses" in ready["message"]
    assert kube.get_json("jobs", "-n", ns)["items"] == []


def test_placement_allow_lists_and_default_resources() -> None:
    from tailor.api.finetunejob import FineTuneJobSpec
    from tailor.api.settings import PodPolicy
    from tailor.builders.common import Parent
    from tailor.builders.finetunejob import build_training
    from tailor.controllers.placement import refused_placement

    def body(**resources: Any) -> TailorModel:
        manifest = fine_tune("r", 0)
        manifest["spec"]["resources"].update(resources)
        return parse_spec(KINDS["FineTuneJob"], manifest["spec"])

    policy = PodPolicy()
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert refused_placement(body(tolerations=[gpu]), policy) is None
    everything = refused_placement(body(tolerations=[gpu, {"operator": "Exists"}]), policy)
    assert everything and everything.startswith("spec.resources.tolerations[1].key: a toleration")
    control_plane = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}
    assert refused_placement(body(tolerations=[control_plane]), policy)
    assert refused_placement(body(tolerations=[control_plane]), PodPolicy(
        allowed_toleration_keys=["*"])) is None  # fmt: skip
    batch = PodPolicy(allowed_priority_classes=["batch-low"])
    assert refused_placement(body(priorityClassName="batch-low"), batch) is None
    assert refused_placement(body(priorityClassName="system-cluster-critical"), batch)

    # a spec without cpu and memory still runs bounded: the admin's defaults
    spec = fine_tune("r", 0)["spec"]
    spec["resources"] = {"gpus": 0}
    parent = Parent(kind="FineTuneJob", name="r", namespace="t", uid="u", generation=1)
    job = next(
        m
        for m in build_training(
            FineTuneJobSpec.model_validate(spec), parent, OperatorSettings()
        ).manifests
        if m["kind"] == "Job"
    )
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "2", "memory": "8Gi"}


def test_an_admin_can_require_hub_models_pinned_to_a_commit() -> None:
    """With workloads.huggingface.requirePinnedRevisions, a Hub model named by branch (the
    default ``main``) is refused before any pod: every pod must load the same weights."""
    from tailor.controllers.provenance import unpinned_revision

    def body(model: dict[str, Any]) -> TailorModel:
        manifest = fine_tune("r", 0)
        manifest["spec"]["baseModel"] = model
        return parse_spec(KINDS["FineTuneJob"], manifest["spec"])

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    branch = unpinned_revision(body({"huggingface": {"repo": repo}}))
    assert branch and branch.startswith("spec.baseModel.huggingface.revision: ")
    assert "'main' is not a commit" in branch and "requirePinnedRevisions" in branch
    by_uri = unpinned_revision(body({"uri": f"hf://{repo}@v1.0"}))
    assert by_uri and by_uri.startswith("spec.baseModel.uri: ")
    assert unpinned_revision(body({"huggingface": {"repo": repo, "revision": commit}})) is None
    assert unpinned_revision(body({"uri": f"hf://{repo}@{commit}"})) is None
    assert unpinned_revision(body({"builtin": "smollm2-135m-instruct"})) is None
    kb = {
        "sources": [{"configMap": {"name": "docs", "key": "a.md"}}],
        "embedding": {"model": {"uri": "hf://sentence-transformers/all-MiniLM-L6-v2"}},
    }
    embedding = unpinned_revision(parse_spec(KB, kb))
    assert embedding and embedding.startswith("spec.embedding.model.uri: ")
    env = {"TAILOR_REQUIRE_PINNED_REVISIONS": "true"}
    assert OperatorSettings.from_env(env).require_pinned_revisions is True


def test_a_deployment_does_not_serve_an_adapter_a_status_points_at_another_namespace(
    kube: Kube, ns: str
) -> None:
    """An adapter's URI comes from its run's status, which whoever may write that
    subresource can set: a status naming another namespace's weights is not served (the
    same line as a spec's s3:// URIs), and the deployment says why."""
    run = fine_tune("borrowed", 0, suspend=True)
    kube.apply(run, "-n", ns)
    generation = get(kube, ns, "ftj", "borrowed")["metadata"]["generation"]
    stolen = "s3://models/tailor/team-b/finetunejob/x/u1/model/"
    status = {"phase": "Succeeded", "jobName": "borrowed-train", "observedGeneration": generation,
              "artifact": {"uri": stolen, "sha256": "ab" * 32}}  # fmt: skip
    kube.kubectl("patch", "ftj", "borrowed", "-n", ns, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))  # fmt: skip
    md = bare_deployment(adapters=[{"name": "b", "fineTuneJobRef": {"name": "borrowed"}}])
    kube.apply(md, "-n", ns)
    name = md["metadata"]["name"]
    ready = wait_for(
        "the deployment to refuse the adapter",
        lambda: (
            "is outside this namespace's folder"
            in (r := ready_reason(kube, ns, "md", name)).get("message", "")
            and r
        ),
        timeout=60,
        interval=0.3,
    )
    assert f"FineTuneJob borrowed (its status.artifact.uri: {stolen}" in ready["message"]
    assert kube.get_json("deployments", "-n", ns)["items"] == []
