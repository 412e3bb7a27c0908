"""The operator against the real control plane: children, phases, waiting, rollouts,
restarts, suspend/resume, deletion and metrics. kwok runs the pods (it completes Job pods
and marks Deployment pods ready), so these tests cover the Kubernetes side; the workload
programs themselves are tested in tests/workloads."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import (
    OperatorProcess,
    bare_deployment,
    example,
    fine_tune,
    get,
    phase_is,
    refuse_success,
    wait_for,
)

pytestmark = pytest.mark.cluster


def test_fine_tune_job_children_and_success_on_gpu_node(kube: Kube, ns: str) -> None:
    kube.apply(fine_tune("two-gpus", 2), "-n", ns)
    ftj = wait_for("Succeeded", phase_is(kube, ns, "ftj", "two-gpus", "Succeeded"))
    status = ftj["status"]
    assert status["jobName"] == "two-gpus-train"
    assert status["artifact"]["uri"].startswith("pvc://tailor-artifacts/finetunejob/two-gpus/")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1

    job = get(kube, ns, "job", "two-gpus-train")
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "tailor"
    assert labels["tailor.dev/finetunejob"] == "two-gpus"
    pods = kube.get_json("pods", "-n", ns, "-l", "job-name=two-gpus-train")["items"]
    assert [p["spec"]["nodeName"] for p in pods] in (["gpu-b"], ["gpu-c"])

    role = get(kube, ns, "role", "two-gpus-train")
    assert role["rules"] == [
        {
            "apiGroups": ["tailor.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["two-gpus"],
            "verbs": ["get", "patch"],
        }
    ]
    spec_cm = get(kube, ns, "configmap", "two-gpus-train")
    assert (
        '"output_dir"' in spec_cm["data"]["spec.json"]
        or '"outputDir"' in spec_cm["data"]["spec.json"]
    )


def test_reporting_service_account_can_patch_only_its_own_status(kube: Kube, ns: str) -> None:
    kube.apply(fine_tune("reporter", 0, suspend=True), "-n", ns)
    wait_for("Suspended", phase_is(kube, ns, "ftj", "reporter", "Suspended"))
    sa = f"system:serviceaccount:{ns}:reporter-train"
    can = kube.kubectl(
        "auth",
        "can-i",
        "patch",
        "finetunejobs/reporter",
        "--subresource=status",
        "-n",
        ns,
        "--as",
        sa,
        check=False,
    )
    assert can.stdout.strip() == "yes"
    other = kube.kubectl(
        "auth",
        "can-i",
        "patch",
        "finetunejobs/other",
        "--subresource=status",
        "-n",
        ns,
        "--as",
        sa,
        check=False,
    )
    assert other.stdout.strip() == "no"
    spec = kube.kubectl(
        "auth", "can-i", "patch", "finetunejobs/reporter", "-n", ns, "--as", sa, check=False
    )
    assert spec.stdout.strip() == "no"


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 4), (2, 4)], ids=["1x4", "2x4"])
def test_multi_gpu_training_runs_torchrun_with_one_process_per_gpu(
    kube: Kube, ns: str, nodes: int, gpus: int
) -> None:
    name = f"ddp-{nodes}x{gpus}"
    manifest = fine_tune(name, gpus)
    manifest["spec"]["resources"]["nodes"] = nodes
    if nodes > 1:  # pods on two nodes share the artifacts claim: it must be ReadWriteMany
        kube.apply(artifacts_claim("ReadWriteMany"), "-n", ns)
    kube.apply(manifest, "-n", ns)
    wait_for("Succeeded", phase_is(kube, ns, "ftj", name, "Succeeded"))
    job = get(kube, ns, "job", f"{name}-train")
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[0] == "torchrun" and f"--nproc-per-node={gpus}" in command
    assert f"--nnodes={nodes}" in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert container["image"].endswith("-cuda")  # the CUDA image for GPU pods
    pods = kube.get_json("pods", "-n", ns, "-l", f"job-name={name}-train")["items"]
    placed = sorted(p["spec"]["nodeName"] for p in pods if p["status"]["phase"] == "Succeeded")
    if nodes == 1:
        assert "--standalone" in command and job["spec"]["completionMode"] == "NonIndexed"
        assert placed in (["gpu-b"], ["gpu-c"])
    else:  # one pod per node, rendezvous on index 0 through the headless Service
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
        assert "--node-rank=$(JOB_COMPLETION_INDEX)" in command
        assert f"--master-addr={name}-train-0.{name}-train" in command
        assert get(kube, ns, "service", f"{name}-train")["spec"]["clusterIP"] == "None"
        assert placed == ["gpu-b", "gpu-c"]


def artifacts_claim(mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "tailor-artifacts"},
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}},
    }


def test_a_multi_node_run_on_a_read_write_once_claim_is_refused_with_the_fix(
    kube: Kube, ns: str
) -> None:
    manifest = fine_tune("two-nodes", 1)
    manifest["spec"]["resources"]["nodes"] = 2
    kube.apply(manifest, "-n", ns)  # the operator creates the claim: ReadWriteOnce

    def refused() -> Any:
        status = get(kube, ns, "ftj", "two-nodes").get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return ready if ready.get("reason") == "ReadWriteManyRequired" else None

    ready = wait_for("ReadWriteManyRequired", refused)
    assert get(kube, ns, "ftj", "two-nodes")["status"]["phase"] == "Pending"
    for fix in (
        "ReadWriteMany",
        "artifacts.store=s3",
        "spec.resources.nodes to 1",
        "['ReadWriteOnce']",
    ):
        assert fix in ready["message"], ready["message"]
    assert kube.get_json("jobs", "-n", ns)["items"] == []  # nothing that could never start
    # The fix: a ReadWriteMany claim, then any spec change (or the next resync) starts it.
    kube.kubectl("delete", "pvc", "tailor-artifacts", "-n", ns, "--wait=true", timeout=60)
    kube.apply(artifacts_claim("ReadWriteMany"), "-n", ns)
    kube.kubectl(
        "patch", "ftj", "two-nodes", "-n", ns, "--type=merge",
        "-p", '{"spec":{"training":{"epochs":3}}}',
    )  # fmt: skip
    try:
        wait_for("Succeeded", phase_is(kube, ns, "ftj", "two-nodes", "Succeeded"))
    except AssertionError:
        raise AssertionError(get(kube, ns, "ftj", "two-nodes").get("status")) from None
    assert get(kube, ns, "job", "two-nodes-train")["spec"]["completions"] == 2


def test_a_run_asking_for_the_s3_store_without_a_connection_says_what_to_set(
    kube: Kube, ns: str
) -> None:
    manifest = fine_tune("own-store", 1)
    manifest["spec"]["output"] = {"store": "s3"}
    kube.apply(manifest, "-n", ns)  # this operator has no S3 connection

    def refused() -> Any:
        status = get(kube, ns, "ftj", "own-store").get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return ready if ready.get("reason") == "StoreNotConfigured" else None

    ready = wait_for("StoreNotConfigured", refused)
    for fix in ("spec.output.store", "artifacts.s3.bucket", "Helm"):
        assert fix in ready["message"], ready["message"]
    assert kube.get_json("jobs", "-n", ns)["items"] == []


def test_too_many_gpus_is_queued_with_the_scheduler_reason(kube: Kube, ns: str) -> None:
    kube.apply(fine_tune("eight-gpus", 8), "-n", ns)

    def scheduled() -> dict[str, Any] | None:
        # the scheduler's first reason may be the artifacts claim still binding; the GPU
        # shortage follows once it is bound (the phase stays Queued throughout)
        found = phase_is(kube, ns, "ftj", "eight-gpus", "Queued")()
        conditions = (found or {}).get("status", {}).get("conditions") or []
        condition = next((c for c in conditions if c["type"] == "Scheduled"), {})
        return condition if "Insufficient nvidia.com/gpu" in condition.get("message", "") else None

    condition = wait_for("Queued for want of GPUs", scheduled, timeout=120)
    assert condition["reason"] == "Unschedulable"

    def queued_event() -> bool:
        # one Event per phase change, posted right after the status patch (it can land
        # later), with the scheduler's words of that moment
        events = kube.get_json(
            "events", "-n", ns, "--field-selector", "involvedObject.name=eight-gpus"
        )
        return any(
            e["reason"] == "Unschedulable" and "nodes are available" in e["message"]
            for e in events["items"]
        )

    wait_for("an Unschedulable event with the scheduler's message", queued_event, timeout=30)


def test_a_queue_on_a_cluster_without_kueue_is_refused_with_the_fix(kube: Kube, ns: str) -> None:
    kube.apply(fine_tune("queued", 1, queueName="gpus"), "-n", ns)
    ftj = wait_for("Pending", phase_is(kube, ns, "ftj", "queued", "Pending"))
    ready = next(c for c in ftj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "KueueNotInstalled", ready
    assert "spec.queueName" in ready["message"] and "install Kueue" in ready["message"]
    # a WorkloadPriorityClass without a queue orders nothing: refused, naming the field
    kube.apply(fine_tune("ranked", 1, priorityClassName="high"), "-n", ns)
    ftj = wait_for("Failed", phase_is(kube, ns, "ftj", "ranked", "Failed"))
    ready = next(c for c in ftj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.priorityClassName" in ready["message"]
    assert kube.get_json("jobs", "-n", ns)["items"] == []


def test_suspend_then_resume(kube: Kube, ns: str) -> None:
    kube.apply(fine_tune("pausable", 1, suspend=True), "-n", ns)
    wait_for("Suspended", phase_is(kube, ns, "ftj", "pausable", "Suspended"))
    assert get(kube, ns, "job", "pausable-train")["spec"]["suspend"] is True
    assert kube.get_json("pods", "-n", ns, "-l", "job-name=pausable-train")["items"] == []
    kube.kubectl(
        "patch", "ftj", "pausable", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    wait_for("Succeeded", phase_is(kube, ns, "ftj", "pausable", "Succeeded"))
    assert get(kube, ns, "job", "pausable-train")["spec"]["suspend"] is False


def test_a_spec_change_after_the_job_exists_is_reported_not_ignored(kube: Kube, ns: str) -> None:
    def spec_applied() -> dict[str, Any]:
        conditions = (get(kube, ns, "ftj", "changed").get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "SpecApplied"), {})

    kube.apply(fine_tune("changed", 1, suspend=True), "-n", ns)
    wait_for("Suspended", phase_is(kube, ns, "ftj", "changed", "Suspended"))
    assert spec_applied()["status"] == "True"
    template = get(kube, ns, "job", "changed-train")["spec"]["template"]
    kube.kubectl(  # suspend is the one field a running Job takes
        "patch", "ftj", "changed", "-n", ns, "--type=merge",
        "-p", '{"spec":{"training":{"learningRate":0.5}}}',
    )  # fmt: skip
    condition = wait_for(
        "SpecApplied=False", lambda: spec_applied().get("status") == "False" and spec_applied()
    )
    assert condition["reason"] == "JobImmutable"
    assert "delete and re-create the FineTuneJob" in condition["message"]
    assert get(kube, ns, "job", "changed-train")["spec"]["template"] == template


def test_deleting_a_parent_removes_its_children(kube: Kube, ns: str) -> None:
    kube.apply(fine_tune("doomed", 0, suspend=True), "-n", ns)
    wait_for(
        "job",
        lambda: kube.kubectl("get", "job", "doomed-train", "-n", ns, check=False).returncode == 0,
    )
    kube.kubectl("delete", "ftj", "doomed", "-n", ns, "--wait=true")

    def gone() -> bool:
        left = [
            kube.kubectl("get", kind, "doomed-train", "-n", ns, check=False).returncode
            for kind in ("job", "configmap", "serviceaccount", "role", "rolebinding")
        ]
        return all(code != 0 for code in left)

    wait_for("children garbage-collected", gone, timeout=60)


def ungated_profile() -> dict[str, Any]:
    """The example profile without its gate: kwok completes the test Job's pod without
    running it, so no revision would ever pass (the gate itself: tests/e2e/test_prompt_flow)."""
    pp = example("promptprofile")
    pp["spec"]["tests"]["gate"] = False
    return pp


def test_model_deployment_waits_for_its_adapter_then_rolls_on_prompt_change(
    kube: Kube, ns: str
) -> None:
    kube.apply(ungated_profile(), "-n", ns)
    kube.apply(example("knowledgebase"), "-n", ns)
    kube.apply(fine_tune("torchhub-lora", 0, suspend=True), "-n", ns)
    kube.apply(example("modeldeployment", autoscaling=None), "-n", ns)

    def waiting_on_adapter() -> Any:
        md = get(kube, ns, "md", "api-assistant")
        conds = {c["type"]: c for c in (md.get("status") or {}).get("conditions", [])}
        refs = conds.get("ReferencesReady")
        return md if refs and "FineTuneJob torchhub-lora" in refs["message"] else None

    md = wait_for("waiting condition", waiting_on_adapter)
    assert md["status"]["phase"] == "Pending"
    assert kube.kubectl("get", "deploy", "api-assistant", "-n", ns, check=False).returncode != 0

    kube.kubectl(
        "patch",
        "ftj",
        "torchhub-lora",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec":{"suspend":false}}',
    )
    md = wait_for("Ready", phase_is(kube, ns, "md", "api-assistant", "Ready"), timeout=120)
    assert md["status"]["models"] == ["api-assistant", "api-assistant/torchhub"]
    assert md["status"]["endpoint"] == f"http://api-assistant.{ns}.svc:8000/v1"
    deployment = get(kube, ns, "deploy", "api-assistant")
    first = deployment["spec"]["template"]["metadata"]["annotations"]["tailor.dev/revision"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["prompt"]["configMap"]["name"] == "api-assistant-r1"
    mounts = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert next(m for m in mounts if m["name"] == "artifacts")["readOnly"] is True

    # The tests ran as a Job on the ready deployment; a Job that reports nothing (kwok
    # never runs it) is not a pass, and the ungated revision is served anyway.
    def tested() -> Any:
        tests = next(
            (c for c in get(kube, ns, "pp", "api-assistant")["status"]["conditions"]
             if c["type"] == "TestsPassed"), {},
        )  # fmt: skip
        return tests if tests.get("reason") == "TestsMissing" else None

    assert wait_for("the test Job's verdict", tested)["status"] == "False"
    jobs = kube.get_json("jobs", "-n", ns, "-l", "tailor.dev/promptprofile=api-assistant")
    assert [j["metadata"]["name"][: len("api-assistant-test-r1-")] for j in jobs["items"]] == [
        "api-assistant-test-r1-"
    ]
    served = get(kube, ns, "pp", "api-assistant")["status"]["served"]
    assert served == {"revision": 1, "configMap": "api-assistant-r1", "reason": "Newest"}

    # An added adapter goes to the running pods through their spec ConfigMap: the pod
    # template (its revision) stays, so nothing rolls. kwok's pods run no server, so no
    # replica reports it and AdaptersLoaded stays False.
    with_two = example("modeldeployment", autoscaling=None)
    with_two["spec"]["adapters"].append(
        {"name": "torchhub-v2", "fineTuneJobRef": {"name": "torchhub-lora"}}
    )
    kube.apply(with_two, "-n", ns)

    def handed_over() -> Any:
        run = json.loads(get(kube, ns, "configmap", "api-assistant-serve")["data"]["spec.json"])
        status = get(kube, ns, "md", "api-assistant")["status"]
        names = [a["name"] for a in run["adapters"]]
        current = status.get("adaptersRevision") == run["adaptersRevision"]
        return status if names == ["torchhub", "torchhub-v2"] and current else None

    status = wait_for("the adapter handed to the pods", handed_over)
    assert status["revision"] == first and status["phase"] == "Ready"
    assert status["models"] == [
        "api-assistant",
        "api-assistant/torchhub",
        "api-assistant/torchhub-v2",
    ]
    loaded = next(c for c in status["conditions"] if c["type"] == "AdaptersLoaded")
    assert loaded["status"] == "False", loaded
    annotations = get(kube, ns, "deploy", "api-assistant")["spec"]["template"]["metadata"]
    assert annotations["annotations"]["tailor.dev/revision"] == first

    pp = ungated_profile()
    pp["spec"]["system"] += " Never invent repositories."
    kube.apply(pp, "-n", ns)

    def rolled() -> Any:
        d = get(kube, ns, "deploy", "api-assistant")
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        return d if annotations["tailor.dev/revision"] != first else None

    deployment = wait_for("a new revision", rolled)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["prompt"]["configMap"]["name"] == "api-assistant-r2"
    pp_status = get(kube, ns, "pp", "api-assistant")["status"]
    assert [h["revision"] for h in pp_status["history"]] == [2, 1]
    assert get(kube, ns, "configmap", "api-assistant-r1")["immutable"] is True
    wait_for("Ready again", phase_is(kube, ns, "md", "api-assistant", "Ready"))


def test_zero_replicas_is_an_idle_state_and_scaling_up_serves(kube: Kube, ns: str) -> None:
    """``replicas: 0`` is valid: the Deployment scales to zero and the phase is Idle (not
    Progressing forever); scaling up makes it Ready."""
    md = bare_deployment(replicas=0, adapters=[])
    kube.apply(md, "-n", ns)
    idle = wait_for("Idle", phase_is(kube, ns, "md", "api-assistant", "Idle"))
    ready = next(c for c in idle["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ScaledToZero"
    assert "spec.replicas" in ready["message"]
    assert get(kube, ns, "deploy", "api-assistant")["spec"]["replicas"] == 0
    kube.kubectl("patch", "md", "api-assistant", "-n", ns, "--type=merge",
                 "-p", '{"spec":{"replicas":1}}')  # fmt: skip
    wait_for("Ready", phase_is(kube, ns, "md", "api-assistant", "Ready"), timeout=120)


def test_prompt_tests_naming_a_missing_deployment_say_which_field(kube: Kube, ns: str) -> None:
    pp = example("promptprofile")
    pp["spec"]["tests"]["deploymentRef"] = {"name": "no-such-deployment"}
    kube.apply(pp, "-n", ns)

    def verdict() -> Any:
        status = get(kube, ns, "pp", "api-assistant").get("status") or {}
        tests = next((c for c in status.get("conditions") or [] if c["type"] == "TestsPassed"), {})
        return tests if tests.get("reason") == "DeploymentNotFound" else None

    tests = wait_for("DeploymentNotFound", verdict)
    assert tests["status"] == "False"
    assert tests["message"].startswith("spec.tests.deploymentRef.name: ModelDeployment no-such")
    status = get(kube, ns, "pp", "api-assistant")["status"]
    assert status["phase"] == "Valid" and "served" not in status  # gated: nothing passed
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NoRevisionPassed"


def test_a_few_shot_pool_from_a_config_map_is_published_and_follows_the_config_map(
    kube: Kube, ns: str
) -> None:
    """poolFrom: a missing ConfigMap is named (Invalid, InvalidPool); once it exists the
    examples are published inside the revision; editing the ConfigMap publishes a new
    revision at the next sync (``tailor prompt refresh``, or the periodic resync)."""
    import json

    pp = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "PromptProfile",
        "metadata": {"name": "pooled"},
        "spec": {
            "system": "Answer with one Torch Hub call.",
            "fewShotSelection": {"k": 1, "poolFrom": {"name": "examples", "key": "pool.jsonl"}},
        },
    }
    kube.apply(pp, "-n", ns)
    invalid = wait_for("Invalid", phase_is(kube, ns, "pp", "pooled", "Invalid"))
    ready = next(c for c in invalid["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidPool"
    assert ready["message"].startswith("spec.fewShotSelection.poolFrom.name: ConfigMap examples")

    def pool_cm(assistant: str) -> dict[str, Any]:
        line = json.dumps({"user": "Classify a photo.", "assistant": assistant})
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "examples"},
                "data": {"pool.jsonl": line + "\n"}}  # fmt: skip

    def published(revision: int) -> Callable[[], Any]:
        def check() -> Any:
            status = get(kube, ns, "pp", "pooled").get("status") or {}
            return status if status.get("revision") == revision else None

        return check

    def touch(value: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "tailor.cli", "prompt", "refresh", "pooled", "-n", ns],
            env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "reconcile requested" in result.stdout

    kube.apply(pool_cm("resnet50"), "-n", ns)
    touch("1")
    status = wait_for("revision 1", published(1))
    assert status["phase"] == "Valid"
    cm = get(kube, ns, "cm", status["configMap"])
    selection = json.loads(cm["data"]["profile.json"])["fewShotSelection"]
    assert selection["pool"] == [{"user": "Classify a photo.", "assistant": "resnet50"}]

    kube.apply(pool_cm("resnet18"), "-n", ns)
    touch("2")
    status = wait_for("revision 2", published(2))
    cm = get(kube, ns, "cm", status["configMap"])
    assert "resnet18" in cm["data"]["profile.json"]
    touch("3")  # the same pool: no new revision, the request handled
    requested = get(kube, ns, "pp", "pooled")["metadata"]["annotations"]
    stamp = requested["tailor.dev/reconcile-requested-at"]
    handled = wait_for("refresh handled", lambda: (
        s if (s := get(kube, ns, "pp", "pooled")["status"]).get("lastHandledReconcileAt") == stamp
        else None))  # fmt: skip
    assert handled["revision"] == 2


def test_an_invalid_response_schema_marks_the_profile_invalid_naming_it(
    kube: Kube, ns: str
) -> None:
    pp = example("promptprofile")
    pp["spec"]["responseFormat"]["schema"] = {"type": "objekt"}
    kube.apply(pp, "-n", ns)  # the API server keeps schemas as free-form objects
    pp_obj = wait_for("Invalid", phase_is(kube, ns, "pp", "api-assistant", "Invalid"))
    ready = next(c for c in pp_obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["message"].startswith("spec.responseFormat.schema: "), ready["message"]
    assert "not a valid JSON Schema" in ready["message"]


def test_invalid_template_marks_the_profile_invalid(kube: Kube, ns: str) -> None:
    pp = example("promptprofile")
    pp["spec"]["template"] = "{{ question "
    kube.apply(pp, "-n", ns)
    pp_obj = wait_for("Invalid", phase_is(kube, ns, "pp", "api-assistant", "Invalid"))
    ready = next(c for c in pp_obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["message"].startswith("spec.template: line 1:")


def test_knowledge_base_builds_and_rebuilds_on_spec_change(kube: Kube, ns: str) -> None:
    kube.apply(example("knowledgebase"), "-n", ns)
    kb = wait_for("Ready", phase_is(kube, ns, "kb", "torchhub-docs", "Ready"))
    assert kb["status"]["build"] == 1 and kb["status"]["readyBuild"] == 1
    assert kb["status"]["nextRefresh"]
    kb_changed = example("knowledgebase")
    kb_changed["spec"]["retrieval"]["topK"] = 8
    kube.apply(kb_changed, "-n", ns)
    kb = wait_for(
        "build 2",
        lambda: (s := get(kube, ns, "kb", "torchhub-docs")["status"]).get("readyBuild") == 2 and s,
    )
    assert (
        kube.kubectl("get", "job", "torchhub-docs-index-2", "-n", ns, check=False).returncode == 0
    )


def test_raft_job_walks_through_its_stages(kube: Kube, ns: str) -> None:
    kube.apply(example("knowledgebase"), "-n", ns)
    raft = example("raftjob")
    raft["spec"]["fineTune"]["resources"] = {"gpus": 1}
    kube.apply(raft, "-n", ns)
    stages: list[str] = []

    def done() -> Any:
        obj = get(kube, ns, "raft", "torchhub-raft")
        stage = (obj.get("status") or {}).get("stage")
        if stage and (not stages or stages[-1] != stage):
            stages.append(stage)
        return obj if stage in ("Succeeded", "Failed") else None

    raft_obj = wait_for("RAFT done", done, timeout=180, interval=0.2)
    assert raft_obj["status"]["phase"] == "Succeeded", raft_obj["status"]
    assert stages[-1] == "Succeeded"
    assert "Training" in stages and "Evaluating" in stages
    assert raft_obj["status"]["fineTuneJob"] == "torchhub-raft-ft"
    child = get(kube, ns, "ftj", "torchhub-raft-ft")
    assert child["metadata"]["ownerReferences"][0]["kind"] == "RAFTJob"
    assert child["spec"]["dataset"]["train"]["pvc"]["glob"] == "train.jsonl"
    assert raft_obj["status"]["artifact"]["uri"] == child["status"]["artifact"]["uri"]


def test_restart_mid_reconcile_creates_no_duplicates(
    kube: Kube, ns: str, operator_process: OperatorProcess
) -> None:
    names = [f"burst-{i}" for i in range(12)]
    kube.apply([fine_tune(n, 0) for n in names], "-n", ns)
    time.sleep(0.5)
    operator_process.kill()  # somewhere in the middle of reconciling the burst
    operator_process.start()
    for name in names:
        wait_for(f"{name} Succeeded", phase_is(kube, ns, "ftj", name, "Succeeded"), timeout=120)
    jobs = kube.get_json("jobs", "-n", ns)["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"{n}-train" for n in names)
    for kind in ("configmaps", "serviceaccounts", "roles"):
        items = kube.get_json(kind, "-n", ns, "-l", "app.kubernetes.io/managed-by=tailor")["items"]
        assert len(items) == len(names), kind
    pods = kube.get_json("pods", "-n", ns)["items"]
    assert len(pods) == len(names)


def test_a_run_whose_status_was_lost_after_its_job_finished_is_not_left_pending(
    kube: Kube, ns: str, operator_process: OperatorProcess
) -> None:
    """The state a leader killed between creating the training Job and writing the run's
    status leaves behind (seen under load after failovers): a run without ``jobName``
    whose Job has already finished. Its last Job and pod events came before the new
    leader's sync, so that sync must read the Job it applies instead of writing Pending
    and waiting for events that will not come (until the 5-minute resync)."""
    kube.apply(fine_tune("orphaned", 0), "-n", ns)
    wait_for("Succeeded", phase_is(kube, ns, "ftj", "orphaned", "Succeeded"))
    kube.kubectl("patch", "ftj", "orphaned", "-n", ns, "--subresource=status",
                 "--type=merge", "-p", json.dumps({"status": None}))  # fmt: skip
    ftj = wait_for(
        "Succeeded again", phase_is(kube, ns, "ftj", "orphaned", "Succeeded"), timeout=30
    )
    assert ftj["status"]["jobName"] == "orphaned-train"
    assert ftj["status"]["artifact"]["uri"].startswith("pvc://tailor-artifacts/finetunejob/")


def test_operator_metrics(kube: Kube, ns: str, operator_process: OperatorProcess) -> None:
    kube.apply(fine_tune("measured", 0), "-n", ns)
    wait_for("Succeeded", phase_is(kube, ns, "ftj", "measured", "Succeeded"))
    text = wait_for("metrics", operator_process.metrics)
    assert 'tailor_operator_reconciliations_total{kind="FineTuneJob",result="ok"}' in text
    assert "tailor_operator_reconcile_duration_seconds_bucket" in text
    assert 'tailor_operator_resources{kind="FineTuneJob",phase="Succeeded"}' in text
    assert 'tailor_operator_phase_transitions_total{kind="FineTuneJob",phase="Succeeded"}' in text


def test_bad_spec_is_rejected_before_the_operator_sees_it(kube: Kube, ns: str) -> None:
    manifest = copy.deepcopy(fine_tune("bad", 0))
    manifest["spec"]["lora"]["r"] = 0
    result = kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0
    assert "spec.lora.r" in result.stderr


def retries(op: OperatorProcess, kind: str) -> float:
    for line in op.metrics().splitlines():
        if line.startswith(f'tailor_operator_workqueue_retries_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_status_write_refused_on_job_completion_is_retried_until_it_lands(
    kube: Kube, ns: str, operator_process: OperatorProcess
) -> None:
    """The API server itself refuses the write of phase Succeeded (a ValidatingAdmission
    Policy, CEL) while the training Job completes. kopf never retries event handlers and
    nothing else touches the FineTuneJob afterwards: only the work queue's retries can
    bring it to Succeeded once the policy is gone."""
    policy = f"refuse-success-{ns}"
    kube.apply(refuse_success(policy, ns, "injected failure: phase Succeeded refused"))
    try:
        time.sleep(2)  # the API server's policy informer picks it up
        wait_for("the operator's metrics", lambda: _serving(operator_process))
        before = retries(operator_process, "FineTuneJob")
        kube.apply(fine_tune("refused", 0), "-n", ns)

        def job_complete() -> bool:
            job = kube.get_json("job", "refused-train", "-n", ns) if _exists(kube, ns) else {}
            conds = (job.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Complete" and c["status"] == "True" for c in conds)

        wait_for("the Job to complete", job_complete)
        wait_for("a refused write and its retry",
                 lambda: retries(operator_process, "FineTuneJob") >= before + 2)  # fmt: skip
        assert get(kube, ns, "ftj", "refused")["status"]["phase"] != "Succeeded"
    finally:
        kube.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                     policy, "--ignore-not-found")  # fmt: skip
    wait_for("Succeeded after the retries", phase_is(kube, ns, "ftj", "refused", "Succeeded"))


def _exists(kube: Kube, ns: str) -> bool:
    names = kube.kubectl("get", "jobs", "-n", ns, "-o", "name").stdout.split()
    return "job.batch/refused-train" in names


def _serving(op: OperatorProcess) -> bool:
    try:
        return bool(op.metrics())
    except OSError:
        return False
