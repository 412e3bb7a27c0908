"""A small RAFTJob through the operator with the local runtime: the real API server and
operator, and the real raft_data, train, serve and evaluate workloads on real models.

The RAFTJob must go GeneratingData -> Training -> Evaluating -> Succeeded with the
dataset stats and both systems' scores in its status, written by the workloads, and its
adapter must then be servable by a ModelDeployment through ``raftJobRef``.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tailor.devcluster.kube import Kube
from tailor.workloads.evaluation.apibench import load_questions, raft_question
from tests.e2e.helpers import wait_for, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]

ROOT = Path(__file__).resolve().parents[2]


def test_raft_job_trains_evaluates_and_serves_through_the_operator(
    kube: Kube, namespace: str, local_operator: Path, apibench: Path, tmp_path: Path
) -> None:
    ns = namespace
    docs = (apibench / "torchhub_api.jsonl").read_text().splitlines()[:24]
    (tmp_path / "api.jsonl").write_text("\n".join(docs) + "\n")
    ids = {json.loads(d)["api_call"] for d in docs}
    questions = [
        raft_question(q)
        for q in load_questions(apibench / "torchhub_train.json")
        if q.api_call in ids
    ][:20]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    for name, key, path in (
        ("torchhub-api", "torchhub_api.jsonl", "api.jsonl"),
        ("raft-questions", "questions.jsonl", "questions.jsonl"),
    ):
        kube.kubectl("create", "configmap", name, f"--from-file={key}={tmp_path / path}", "-n", ns)
    kb = yaml.safe_load((ROOT / "docs/examples/quickstart/10-knowledgebase.yaml").read_text())
    raft = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "RAFTJob",
        "metadata": {"name": "torchhub-raft"},
        "spec": {
            "knowledgeBaseRef": {"name": "torchhub-docs"},
            "questions": {
                "source": {"configMap": {"name": "raft-questions", "key": "questions.jsonl"}}
            },
            "raft": {"oracleProbability": 0.8, "distractors": 2},
            "fineTune": {
                "baseModel": {"builtin": "smollm2-135m-instruct"},
                "method": "lora",
                "training": {"maxSteps": 3, "batchSize": 2, "maxSeqLength": 1024},
                "checkpoint": {"everySteps": 3, "keep": 1},
            },
            "evaluation": {
                "holdout": 0.2,
                "matcher": "apibench",
                "maxQuestions": 2,
                "maxTokens": 24,
            },
        },
    }
    kube.apply([kb, raft], "-n", ns)

    stages: list[str] = []
    deadline = time.monotonic() + 1200
    status: dict = {}
    while time.monotonic() < deadline:
        status = kube.get_json("raft", "torchhub-raft", "-n", ns).get("status") or {}
        if status.get("stage") and (not stages or stages[-1] != status["stage"]):
            stages.append(status["stage"])
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    assert status.get("phase") == "Succeeded", status
    assert stages[-1] == "Succeeded" and "Training" in stages, stages

    dataset = status["dataset"]  # written by the raft_data workload
    assert dataset["examples"] + dataset["holdout"] <= 20 and dataset["holdout"] == 4
    assert 0.6 <= dataset["withOracle"] <= 1.0
    assert dataset["meanContextTokens"] > 50
    assert dataset["artifact"]["uri"].startswith("pvc://tailor-artifacts/raftjob/")
    evaluation = status["evaluation"]  # written by the evaluate workload
    assert evaluation["protocol"] == "oracle"
    for system in ("rag", "raft"):
        assert evaluation[system]["total"] == 2
        assert 0 <= evaluation[system]["correct"] <= 2
        # matcher apibench: the paper's accuracy with exact and hallucination beside it
        assert evaluation[system]["accuracy"] == evaluation[system]["correct"] / 2
        assert evaluation[system]["exact"] in (0, 0.5, 1)
        assert evaluation[system]["hallucination"] in (0, 0.5, 1)
    assert status["artifact"]["uri"].startswith("pvc://tailor-artifacts/finetunejob/")
    child = kube.get_json("ftj", status["fineTuneJob"], "-n", ns)["status"]
    assert child["progress"]["step"] == 3  # the trainer's own report
    # The evaluation's ModelDeployment is removed once the scores are in (deleted when the
    # run succeeds; gone once the operator's finalizer has run).
    wait_for(
        "the evaluation's ModelDeployment gone",
        lambda: "torchhub-raft-md" not in kube.kubectl("get", "md", "-n", ns).stdout,
        60,
    )

    md = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "raft-assistant"},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "adapters": [{"name": "raft", "raftJobRef": {"name": "torchhub-raft"}}],
            "knowledgeBaseRef": {"name": "torchhub-docs"},
        },
    }
    kube.apply(md, "-n", ns)
    endpoint = wait_phase(kube, ns, "md", "raft-assistant", {"Ready"}, 600)["status"]["endpoint"]
    models = json.loads(urllib.request.urlopen(f"{endpoint}/models", timeout=30).read())
    assert {m["id"] for m in models["data"]} == {"raft-assistant", "raft-assistant/raft"}
    # ... and answers users (a RAFTJob's spec.evaluation is its comparison, not a gate)
    body = {"model": "raft-assistant/raft", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Which model reads weather aloud?"}]}  # fmt: skip
    request = urllib.request.Request(
        f"{endpoint}/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    answered = json.loads(urllib.request.urlopen(request, timeout=120).read())
    assert answered["choices"][0]["message"]["content"] is not None
