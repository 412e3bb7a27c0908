"""The operator's rights (docs/security.md, "Operator rights"): a plain install acts only in
its own namespace; cluster-wide mode is an opt-in that leaves ``excludedNamespaces``
(kube-system, kube-public, kube-node-lease) alone; and a ValidatingAdmissionPolicy limits
the operator's writes to objects labelled ``app.kubernetes.io/managed-by: tailor``, outside
the excluded namespaces.

Rendering tests need only helm. The cluster tests install the chart twice on the session
control plane (namespaced, the default, and cluster-wide) and act as each release's
ServiceAccount (``kubectl --as``): RBAC and the admission policy are the API server's own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tailor.api.settings import OperatorSettings
from tailor.cli import build_parser
from tailor.controllers.context import Operator
from tailor.devcluster.kube import Kube, create_namespace, delete_namespace
from tests.chart.helpers import CHART, helm, render
from tests.chart.test_chart import RESOURCES, builder_manifests, by_kind, grants

MANAGED = {"app.kubernetes.io/managed-by": "tailor"}
SYSTEM = ["kube-system", "kube-public", "kube-node-lease"]


def operator_args(objects: dict[str, list[dict[str, Any]]]) -> list[str]:
    return list(objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"])


def workload_rules(objects: dict[str, list[dict[str, Any]]], namespace: str) -> list[Any]:
    """The rules of the workload Role in ``namespace`` (not the leader-election Role)."""
    roles = [
        r
        for r in objects.get("Role", [])
        if r["metadata"]["namespace"] == namespace
        and not r["metadata"]["name"].endswith("-leader-election")
    ]
    return [rule for role in roles for rule in role["rules"]]


def policy(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (vap,) = objects["ValidatingAdmissionPolicy"]
    return vap


# ----------------------------------------------------------------- rendering
def test_a_plain_install_watches_only_its_own_namespace() -> None:
    objects = by_kind(render())
    args = operator_args(objects)
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=tailor-system"]
    rules = workload_rules(objects, "tailor-system")
    assert grants(rules, "batch", "jobs", "create")
    (cluster_role,) = objects["ClusterRole"]
    for group, resource in (("batch", "jobs"), ("", "configmaps"), ("apps", "deployments")):
        assert not grants(cluster_role["rules"], group, resource, "create"), resource
    # The PodMonitors look where the operator acts.
    monitors = by_kind(render({"podMonitors": {"servers": {"enabled": True}}}))["PodMonitor"]
    assert monitors[0]["spec"]["namespaceSelector"] == {"matchNames": ["tailor-system"]}


def test_cluster_wide_mode_is_an_opt_in_that_skips_the_system_namespaces() -> None:
    objects = by_kind(render({"clusterWide": True}))
    args = operator_args(objects)
    assert not [a for a in args if a.startswith("--namespace")]
    assert [a for a in args if a.startswith("--exclude-namespace")] == [
        f"--exclude-namespace={ns}" for ns in SYSTEM
    ]
    (cluster_role,) = objects["ClusterRole"]
    assert grants(cluster_role["rules"], "batch", "jobs", "create")
    assert not workload_rules(objects, "tailor-system")
    mine = by_kind(render({"clusterWide": True, "excludedNamespaces": ["kube-system", "infra"]}))
    assert [a for a in operator_args(mine) if a.startswith("--exclude-namespace")] == [
        "--exclude-namespace=kube-system",
        "--exclude-namespace=infra",
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"clusterWide": True, "watchNamespaces": ["team-a"]}, "at '/watchNamespaces'"),
        ({"clusterWide": "yes"}, "at '/clusterWide'"),
        ({"excludedNamespaces": ["Kube_System"]}, "at '/excludedNamespaces/0'"),
        ({"admissionPolicy": {"enabled": "on"}}, "at '/admissionPolicy/enabled'"),
    ],
    ids=["watch-list-and-cluster-wide", "cluster-wide-type", "excluded-name", "policy-type"],
)
def test_contradictory_namespace_values_fail_with_the_path(
    values: dict[str, Any], message: str
) -> None:
    result = helm("template", "tailor", str(CHART), values=values, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_watching_an_excluded_namespace_is_refused() -> None:
    result = helm(
        "template", "tailor", str(CHART), values={"watchNamespaces": ["kube-system"]}, check=False
    )
    assert result.returncode != 0
    assert "kube-system" in result.stderr and "excludedNamespaces" in result.stderr


def test_the_chart_exclusions_stop_the_operator_reconciling_there() -> None:
    """The operator's own parser reads the chart's args; it enqueues nothing in kube-system."""
    args = build_parser().parse_args(operator_args(by_kind(render({"clusterWide": True}))))
    assert args.exclude_namespace == SYSTEM

    class Queue:
        keys: list[Any] = []

        def add(self, key: Any) -> None:
            self.keys.append(key)

    operator = Operator(
        OperatorSettings(),
        runtime=object(),  # type: ignore[arg-type]
        api_client=None,  # type: ignore[arg-type]
        namespaces=args.namespace,
        excluded_namespaces=args.exclude_namespace,
    )
    operator._queue = Queue()  # type: ignore[assignment]
    operator.enqueue("FineTuneJob", "kube-system", "x")
    operator.enqueue("FineTuneJob", "team-a", "y")
    assert Queue.keys == [("FineTuneJob", "team-a", "y")]


def test_the_admission_policy_covers_every_kind_the_operator_writes() -> None:
    """Every child the builders write is labelled managed-by tailor (so the policy admits
    it), and the policy watches every core kind among them, in both modes."""
    manifests = builder_manifests(OperatorSettings())
    for manifest in manifests:
        assert manifest["metadata"]["labels"].items() >= MANAGED.items(), manifest["kind"]
    for values in ({}, {"clusterWide": True}):
        objects = by_kind(render(values))
        vap = policy(objects)
        covered = {
            (group, resource)
            for rule in vap["spec"]["matchConstraints"]["resourceRules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
        }
        written = {RESOURCES[(m["apiVersion"], m["kind"])] for m in manifests}
        written = {(g, r) for g, r in written if g != "tailor.dev"}
        assert written <= covered, written - covered
        assert ("", "secrets") in covered  # a deployment's test key
        assert {("policy", "poddisruptionbudgets"), ("networking.k8s.io", "networkpolicies")} <= (
            covered
        )
        for rule in vap["spec"]["matchConstraints"]["resourceRules"]:
            assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
        (condition,) = vap["spec"]["matchConditions"]
        assert "system:serviceaccount:tailor-system:tailor" in condition["expression"]
        (binding,) = objects["ValidatingAdmissionPolicyBinding"]
        assert binding["spec"]["policyName"] == vap["metadata"]["name"]
        assert binding["spec"]["validationActions"] == ["Deny"]
    off = by_kind(render({"admissionPolicy": {"enabled": False}}))
    assert "ValidatingAdmissionPolicy" not in off


# ----------------------------------------------------------------- on the control plane
@dataclass
class Releases:
    kube: Kube
    system: str
    """The release namespace of both releases."""
    tenant: str
    """A tenant namespace neither release lists."""
    namespaced: str
    """The ServiceAccount (user name) of the release installed with the defaults."""
    cluster: str
    """The ServiceAccount of the release installed with clusterWide: true."""

    def as_(self, user: str, *args: str, input: Any = None) -> tuple[bool, str]:
        """kubectl ARGS as ``user``: (succeeded, stderr)."""
        result = self.kube.kubectl(
            *args,
            "--as",
            user,
            input=json.dumps(input) if input is not None else None,
            check=False,
        )
        return result.returncode == 0, result.stderr

    def create(self, user: str, obj: dict[str, Any]) -> tuple[bool, str]:
        return self.as_(user, "create", "-f", "-", input=obj)

    def refused(self, *args: str, input: Any = None, why: str = "managed-by") -> None:
        """``kubectl ARGS`` as the cluster-wide release's ServiceAccount is refused, the
        message naming ``why`` (the label, or the excluded namespace)."""
        ok, err = self.as_(self.cluster, *args, input=input)
        assert not ok and why in err, err


def config_map(namespace: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "data": {"a": "1"},
    }


def deployment(namespace: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
            },
        },
    }


def job(namespace: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox:1.36"}],
                }
            },
        },
    }


@pytest.fixture(scope="module")
def releases(chart_cluster: Kube) -> Iterator[Releases]:
    """The chart installed twice in one release namespace: "rn" with the defaults
    (namespaced) and "rc" with clusterWide: true; a tenant namespace beside it."""
    kube = chart_cluster
    suffix = f"{int(time.time()) % 100000}"
    system, tenant = f"rights-sys-{suffix}", f"rights-tenant-{suffix}"
    for namespace in (system, tenant):
        create_namespace(kube, namespace)
    installed = []
    try:
        for release, values in (("rn", {}), ("rc", {"clusterWide": True})):
            helm("install", release, str(CHART), "--namespace", system, values=values, kube=kube)
            installed.append(release)
        found = Releases(
            kube,
            system,
            tenant,
            namespaced=f"system:serviceaccount:{system}:rn-tailor",
            cluster=f"system:serviceaccount:{system}:rc-tailor",
        )
        # The policy takes effect once the API server's informer has it: wait until a
        # write it refuses is refused (a server dry run goes through admission).
        deadline = time.monotonic() + 30
        while True:
            ok, _ = found.as_(
                found.cluster, "create", "--dry-run=server", "-f", "-",
                input=config_map(tenant, "probe"),
            )  # fmt: skip
            if not ok:
                break
            assert time.monotonic() < deadline, "the admission policy never took effect"
            time.sleep(0.5)
        yield found
    finally:
        for release in installed:
            helm("uninstall", release, "--namespace", system, kube=kube, check=False)
        for namespace in (system, tenant):
            delete_namespace(kube, namespace)


@pytest.mark.cluster
def test_namespaced_operator_cannot_create_a_job_in_another_namespace(
    releases: Releases,
) -> None:
    r = releases
    ok, err = r.create(r.namespaced, job(r.tenant, "elsewhere", MANAGED))
    assert not ok and "forbidden" in err.lower(), err
    # ... while in its own namespace it can
    ok, err = r.create(r.namespaced, job(r.system, "home", MANAGED))
    assert ok, err


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("make", "change", "delete_refused_by"),
    [
        (config_map, {"data": {"a": "2"}}, "managed-by"),
        # RBAC already refuses deleting a Deployment (the operator never does)
        (deployment, {"spec": {"replicas": 1}}, "forbidden"),
    ],
    ids=["ConfigMap", "Deployment"],
)
def test_cluster_operator_cannot_create_or_patch_an_unlabelled_object(
    releases: Releases,
    make: Callable[[str, str], dict[str, Any]],
    change: dict[str, Any],
    delete_refused_by: str,
) -> None:
    r = releases
    name = f"tenant-{make.__name__.replace('_', '-')}"
    r.refused("create", "-f", "-", input=make(r.tenant, f"{name}-new"))
    # A tenant's own object (created by the admin here) can be neither changed nor taken
    # over by adding the label, nor deleted.
    own = make(r.tenant, name)
    r.kube.apply(own)
    ref = (own["kind"].lower(), name, "-n", r.tenant)
    r.refused("patch", *ref, "-p", json.dumps(change))
    r.refused("patch", *ref, "-p", json.dumps({"metadata": {"labels": MANAGED}}))
    r.refused("delete", *ref, why=delete_refused_by)
    after = r.kube.get_json(*ref)  # unchanged
    assert "app.kubernetes.io/managed-by" not in (after["metadata"].get("labels") or {})
    assert after.get("data") == own.get("data")
    assert after.get("spec", {}).get("replicas") == own.get("spec", {}).get("replicas")


@pytest.mark.cluster
def test_cluster_operator_cannot_write_in_kube_system(releases: Releases) -> None:
    r = releases
    # RBAC alone would let it (one ClusterRole): the admission policy refuses.
    assert r.as_(r.cluster, "auth", "can-i", "create", "configmaps", "-n", "kube-system")[0]
    for obj in (config_map("kube-system", "t", MANAGED), job("kube-system", "t", MANAGED)):
        r.refused("create", "--dry-run=server", "-f", "-", input=obj, why="kube-system")
    # The admin's objects there are out of reach too.
    admins = ("configmap", "extension-apiserver-authentication", "-n", "kube-system")
    r.refused("delete", *admins, "--dry-run=server", why="kube-system")


@pytest.mark.cluster
def test_cluster_operator_can_still_write_labelled_children_in_a_tenant_namespace(
    releases: Releases,
) -> None:
    r = releases
    for obj in (
        config_map(r.tenant, "run-config", MANAGED),
        deployment(r.tenant, "run-server", MANAGED),
        job(r.tenant, "run-train", MANAGED),
    ):
        ok, err = r.create(r.cluster, obj)
        assert ok, (obj["kind"], err)
    # Server-side apply, as the operator writes (the policy checks the object it results in).
    applied = config_map(r.tenant, "run-config", MANAGED) | {"data": {"a": "2"}}
    ok, err = r.as_(
        r.cluster, "apply", "--server-side", "--force-conflicts", "--field-manager=tailor",
        "-f", "-", input=applied,
    )  # fmt: skip
    assert ok, err
    ok, err = r.as_(r.cluster, "delete", "job", "run-train", "-n", r.tenant)
    assert ok, err
    # Removing the label would take the object out of the operator's hands: refused.
    unlabel = json.dumps({"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}})
    r.refused("patch", "configmap", "run-config", "-n", r.tenant, "-p", unlabel)
