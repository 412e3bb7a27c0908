"""The dev cluster behaves like a real cluster: versions, nodes, auth, scheduling, Jobs, GC.

Everything here runs against the real kube-apiserver, controller-manager and
scheduler built from source, with kwok playing the kubelets of three fake nodes.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from typing import Any

import pytest

from tailor.devcluster import build
from tailor.devcluster.build import component_dir
from tailor.devcluster.cluster import DevCluster
from tailor.devcluster.kube import Kube

pytestmark = pytest.mark.cluster


def job(name: str, gpus: int = 0) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "busybox", "command": ["true"]}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        },
    }


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def test_apiserver_reports_the_pinned_kubernetes_version(kube: Kube) -> None:
    versions = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == build.KUBERNETES_VERSION
    assert versions["serverVersion"]["gitTreeState"] == "clean"


@pytest.mark.parametrize(
    ("component", "binary", "expected"),
    [
        (build.KUBERNETES, "kube-controller-manager", f"Kubernetes {build.KUBERNETES_VERSION}"),
        (build.KUBERNETES, "kube-scheduler", f"Kubernetes {build.KUBERNETES_VERSION}"),
        (build.ETCD, "etcd", f"etcd Version: {build.ETCD_VERSION.lstrip('v')}"),
        (build.KWOK, "kwok", f"kwok version {build.KWOK_VERSION}"),
    ],
)
def test_every_binary_reports_its_pinned_version(
    component: build.Component, binary: str, expected: str
) -> None:
    result = subprocess.run(
        [str(component_dir(component) / binary), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert expected in result.stdout + result.stderr


def test_etcd_serves_the_pinned_version(dev_cluster: DevCluster) -> None:
    port = json.loads(dev_cluster.state_file.read_text())["ports"]["etcd"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as response:
        assert json.load(response)["etcdserver"] == build.ETCD_VERSION.lstrip("v")


def test_fake_nodes_are_ready_with_their_gpus(kube: Kube) -> None:
    nodes = {n["metadata"]["name"]: n for n in kube.get_json("nodes")["items"]}
    assert {"cpu-0", "gpu-a", "gpu-b"} <= set(nodes)
    for node in nodes.values():
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", node["metadata"]["name"]
    gpus = {name: n["status"]["allocatable"].get("nvidia.com/gpu") for name, n in nodes.items()}
    assert gpus["cpu-0"] is None
    assert gpus["gpu-a"] == "1"
    assert gpus["gpu-b"] == gpus["gpu-c"] == "4"
    assert nodes["gpu-b"]["metadata"]["labels"]["nvidia.com/gpu.product"] == (
        "NVIDIA-H100-80GB-HBM3"
    )


def test_service_account_tokens_are_signed_and_accepted(
    dev_cluster: DevCluster, kube: Kube, namespace: str
) -> None:
    token = kube.kubectl("create", "token", "default", "-n", namespace).stdout.strip()
    whoami = kube.kubectl(
        "--kubeconfig=/dev/null",
        f"--server={dev_cluster.server()}",
        f"--certificate-authority={dev_cluster.pki.ca_cert}",
        f"--token={token}",
        "auth",
        "whoami",
        "-o",
        "json",
    )
    user = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
    assert user == f"system:serviceaccount:{namespace}:default"


def test_rbac_denies_a_service_account_without_a_role(kube: Kube, namespace: str) -> None:
    result = kube.kubectl(
        "auth", "can-i", "list", "secrets", "-n", namespace,
        f"--as=system:serviceaccount:{namespace}:default", check=False,
    )  # fmt: skip
    assert result.stdout.strip() == "no"


def test_job_asking_for_two_gpus_runs_on_gpu_b_and_completes(kube: Kube, namespace: str) -> None:
    kube.apply(job("train", gpus=2), "-n", namespace)
    kube.kubectl(
        "wait", "--for=condition=Complete", "job/train", "-n", namespace, "--timeout=90s",
        timeout=120,
    )  # fmt: skip
    pods = kube.get_json("pods", "-n", namespace, "-l", "job-name=train")["items"]
    assert [p["spec"]["nodeName"] for p in pods] in (["gpu-b"], ["gpu-c"])
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    status = kube.get_json("job", "train", "-n", namespace)["status"]
    assert status["succeeded"] == 1


def test_job_asking_for_eight_gpus_stays_pending(kube: Kube, namespace: str) -> None:
    kube.apply(job("too-big", gpus=8), "-n", namespace)

    def failed_scheduling() -> list[dict[str, Any]]:
        events = kube.get_json(
            "events", "-n", namespace, "--field-selector", "reason=FailedScheduling"
        )["items"]
        return [e for e in events if e["involvedObject"]["kind"] == "Pod"]

    events = wait_for("a FailedScheduling event", failed_scheduling)
    assert "Insufficient nvidia.com/gpu" in events[0]["message"]
    pods = kube.get_json("pods", "-n", namespace, "-l", "job-name=too-big")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Pending"]
    assert not any(p["spec"].get("nodeName") for p in pods)


def test_deleting_an_owner_garbage_collects_its_dependents(kube: Kube, namespace: str) -> None:
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}},
               "-n", namespace)  # fmt: skip
    uid = kube.get_json("configmap", "owner", "-n", namespace)["metadata"]["uid"]
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [owner_ref]},
        "data": {"k": "v"},
    }
    kube.apply(dependent, "-n", namespace)
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)
    kube.kubectl(
        "wait", "--for=delete", "configmap/dependent", "-n", namespace, "--timeout=60s",
        timeout=90,
    )  # fmt: skip
    left = kube.kubectl("get", "configmap", "dependent", "-n", namespace, check=False)
    assert "NotFound" in left.stderr


def test_deleting_a_job_garbage_collects_its_pods(kube: Kube, namespace: str) -> None:
    kube.apply(job("cpu-work"), "-n", namespace)
    kube.kubectl(
        "wait", "--for=condition=Complete", "job/cpu-work", "-n", namespace, "--timeout=90s",
        timeout=120,
    )  # fmt: skip
    pods = kube.get_json("pods", "-n", namespace, "-l", "job-name=cpu-work")["items"]
    assert len(pods) == 1
    kube.kubectl("delete", "job", "cpu-work", "-n", namespace, "--cascade=background")
    wait_for(
        "the Job's pod to be garbage-collected",
        lambda: not kube.get_json("pods", "-n", namespace, "-l", "job-name=cpu-work")["items"],
    )


def test_a_claim_without_a_class_binds_through_the_default_provisioner(
    kube: Kube, namespace: str, dev_cluster: DevCluster
) -> None:
    """The default StorageClass and the dev cluster's provisioner (SIG Storage's library):
    a claim binds to a new hostPath volume, a pod using it schedules, and deleting the
    claim deletes the volume and its directory (reclaim policy Delete)."""
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )

    def bound() -> Any:
        claim = kube.get_json("pvc", "data", "-n", namespace)
        return claim if claim.get("status", {}).get("phase") == "Bound" else None

    claim = wait_for("the claim to bind", bound)
    assert claim["spec"]["storageClassName"] == "tailor-hostpath"  # the default class
    volume = kube.get_json("pv", claim["spec"]["volumeName"])
    folder = volume["spec"]["hostPath"]["path"]
    assert folder.startswith(str(dev_cluster.dir / "volumes"))
    assert (dev_cluster.dir / "volumes" / volume["metadata"]["name"]).is_dir()

    pod = job("uses-claim")["spec"]["template"]
    pod["spec"]["volumes"] = [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "d", "mountPath": "/d"}]
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "uses-claim",
                "namespace": namespace}, **pod})  # fmt: skip
    wait_for(
        "the pod to schedule",
        lambda: kube.get_json("pod", "uses-claim", "-n", namespace)["spec"].get("nodeName"),
    )
    kube.kubectl("delete", "pod", "uses-claim", "-n", namespace, "--grace-period=0", "--force")
    kube.kubectl("delete", "pvc", "data", "-n", namespace)

    def volume_gone() -> bool:
        names = kube.kubectl("get", "pv", "-o", "name").stdout.split()
        return f"persistentvolume/{volume['metadata']['name']}" not in names

    wait_for("the volume to be deleted", volume_gone)
    assert not (dev_cluster.dir / "volumes" / volume["metadata"]["name"]).exists()
