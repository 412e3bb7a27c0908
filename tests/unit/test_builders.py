"""Builders are pure: the same resource and settings give the same children. These tests
pin the Kubernetes details users rely on (GPUs, placement, failure policy, security,
volumes, RBAC scope, rollouts) without a cluster."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor.api import parse
from tailor.api.finetunejob import FineTuneJobSpec
from tailor.api.knowledgebase import KnowledgeBaseSpec
from tailor.api.modeldeployment import Adapter, ModelDeploymentSpec
from tailor.api.promptprofile import PromptProfileSpec
from tailor.api.raftjob import RAFTJobSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import TrainRun
from tailor.builders.common import Parent, Program, child_name
from tailor.builders.finetunejob import build_training
from tailor.builders.knowledgebase import build_index, retriever_config
from tailor.builders.modeldeployment import ResolvedRefs, build_serving, uri_to_path
from tailor.builders.promptprofile import build_revision, profile_hash, template_errors
from tailor.builders.raftjob import build_child_fine_tune, build_eval_deployment
from tailor.runtime.base import run_state_from_job

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = OperatorSettings()


def spec_of(kind: str, **changes: Any) -> Any:
    manifest = yaml.safe_load((ROOT / f"docs/examples/{kind}.yaml").read_text())
    manifest["spec"].update(changes)
    return parse(manifest)


def parent(kind: str, name: str = "x") -> Parent:
    return Parent(kind=kind, name=name, namespace="ns", uid="uid-1", generation=1)


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in manifests}


def test_training_job_requests_gpus_and_placement() -> None:
    spec: FineTuneJobSpec = spec_of("finetunejob")
    workload = build_training(spec, parent("FineTuneJob", "torchhub-lora"), SETTINGS)
    job = by_kind(workload.manifests)["Job"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["spec"]["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
    }
    assert container["command"][-2:] == ["--spec", "/etc/tailor/spec/spec.json"]
    assert pod["serviceAccountName"] == "torchhub-lora-train"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/tailor/configmaps/torchhub-chat"]["readOnly"] is True


def test_training_pod_is_non_root_and_read_only() -> None:
    workload = build_training(spec_of("finetunejob"), parent("FineTuneJob"), SETTINGS)
    pod = by_kind(workload.manifests)["Job"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = pod["containers"][0]["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_train_spec_file_round_trips() -> None:
    workload = build_training(spec_of("finetunejob"), parent("FineTuneJob", "a"), SETTINGS)
    cm = by_kind(workload.manifests)["ConfigMap"]
    run = TrainRun.model_validate_json(cm["data"]["spec.json"])
    assert run.owner.name == "a" and run.reporter.kind == "kubernetes"
    assert run.output_dir == "/artifacts/finetunejob/a/uid-1/model"
    assert run.checkpoint_dir == "/artifacts/finetunejob/a/uid-1/checkpoints"


def test_multi_node_training_is_an_indexed_job_with_a_headless_service() -> None:
    spec = spec_of("finetunejob")
    spec.resources.nodes = 3
    spec.resources.gpus = 8
    workload = build_training(spec, parent("FineTuneJob", "big"), SETTINGS)
    kinds = by_kind(workload.manifests)
    job = kinds["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 3
    assert job["template"]["spec"]["subdomain"] == "big-train"
    service = kinds["Service"]["spec"]
    assert service["clusterIP"] == "None" and service["selector"] == {"job-name": "big-train"}
    command = job["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "torchrun" and "--nproc-per-node=8" in command
    assert "--master-addr=big-train-0.big-train" in command


def test_a_queued_run_is_a_suspended_job_with_kueue_labels_and_the_default_queue_applies() -> None:
    spec = spec_of("finetunejob", queueName="team-a", priorityClassName="urgent")
    job = by_kind(build_training(spec, parent("FineTuneJob"), SETTINGS).manifests)["Job"]
    assert job["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "urgent"

    plain = by_kind(build_training(spec_of("finetunejob"), parent("FineTuneJob"), SETTINGS).manifests)["Job"]  # fmt: skip
    assert plain["spec"]["suspend"] is False
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])

    defaulted = SETTINGS.model_copy(update={"default_queue_name": "shared"})
    job = by_kind(build_training(spec_of("finetunejob"), parent("FineTuneJob"), defaulted).manifests)["Job"]  # fmt: skip
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "shared"
    assert job["spec"]["suspend"] is True
    own = spec_of("finetunejob", queueName="team-a")
    job = by_kind(build_training(own, parent("FineTuneJob"), defaulted).manifests)["Job"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_a_raft_job_queues_its_training_stage() -> None:
    spec = spec_of("raftjob", queueName="team-a", priorityClassName="low")
    child = build_child_fine_tune(spec, parent("RAFTJob"), SETTINGS)
    assert child["spec"]["queueName"] == "team-a"
    assert child["spec"]["priorityClassName"] == "low"


def test_operator_pod_annotations_reach_every_workload_pod_from_the_environment() -> None:
    from tailor.runtime.kubernetes import with_pod_annotations

    settings = OperatorSettings.from_env(
        {"TAILOR_POD_ANNOTATIONS": '{"sidecar.istio.io/inject": "false"}'}
    )
    job = by_kind(build_training(spec_of("finetunejob"), parent("FineTuneJob"), settings).manifests)["Job"]  # fmt: skip
    annotated = with_pod_annotations(job, settings.pod_annotations)
    assert annotated["spec"]["template"]["metadata"]["annotations"] == {
        "sidecar.istio.io/inject": "false"
    }
    assert "annotations" not in job["spec"]["template"]["metadata"]  # the builder's is unchanged


def test_one_node_with_several_gpus_runs_torchrun_standalone_in_the_cuda_image() -> None:
    spec = spec_of("finetunejob")
    spec.resources.gpus = 4
    settings = SETTINGS.model_copy(update={"gpu_image": "workloads:1-cuda"})
    workload = build_training(spec, parent("FineTuneJob", "four"), settings)
    kinds = by_kind(workload.manifests)
    job = kinds["Job"]["spec"]
    assert "Service" not in kinds and "completionMode" not in job
    container = job["template"]["spec"]["containers"][0]
    assert container["command"][:4] == [
        "torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4"
    ]  # fmt: skip
    assert container["image"] == "workloads:1-cuda"


@pytest.mark.parametrize("gpus", [0, 1])
def test_one_process_runs_the_trainer_directly(gpus: int) -> None:
    spec = spec_of("finetunejob")
    spec.resources.gpus = gpus
    settings = SETTINGS.model_copy(update={"gpu_image": "workloads:1-cuda"})
    workload = build_training(spec, parent("FineTuneJob", "one"), settings)
    container = by_kind(workload.manifests)["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "tailor.workloads.training.trainer"]
    assert container["image"] == ("workloads:1-cuda" if gpus else SETTINGS.image)


def test_reporter_role_names_only_its_resource() -> None:
    workload = build_training(spec_of("finetunejob"), parent("FineTuneJob", "one"), SETTINGS)
    role = by_kind(workload.manifests)["Role"]
    assert role["rules"] == [
        {
            "apiGroups": ["tailor.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["one"],
            "verbs": ["get", "patch"],
        }
    ]


def test_children_are_deterministic_and_owned() -> None:
    a = build_training(spec_of("finetunejob"), parent("FineTuneJob"), SETTINGS).manifests
    b = build_training(spec_of("finetunejob"), parent("FineTuneJob"), SETTINGS).manifests
    assert a == b
    for manifest in a:
        owner = manifest["metadata"]["ownerReferences"][0]
        assert owner["uid"] == "uid-1" and owner["controller"] is True
        assert manifest["metadata"]["labels"]["tailor.dev/finetunejob"] == "x"


def test_long_names_are_shortened_stably() -> None:
    long = parent("FineTuneJob", "a" * 70)
    name = child_name(long, "train")
    assert len(name) <= 63 and name.endswith("-train") and name == child_name(long, "train")


def test_index_job_uses_embedded_qdrant_on_the_artifacts_volume() -> None:
    spec: KnowledgeBaseSpec = spec_of("knowledgebase")
    workload = build_index(spec, parent("KnowledgeBase", "docs"), SETTINGS, build=3)
    assert workload.name == "docs-index-3"
    assert workload.run.target.alias == "ns_docs"
    assert workload.run.target.path == "/artifacts/knowledgebase/docs/uid-1/qdrant"
    config = retriever_config(spec, parent("KnowledgeBase", "docs"), SETTINGS)
    assert config == workload.run.target


def test_adaptation_mounts_its_questions_and_keeps_tuned_models_on_the_claim() -> None:
    server = {"qdrant": {"url": "https://qdrant.example.com"}}
    questions = {"configMap": {"name": "past-questions", "key": "pairs.jsonl"}}
    p = parent("KnowledgeBase", "docs")
    plain = build_index(spec_of("knowledgebase", store=server), p, SETTINGS, build=1)
    assert plain.run.target.embedders is None and not plain.run.target.on_claim
    spec = spec_of("knowledgebase", store=server, adaptation={"questions": questions})
    workload = build_index(spec, p, SETTINGS, build=1)
    # vectors on the server, the tuned embedder on the claim beside the build's other files
    assert workload.run.target.path is None
    assert workload.run.target.embedders == "/artifacts/knowledgebase/docs/uid-1/embedders"
    pod = by_kind(workload.manifests)["Job"]["spec"]["template"]["spec"]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert SETTINGS.artifacts_pvc in claims
    assert any(v.get("configMap", {}).get("name") == "past-questions" for v in pod["volumes"])
    # a deployment that reads this knowledge base mounts the claim to load the tuned model
    refs = ResolvedRefs(knowledge_base=retriever_config(spec, p, SETTINGS))
    serving = by_kind(
        build_serving(
            spec_of("modeldeployment"), parent("ModelDeployment"), SETTINGS, refs
        ).manifests
    )
    serving_pod = serving["Deployment"]["spec"]["template"]["spec"]
    assert any(
        v.get("persistentVolumeClaim", {}).get("claimName") == SETTINGS.artifacts_pvc
        for v in serving_pod["volumes"]
    )


def test_serving_rolls_when_any_reference_changes() -> None:
    spec: ModelDeploymentSpec = spec_of("modeldeployment")
    p = parent("ModelDeployment", "md")
    refs = ResolvedRefs(
        adapters=[("torchhub", "pvc://tailor-artifacts/finetunejob/t/u/model")],
        prompt_config_map="pp-r1",
    )
    one = build_serving(spec, p, SETTINGS, refs)
    refs2 = ResolvedRefs(adapters=refs.adapters, prompt_config_map="pp-r2")
    two = build_serving(spec, p, SETTINGS, refs2)
    assert one.revision != two.revision
    deployment = by_kind(two.manifests)["Deployment"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["tailor.dev/revision"] == two.revision
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    hpa = by_kind(two.manifests)["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    assert one.run.adapters[0].path == "/artifacts/finetunejob/t/u/model"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_adapters_change_the_spec_file_not_the_pods() -> None:
    """A changed adapter list rewrites the spec ConfigMap (the replicas load it in place)
    and keeps the revision; an adapter on a claim the pods do not mount yet, or vLLM's
    first adapter (LoRA is a start flag of vLLM), changes the pod and so the revision."""
    p = parent("ModelDeployment", "md")
    ftj = "pvc://tailor-artifacts/finetunejob/t/u/model"
    spec = spec_of("modeldeployment")

    def build(spec: ModelDeploymentSpec, *adapters: tuple[str, str]) -> Any:
        wanted = spec.model_copy(update={"adapters": [
            Adapter(name=n, fineTuneJobRef={"name": n}) for n, _ in adapters]})  # fmt: skip
        return build_serving(wanted, p, SETTINGS, ResolvedRefs(adapters=list(adapters)))

    one = build(spec, ("a", ftj))
    two = build(spec, ("a", ftj), ("b", ftj.replace("/u/", "/v/")))
    assert one.revision == two.revision
    assert one.run.adapters_revision != two.run.adapters_revision
    run = json.loads(by_kind(two.manifests)["ConfigMap"]["data"]["spec.json"])
    assert [a["name"] for a in run["adapters"]] == ["a", "b"]
    assert run["adaptersRevision"] == two.run.adapters_revision
    other_claim = build(spec, ("a", ftj), ("c", "pvc://team-models/lora/c"))
    assert other_claim.revision != one.revision  # the pod mounts team-models now
    assert build(spec).revision == build(spec, ("a", ftj)).revision  # builtin: no flag

    vllm = spec_of("modeldeployment", engine="vllm", resources={"gpus": 1},
                   baseModel={"huggingface": {"repo": "org/model"}})  # fmt: skip
    none, first, second = build(vllm), build(vllm, ("a", ftj)), build(vllm, ("a", ftj), ("b", ftj))
    assert none.revision != first.revision == second.revision


def test_engine_vllm_runs_a_vllm_sidecar_behind_the_gateway() -> None:
    spec = spec_of(
        "modeldeployment",
        engine="vllm",
        baseModel={"huggingface": {"repo": "org/model", "revision": "abc",
                                   "tokenSecretRef": {"name": "hf", "key": "token"}}},
        resources={"gpus": 4, "cpu": "16", "memory": "64Gi"},
        quantization="nf4",
        maxContextTokens=8192,
    )  # fmt: skip
    refs = ResolvedRefs(adapters=[("torchhub", "pvc://tailor-artifacts/finetunejob/t/u/model")])
    workload = build_serving(spec, parent("ModelDeployment", "chat"), SETTINGS, refs)
    kinds = by_kind(workload.manifests)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    gateway, vllm = pod["containers"]
    assert vllm["image"].startswith("docker.io/vllm/vllm-openai:v")
    args = vllm["args"]
    assert args[:2] == ["serve", "org/model"] and args[args.index("--revision") + 1] == "abc"
    for flag, value in (("--tensor-parallel-size", "4"), ("--quantization", "bitsandbytes"),
                        ("--max-model-len", "8192"), ("--host", "127.0.0.1"),
                        ("--served-model-name", "chat"), ("--max-loras", "8")):  # fmt: skip
        assert args[args.index(flag) + 1] == value, flag
    assert "--enable-prefix-caching" in args and "--enable-lora" in args
    # the GPUs are vLLM's; the gateway only tokenizes, retrieves and proxies
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "nvidia.com/gpu" not in gateway["resources"]["limits"]
    env = {e["name"]: e for e in vllm["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert vllm["securityContext"]["readOnlyRootFilesystem"] is True
    assert vllm["startupProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in vllm["volumeMounts"]
    run = json.loads(kinds["ConfigMap"]["data"]["spec.json"])
    assert run["upstream"] == {
        "url": "http://127.0.0.1:8001",
        "model": "chat",
        "startupSeconds": 1800.0,
        "timeoutSeconds": 600.0,
        "loadAdapters": True,
        "maxInflight": 16 + 256,
    }  # fmt: skip (maxBatchSize + maxQueue)
    assert run["metricsPort"] == 9090  # /metrics on its own port, with vLLM's re-exported
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": 8000, "metrics": 9090}
    # int8 is fp8 in vLLM; auto picks vLLM only for GPUs and a model vLLM can load
    int8 = spec.model_copy(update={"quantization": "int8"})
    vllm_args = by_kind(build_serving(int8, parent("ModelDeployment"), SETTINGS, ResolvedRefs()).manifests)["Deployment"]["spec"]["template"]["spec"]["containers"][1]["args"]  # fmt: skip
    assert vllm_args[vllm_args.index("--quantization") + 1] == "fp8"
    assert spec.model_copy(update={"engine": "auto"}).resolved_engine() == "vllm"
    # on CPU: llama.cpp for a GGUF model (the builtin one), else the builtin engine
    assert spec_of("modeldeployment").resolved_engine() == "llamacpp"
    folder = spec.model_copy(update={"engine": "auto", "quantization": "none",
                                     "resources": spec.resources.model_copy(update={"gpus": 0})})  # fmt: skip
    assert folder.resolved_engine() == "builtin"
    builtin = build_serving(spec_of("modeldeployment"), parent("ModelDeployment"), SETTINGS, ResolvedRefs())  # fmt: skip
    assert len(by_kind(builtin.manifests)["Deployment"]["spec"]["template"]["spec"]["containers"]) == 1  # fmt: skip


def test_uri_to_path_for_foreign_volumes() -> None:
    assert uri_to_path("pvc://models/adapters/x", SETTINGS, "ns") == (
        "/mnt/pvc/models/adapters/x",
        "models",
    )
    with pytest.raises(ValueError):
        uri_to_path("s3://bucket/x", SETTINGS, "ns")


def test_prompt_revision_is_immutable_and_content_addressed() -> None:
    spec: PromptProfileSpec = spec_of("promptprofile")
    cm = build_revision(spec, parent("PromptProfile", "pp"), 4)
    assert cm["metadata"]["name"] == "pp-r4" and cm["immutable"] is True
    assert cm["metadata"]["annotations"]["tailor.dev/hash"] == profile_hash(spec)
    changed = spec.model_copy(update={"system": "other"})
    assert profile_hash(changed) != profile_hash(spec)
    # tests and the pin are not part of a revision: editing them publishes nothing
    assert spec.tests is not None
    retested = spec.model_copy(update={"revision_pin": 1, "tests": spec.tests.model_copy(update={"gate": True})})  # fmt: skip
    assert profile_hash(retested) == profile_hash(spec)
    assert "tests" not in json.loads(cm["data"]["profile.json"])


def test_prompt_tests_run_as_a_job_and_the_served_revision_follows_pin_and_gate() -> None:
    from tailor.api.workloads import EvalTarget
    from tailor.builders.promptprofile import build_prompt_tests, cases_hash
    from tailor.controllers.promptprofile import choose_served

    spec: PromptProfileSpec = spec_of("promptprofile")
    target = EvalTarget(base_url="http://md.ns.svc:8000/v1", model="md", context="none")
    workload = build_prompt_tests(spec, parent("PromptProfile", "pp"), SETTINGS, 3, target, None)
    job = by_kind(workload.manifests)["Job"]
    assert workload.name.startswith("pp-test-r3-") and workload.module == Program.PROMPT_TESTS
    assert job["spec"]["backoffLimit"] == 1
    assert workload.run.cases_hash == cases_hash(spec) and workload.run.revision == 3
    assert workload.run.spec.tests is not None and len(workload.run.spec.tests.cases) == 1
    other = spec.model_copy(update={"tests": spec.tests.model_copy(update={"cases": spec.tests.cases * 2})})  # fmt: skip
    assert cases_hash(other) != cases_hash(spec)  # new cases: a new Job, run again

    history = [
        {"revision": n, "configMap": f"pp-r{n}", "hash": str(n), "time": ""} for n in (3, 2, 1)
    ]
    spec = spec.model_copy(update={"tests": spec.tests.model_copy(update={"gate": False})})
    newest, problem = choose_served(spec, history, 3, None)
    assert problem is None and newest == {"revision": 3, "configMap": "pp-r3", "reason": "Newest"}
    gated = spec.model_copy(update={"tests": spec.tests.model_copy(update={"gate": True})})
    assert choose_served(gated, history, 3, 2)[0] == {"revision": 2, "configMap": "pp-r2", "reason": "LastPassed"}  # fmt: skip
    assert choose_served(gated, history, 3, None) == (None, None)  # none passed yet
    pinned = gated.model_copy(update={"revision_pin": 1})
    assert choose_served(pinned, history, 3, 2)[0]["reason"] == "Pinned"  # type: ignore[index]
    served, problem = choose_served(spec.model_copy(update={"revision_pin": 9}), history, 3, None)
    assert served is None and problem is not None
    assert problem.startswith("spec.revisionPin: revision 9 is not in status.history")


def pool_config_map(text: str) -> dict[str, Any]:
    return {"metadata": {"name": "examples"}, "data": {"pool.jsonl": text}}


def test_a_pool_from_a_config_map_is_published_inside_the_revision() -> None:
    from tailor.builders.promptprofile import resolve_pool

    spec = PromptProfileSpec.model_validate(
        {"fewShotSelection": {"k": 2, "poolFrom": {"name": "examples", "key": "pool.jsonl"}}}
    )
    lines = [
        {"user": "Classify a photo.", "assistant": "resnet50"},
        {"prompt": "Separate a song's vocals.", "completion": "umxhq"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Depth?"},
                      {"role": "assistant", "content": "MiDaS"}]},
    ]  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    resolved, errors = resolve_pool(spec, pool_config_map(text), "team")
    assert errors == [] and resolved.few_shot_selection is not None
    pool = resolved.few_shot_selection.pool or []
    assert [(e.user, e.assistant) for e in pool] == [
        ("Classify a photo.", "resnet50"), ("Separate a song's vocals.", "umxhq"), ("Depth?", "MiDaS")
    ]  # fmt: skip
    cm = build_revision(resolved, parent("PromptProfile"), 1)
    published = json.loads(cm["data"]["profile.json"])["fewShotSelection"]
    assert len(published["pool"]) == 3 and "poolFrom" not in published
    # A changed ConfigMap is new content: a new revision.
    again, _ = resolve_pool(spec, pool_config_map(text.replace("umxhq", "demucs")), "team")
    assert profile_hash(again) != profile_hash(resolved)
    # A JSON list reads the same.
    listed, errors = resolve_pool(spec, pool_config_map(json.dumps(lines)), "team")
    assert errors == [] and profile_hash(listed) == profile_hash(resolved)


@pytest.mark.parametrize(
    ("config_map", "problem"),
    [
        (None, "spec.fewShotSelection.poolFrom.name: ConfigMap examples does not exist in team"),
        ({"data": {"other": "{}"}}, "spec.fewShotSelection.poolFrom.key: ConfigMap examples has "
         "no key pool.jsonl (keys: other)"),
        (pool_config_map('{"user": "a", "assistant": "b"}\n{"user": "c"'),
         "ConfigMap examples key pool.jsonl:2: not valid JSON"),
        (pool_config_map('{"user": "a", "assistant": "b"}\n{"question": "c"}'),
         "pool.jsonl:2: a record needs user and assistant"),
        (pool_config_map('{"user": "", "assistant": "b"}'), "pool.jsonl:1: user: String should have"),
        (pool_config_map('{"user": "a", "assistant": "b"}'),
         "spec.fewShotSelection.k: 2 is larger than the pool (1 examples"),
        (pool_config_map("\n".join(json.dumps({"user": "q" * 16000, "assistant": "a"})
                                   for _ in range(70))),
         "more than a ConfigMap holds"),
    ],
)  # fmt: skip
def test_a_bad_pool_config_map_is_named_with_the_fix(config_map: Any, problem: str) -> None:
    from tailor.builders.promptprofile import resolve_pool

    spec = PromptProfileSpec.model_validate(
        {"fewShotSelection": {"k": 2, "poolFrom": {"name": "examples", "key": "pool.jsonl"}}}
    )
    resolved, errors = resolve_pool(spec, config_map, "team")
    assert len(errors) == 1 and problem in errors[0], errors
    assert resolved is spec


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ question }}", []),
        ("{{ question ", ["spec.template: line 1:"]),
        ("{{ company }} {{ question }}", ["spec.template: variable 'company'"]),
    ],
)
def test_template_errors(template: str, expected: list[str]) -> None:
    spec = PromptProfileSpec(template=template)
    errors = template_errors(spec)
    assert len(errors) == len(expected)
    for error, prefix in zip(errors, expected, strict=True):
        assert error.startswith(prefix)


def test_raft_children() -> None:
    spec: RAFTJobSpec = spec_of("raftjob")
    p = parent("RAFTJob", "r")
    ftj = build_child_fine_tune(spec, p, SETTINGS)
    assert ftj["metadata"]["name"] == "r-ft"
    FineTuneJobSpec.model_validate(ftj["spec"])
    train = ftj["spec"]["dataset"]["train"]["pvc"]
    assert train == {
        "claimName": "tailor-artifacts",
        "path": "raftjob/r/uid-1/data",
        "glob": "train.jsonl",
    }
    md = build_eval_deployment(spec, p)
    ModelDeploymentSpec.model_validate(md["spec"])
    assert md["spec"]["adapters"] == [{"name": "raft", "fineTuneJobRef": {"name": "r-ft"}}]


def job(conditions: list[dict[str, str]] | None = None, **status: Any) -> dict[str, Any]:
    return {"spec": {}, "status": {"conditions": conditions or [], **status}}


def pod(phase: str = "Pending", **extra: Any) -> dict[str, Any]:
    return {"status": {"phase": phase, **extra}}


def test_run_state_from_job() -> None:
    assert (
        run_state_from_job(job([{"type": "Complete", "status": "True"}], succeeded=1), []).phase
        == "Succeeded"
    )
    failed = run_state_from_job(
        job(
            [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "too slow",
                }
            ]
        ),
        [],
    )
    assert (failed.phase, failed.reason) == ("Failed", "DeadlineExceeded")
    unschedulable = pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ]
    )
    queued = run_state_from_job(job(active=1), [unschedulable])
    assert queued.phase == "Queued" and "Insufficient nvidia.com/gpu" in queued.message
    assert run_state_from_job(job(active=1), [pod("Running")]).phase == "Running"
    assert run_state_from_job(job(active=1), [pod()]).phase == "Pending"
    # the pod finished but the Job controller has not marked the Job yet: still Running,
    # not back to Pending (a phase never goes backwards)
    assert run_state_from_job(job(active=1), [pod("Succeeded")]).phase == "Running"
    assert run_state_from_job(job(active=1, failed=1), [pod()]).phase == "Running"
    counting = job(active=0, uncountedTerminatedPods={"succeeded": ["uid-1"]})
    assert run_state_from_job(counting, []).phase == "Running"
    assert run_state_from_job({"spec": {"suspend": True}, "status": {}}, []).phase == "Suspended"


def test_user_errors_surface_the_workloads_reason() -> None:
    terminated = {
        "exitCode": 2,
        "message": '{"reason": "InvalidDataset", "message": "train.jsonl:7: missing messages"}',
    }
    failed_pod = pod("Failed", containerStatuses=[{"state": {"terminated": terminated}}])
    state = run_state_from_job(
        job([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]), [failed_pod]
    )
    assert (state.reason, state.message) == ("InvalidDataset", "train.jsonl:7: missing messages")


def test_a_completed_training_job_succeeds_only_with_the_trainers_verified_artifact() -> None:
    from tailor.controllers.finetunejob import require_artifact

    complete = job([{"type": "Complete", "status": "True"}], succeeded=2)
    report = '{"reason": "ArtifactPublished", "message": "pvc://a", "artifact": {"sha256": "ab", "files": 7}}'

    def done(message: str | None, exit_code: int = 0) -> dict[str, Any]:
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": "Completed"}
        if message is not None:
            terminated["message"] = message
        return pod("Succeeded", containerStatuses=[{"state": {"terminated": terminated}}])

    # rank 0 of a two-node Job reported; the other pod wrote nothing
    state = require_artifact(run_state_from_job(complete, [done(None), done(report)]))
    assert state is not None and state.phase == "Succeeded"
    assert state.result and state.result["artifact"] == {"sha256": "ab", "files": 7}
    for pods in ([done(None)], [done("not json")], [done('{"reason": "Completed"}')], []):
        missing = require_artifact(run_state_from_job(complete, pods))
        assert missing is not None and (missing.phase, missing.reason) == (
            "Failed",
            "ArtifactMissing",
        )
        assert "manifest.json" in missing.message
    running = run_state_from_job(job(active=1), [pod("Running")])
    assert require_artifact(running) is running and require_artifact(None) is None


@pytest.mark.parametrize(
    ("path", "reason", "report"),
    [
        ("dataset.artifact.sha256", "DatasetMissing", {"dataset": {"artifact": {"sha256": "ab"}}}),
        ("evaluation.artifact.sha256", "EvaluationMissing", {"evaluation": {"artifact": {"sha256": "cd"}}}),
    ],
)  # fmt: skip
def test_a_raft_stage_job_is_done_only_with_its_workloads_report(
    path: str, reason: str, report: dict[str, Any]
) -> None:
    from tailor.runtime.base import RunState, require_report

    done = RunState(phase="Succeeded", result=report)
    assert require_report(done, path, reason, "m") is done
    for result in (None, {}, {"reason": "Completed"}, {path.split(".")[0]: {"artifact": {}}},
                   {path.split(".")[0]: "not an object"}):  # fmt: skip
        failed = require_report(RunState(phase="Succeeded", result=result), path, reason, "m")
        assert failed is not None and (failed.phase, failed.reason) == ("Failed", reason)
    running = RunState(phase="Running")
    assert require_report(running, path, reason, "m") is running


@pytest.mark.parametrize(("nodes", "gpus", "procs"), [(1, 0, 1), (1, 1, 1), (1, 4, 4), (2, 0, 2)])
def test_the_local_runtime_runs_every_rank_on_its_host_under_torchrun(
    nodes: int, gpus: int, procs: int, tmp_path: Path
) -> None:
    from tailor.runtime.local import RunRecord, training_processes, workload_argv

    spec = spec_of("finetunejob")
    spec.resources.nodes, spec.resources.gpus = nodes, gpus
    workload = build_training(spec, parent("FineTuneJob", "local"), SETTINGS)
    record = RunRecord(
        "ns", workload.name, workload.module, False, processes=training_processes(workload)
    )
    argv = workload_argv(record, tmp_path)
    assert record.processes == procs
    assert argv[-3:] == ["tailor.workloads.training.trainer", "--spec", str(tmp_path / "spec.json")]
    if procs > 1:
        assert argv[2:4] == ["torch.distributed.run", "--standalone"]
        assert f"--nproc-per-node={procs}" in argv
    else:
        assert argv[1:3] == ["-m", "tailor.workloads.training.trainer"]


S3 = OperatorSettings(
    artifacts_store="s3",
    s3_bucket="models",
    s3_prefix="team-a",
    s3_endpoint="https://s3.example.com",
    s3_secret="s3-keys",
)


def volumes_of(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in manifest["spec"]["template"]["spec"]["volumes"]}


def test_s3_store_trains_in_scratch_with_the_keys_mounted_and_publishes_an_s3_uri() -> None:
    spec = spec_of("finetunejob", resources={"nodes": 2, "gpus": 1, "cpu": "1", "memory": "1Gi"})
    workload = build_training(spec, parent("FineTuneJob", "t"), S3)
    job = by_kind(workload.manifests)["Job"]
    volumes = volumes_of(job)
    assert volumes["artifacts"] == {
        "name": "artifacts",
        "emptyDir": {"sizeLimit": "200Gi"},
    }  # no shared claim
    claims = [v for v in volumes.values() if "persistentVolumeClaim" in v]
    assert claims == []
    secret = next(v for v in volumes.values() if "secret" in v)
    assert secret["secret"]["secretName"] == "s3-keys"
    store = workload.run.paths.store
    assert (store.bucket, store.prefix, store.secret_name) == ("models", "team-a/ns", "s3-keys")
    assert store.credentials_dir == "/etc/tailor/secrets/s3-keys"
    # keys by reference only: the spec names the Secret's keys, it has no field for values
    assert {"access_key_id", "secret_access_key"}.isdisjoint(type(store).model_fields)
    from tailor.builders.finetunejob import artifact_uri

    assert artifact_uri(spec, parent("FineTuneJob", "t"), S3) == (
        "s3://models/team-a/ns/finetunejob/t/uid-1/model"
    )
    # the pvc store keeps the claim
    pvc = volumes_of(
        by_kind(build_training(spec, parent("FineTuneJob", "t"), SETTINGS).manifests)["Job"]
    )
    assert pvc["artifacts"]["persistentVolumeClaim"]["claimName"] == "tailor-artifacts"


def test_s3_store_serves_adapters_downloaded_from_the_bucket() -> None:
    spec: ModelDeploymentSpec = spec_of(
        "modeldeployment", knowledgeBaseRef=None, promptProfileRef=None
    )
    refs = ResolvedRefs(adapters=[("torchhub", "s3://models/team-a/ns/finetunejob/t/u/model")])
    workload = build_serving(spec, parent("ModelDeployment", "md"), S3, refs)
    adapter = workload.run.adapters[0]
    assert adapter.path == "/artifacts/finetunejob/t/u/model"
    assert adapter.uri == "s3://models/team-a/ns/finetunejob/t/u/model"
    deployment = by_kind(workload.manifests)["Deployment"]
    assert volumes_of(deployment)["artifacts"] == {
        "name": "artifacts",
        "emptyDir": {"sizeLimit": "200Gi"},
    }
    # another bucket (or a run that chose the s3 store on a pvc cluster): fetched into
    # the model cache with the connection; a pvc run's adapter: the claim, mounted
    assert uri_to_path("s3://elsewhere/finetunejob/t/u/model", S3, "ns") == ("", None)
    with pytest.raises(ValueError, match="no S3 connection"):
        uri_to_path("s3://elsewhere/finetunejob/t/u/model", SETTINGS, "ns")
    mixed = ResolvedRefs(
        adapters=[("a", "pvc://tailor-artifacts/finetunejob/p/u/model"), ("b", "s3://x/y/")]
    )
    served = build_serving(spec, parent("ModelDeployment", "md"), S3, mixed)
    assert [(a.path, a.uri) for a in served.run.adapters] == [
        ("/mnt/pvc/tailor-artifacts/finetunejob/p/u/model", None),
        ("", "s3://x/y/"),
    ]
    mounted = volumes_of(by_kind(served.manifests)["Deployment"])
    claims = [v["persistentVolumeClaim"]["claimName"] for v in mounted.values() if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == ["tailor-artifacts"]
    on_pvc = build_serving(
        spec,
        parent("ModelDeployment", "md"),
        OperatorSettings(s3_bucket="models", s3_secret="s3-keys"),
        ResolvedRefs(adapters=[("b", "s3://models/team-a/finetunejob/t/u/model")]),
    )
    assert [(a.path, a.uri) for a in on_pvc.run.adapters] == [
        ("", "s3://models/team-a/finetunejob/t/u/model")
    ]
    secrets = [v["secret"]["secretName"] for v in volumes_of(by_kind(on_pvc.manifests)["Deployment"]).values() if "secret" in v]  # fmt: skip
    assert sorted(secrets) == ["md-test-key", "s3-keys"]  # the S3 keys, and its test key


def test_a_run_can_choose_its_own_store() -> None:
    from tailor.builders.finetunejob import artifact_uri

    connected = OperatorSettings(s3_bucket="models", s3_prefix="team-a", s3_secret="s3-keys")
    spec = spec_of(
        "finetunejob",
        output={"store": "s3"},
        resources={"nodes": 2, "gpus": 1, "cpu": "1", "memory": "1Gi"},
    )
    own = connected.for_store(spec.output.store)
    assert own.artifacts_store == "s3" and connected.artifacts_store == "pvc"
    job = by_kind(build_training(spec, parent("FineTuneJob", "t"), own).manifests)["Job"]
    assert volumes_of(job)["artifacts"] == {"name": "artifacts", "emptyDir": {"sizeLimit": "200Gi"}}
    assert artifact_uri(spec, parent("FineTuneJob", "t"), own).startswith("s3://models/team-a/ns/")
    assert connected.for_store(None) is connected
    assert connected.store_problem("spec.output.store") is None
    problem = OperatorSettings().for_store("s3").store_problem("spec.output.store")
    assert problem is not None and "artifacts.s3.bucket" in problem
    assert "spec.output.store" in problem
    with pytest.raises(ValueError, match="drop store"):
        spec_of("finetunejob", output={"store": "s3", "pvc": {"claimName": "out"}})
    raft: RAFTJobSpec = spec_of("raftjob", output={"store": "s3"})
    child = build_child_fine_tune(raft, parent("RAFTJob", "r"), connected.for_store("s3"))
    assert child["spec"]["output"]["store"] == "s3"
    assert child["spec"]["dataset"]["train"]["uri"].startswith("s3://models/team-a/ns/raftjob/r/")


def test_s3_store_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="s3Bucket"):
        OperatorSettings(artifacts_store="s3")


def test_created_artifacts_claim_has_the_configured_access_mode() -> None:
    from tailor.builders.common import artifacts_pvc

    rwx = OperatorSettings(artifacts_access_mode="ReadWriteMany")
    assert artifacts_pvc(rwx, "ns")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert artifacts_pvc(SETTINGS, "ns")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_model_uris_mount_what_they_name_and_a_cache_claim_is_shared() -> None:
    from tailor.api.common import ModelSource

    hub = ModelSource(uri="hf://HuggingFaceTB/SmolLM2-135M-Instruct@v1.0")
    assert hub.hub is not None and (hub.hub.repo, hub.hub.revision) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "v1.0",
    )
    assert ModelSource(uri="hf://a/b").hub.revision == "main"  # type: ignore[union-attr]
    claim = ModelSource(uri="pvc://models/llama/7b/").claim
    assert claim is not None and (claim.claim_name, claim.path) == ("models", "llama/7b")
    assert ModelSource(uri="s3://team-models/base/x/").s3 == ("team-models", "base/x")
    assert ModelSource(builtin="smollm2-135m-instruct").s3 is None

    spec = spec_of("finetunejob", baseModel={"uri": "pvc://models/llama"})
    cached = OperatorSettings(model_cache_claim="model-cache")
    job = by_kind(build_training(spec, parent("FineTuneJob", "t"), cached).manifests)["Job"]
    volumes = volumes_of(job)
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    ]
    assert "models" in claims  # the pvc:// base model's claim is mounted
    assert volumes["cache"] == {
        "name": "cache",
        "persistentVolumeClaim": {"claimName": "model-cache"},
    }
    mounts = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "cache", "mountPath": "/home/tailor/.cache"} in mounts
    plain = by_kind(build_training(spec, parent("FineTuneJob", "t"), SETTINGS).manifests)["Job"]
    assert volumes_of(plain)["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "100Gi"}}


def test_data_uris_mount_what_they_name_and_a_raft_child_reads_its_data_from_the_bucket() -> None:
    from tailor.api.common import DataSource

    files = DataSource(uri="pvc://docs/handbook/").files
    assert files is not None and (files.claim_name, files.path, files.glob) == (
        "docs",
        "handbook",
        "**/*",
    )
    assert DataSource(uri="s3://data/team/train.jsonl").s3 == ("data", "team/train.jsonl")
    assert DataSource(uri="s3://data/team/").s3 == ("data", "team/")
    for bad in ("s3://data/a/../b", "gs://data/a", "pvc://Docs/x", "s3://d"):
        with pytest.raises(ValueError, match="uri must be"):
            DataSource(uri=bad)

    # an s3:// dataset on a cluster whose store is pvc: the connection's keys are mounted
    connected = OperatorSettings(s3_bucket="models", s3_secret="s3-keys")
    spec = spec_of("finetunejob", dataset={"train": {"uri": "s3://data/team/train.jsonl"}})
    workload = build_training(spec, parent("FineTuneJob", "t"), connected)
    secrets = [v["secret"]["secretName"] for v in volumes_of(by_kind(workload.manifests)["Job"]).values() if "secret" in v]  # fmt: skip
    assert secrets == ["s3-keys"]
    assert workload.run.paths.store is None and workload.run.paths.s3 is not None
    assert workload.run.paths.s3.credentials_dir == "/etc/tailor/secrets/s3-keys"
    plain = build_training(spec_of("finetunejob"), parent("FineTuneJob", "t"), connected)
    assert not [v for v in volumes_of(by_kind(plain.manifests)["Job"]).values() if "secret" in v]

    # the s3 store: RAFT's child FineTuneJob reads its files from the bucket, no claim
    raft: RAFTJobSpec = spec_of("raftjob")
    ftj = build_child_fine_tune(raft, parent("RAFTJob", "r"), S3)
    assert ftj["spec"]["dataset"]["train"]["uri"] == (
        "s3://models/team-a/ns/raftjob/r/uid-1/data/train.jsonl"
    )
    assert "pvc" not in ftj["spec"]["dataset"]["train"]
    assert ftj["spec"]["dataset"]["validation"]["uri"].endswith("/data/validation.jsonl")
    child = build_training(
        FineTuneJobSpec.model_validate(ftj["spec"]), parent("FineTuneJob", "r-ft"), S3
    )
    volumes = volumes_of(by_kind(child.manifests)["Job"]).values()
    assert [v for v in volumes if "persistentVolumeClaim" in v] == []


@pytest.mark.parametrize("program", list(Program))
def test_every_program_a_builder_names_is_a_module_with_a_main(program: Program) -> None:
    """Pods and local processes run ``python -m tailor.workloads.<program>``: a name that
    is not a module (after a move) would fail only when the pod starts."""
    module = importlib.import_module(f"tailor.workloads.{program}")
    assert callable(getattr(module, "main", None)), f"{module.__name__} has no main()"


def test_a_deployment_with_no_allowed_callers_admits_none() -> None:
    """``allowFrom: []`` closes the API port: an ingress rule with an empty ``from`` would
    admit every source, so there is none; the metrics port admits the admin's namespaces."""
    spec: ModelDeploymentSpec = spec_of(
        "modeldeployment", knowledgeBaseRef=None, promptProfileRef=None, network={"allowFrom": []}
    )
    settings = type(SETTINGS).model_validate(
        {**SETTINGS.model_dump(), "network_policy": {"metrics_from_namespaces": ["monitoring"]}}
    )
    workload = build_serving(spec, parent("ModelDeployment", "md"), settings, ResolvedRefs())
    policy = by_kind(workload.manifests)["NetworkPolicy"]
    assert policy["spec"]["ingress"] == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "ports": [{"protocol": "TCP", "port": settings.metrics_port}],
        }
    ]
    off = type(SETTINGS).model_validate(
        {**SETTINGS.model_dump(), "network_policy": {"enabled": False}}
    )
    assert "NetworkPolicy" not in by_kind(build_serving(spec, parent("ModelDeployment", "md"), off, ResolvedRefs()).manifests)  # fmt: skip


def test_capture_gets_its_own_folder_of_the_claim_writable_and_nothing_else() -> None:
    """spec.feedback on the pvc store: the server's artifacts claim stays read-only but for
    feedback/<deployment>/ (a subPath mount); without feedback there is no such mount."""
    spec = spec_of("modeldeployment", feedback={"sampleRate": 0.5})
    md = parent("ModelDeployment", "chat")
    pod = by_kind(build_serving(spec, md, SETTINGS, ResolvedRefs()).manifests)["Deployment"]
    mounts = pod["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    artifacts = [m for m in mounts if m["name"] == "artifacts"]
    root = SETTINGS.artifacts_mount
    assert {
        "name": "artifacts",
        "mountPath": f"{root}/feedback/chat",
        "subPath": "feedback/chat",
    } in artifacts
    assert all(m.get("readOnly") for m in artifacts if "subPath" not in m)
    plain = by_kind(
        build_serving(spec_of("modeldeployment"), md, SETTINGS, ResolvedRefs()).manifests
    )
    plain_mounts = plain["Deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert not any("subPath" in m for m in plain_mounts)
