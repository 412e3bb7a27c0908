"""Every scratch volume of every workload pod is bounded (docs/security.md, "Bounded pods").

Workload containers have read-only root filesystems, so what a pod can write to a node's disk
is its emptyDirs. Before, none had a sizeLimit: one run's checkpoints in the s3 store's
mirror, or a model cache, could fill the node's disk and get other tenants' pods evicted.
Now each has one, from the admin's Helm values (workloads.scratch), and the kubelet evicts the
pod that passes it. The pods of every kind are built here by the operator's own builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tailor.api import parse
from tailor.api.settings import OperatorSettings, ScratchLimits
from tailor.api.workloads import EvalTarget
from tailor.builders.common import Parent, Workload
from tailor.builders.finetunejob import build_training
from tailor.builders.knowledgebase import build_index, retriever_config
from tailor.builders.modeldeployment import ResolvedRefs, build_serving
from tailor.builders.promptprofile import build_prompt_tests
from tailor.builders.raftjob import build_data_stage, build_evaluation_stage

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def spec(kind: str, **changes: Any) -> Any:
    manifest = yaml.safe_load((EXAMPLES / f"{kind}.yaml").read_text())
    manifest["spec"].update(changes)
    return parse(manifest)


def every_workload(settings: OperatorSettings) -> list[Workload]:
    def owner(kind: str) -> Parent:
        return Parent(kind=kind, name="x", namespace="team-a", uid="u1")

    kb = spec("knowledgebase")
    retriever = retriever_config(kb, owner("KnowledgeBase"), settings)
    raft = spec("raftjob")
    target = EvalTarget(base_url="http://x:8000/v1", model="x")
    profile = spec("promptprofile")
    vllm = spec("modeldeployment", engine="vllm", quantization="none", resources={"gpus": 1},
                baseModel={"huggingface": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}})  # fmt: skip
    return [
        build_training(spec("finetunejob"), owner("FineTuneJob"), settings),
        build_index(kb, owner("KnowledgeBase"), settings, 1),
        build_serving(spec("modeldeployment"), owner("ModelDeployment"), settings, ResolvedRefs()),
        build_serving(vllm, owner("ModelDeployment"), settings, ResolvedRefs()),
        build_data_stage(raft, owner("RAFTJob"), settings, retriever),
        build_evaluation_stage(raft, owner("RAFTJob"), settings, retriever, {"rag": target}),
        build_prompt_tests(profile, owner("PromptProfile"), settings, 1, target, None),
    ]


def empty_dirs(workload: Workload) -> dict[str, dict[str, Any]]:
    found = {}
    for manifest in workload.manifests:
        template = (manifest.get("spec") or {}).get("template") or {}
        for volume in (template.get("spec") or {}).get("volumes") or []:
            if "emptyDir" in volume:
                found[f"{workload.name}/{volume['name']}"] = volume["emptyDir"]
    return found


def test_every_scratch_volume_of_every_workload_pod_has_the_admins_size_limit() -> None:
    store_s3 = {"artifacts_store": "s3", "s3_bucket": "models", "s3_secret": "keys"}
    for settings in (OperatorSettings(), OperatorSettings(**store_s3)):
        volumes = {k: v for w in every_workload(settings) for k, v in empty_dirs(w).items()}
        assert any(k.endswith("/artifacts") for k in volumes) == bool(settings.s3_bucket)
        assert any(k.endswith("/vllm-cache") for k in volumes)
        unbounded = [name for name, volume in volumes.items() if "sizeLimit" not in volume]
        assert not unbounded, unbounded
    small = ScratchLimits(tmp="1Gi", artifacts="2Gi", cache="3Gi", vllm="4Gi")
    settings = OperatorSettings(**store_s3, scratch=small)
    limits = {
        name.rsplit("/", 1)[1]: volume["sizeLimit"]
        for workload in every_workload(settings)
        for name, volume in empty_dirs(workload).items()
    }
    assert limits == {"tmp": "1Gi", "artifacts": "2Gi", "cache": "3Gi", "vllm-cache": "4Gi",
                      "dshm": "8Gi"}  # fmt: skip
    from_env = OperatorSettings.from_env({"TAILOR_SCRATCH": '{"tmp": "5Gi"}'})
    assert from_env.scratch.tmp == "5Gi" and from_env.scratch.cache == "100Gi"
