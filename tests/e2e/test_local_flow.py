"""The quickstart flow, reduced, through the operator with the local runtime: the real API
server, the real operator, real workload processes (index, train, serve) on real models.

Resources must reach their final phases, the FineTuneJob's progress must come from the
trainer itself, a chat request to the ModelDeployment's endpoint must answer with
sources from the knowledge base, and an Evaluation of two rungs (RAG, LoRA + RAG) must
finish with intervals, a paired test and a recommendation after its process is killed.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor.cli.eval import compare, table
from tailor.cli.quickstart_data import rag_training_examples
from tailor.devcluster.kube import Kube
from tailor.workloads.evaluation.apibench import load_questions
from tests.e2e.helpers import PhaseWatch, chat, wait_for, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "examples" / "quickstart"


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((QUICKSTART / name).read_text())
    doc["spec"].update(spec)
    return doc


def condition_of(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == type_), None)  # fmt: skip


def test_quickstart_flow_through_the_operator(
    kube: Kube, namespace: str, local_operator: Path, apibench: Path, tmp_path: Path
) -> None:
    ns = namespace
    docs = (apibench / "torchhub_api.jsonl").read_text().splitlines()[:24]
    (tmp_path / "api.jsonl").write_text("\n".join(docs) + "\n")
    # The quickstart's own training data: RAG-format examples over these 24 cards.
    ids = {json.loads(d)["api_call"] for d in docs}
    asked = [q for q in load_questions(apibench / "torchhub_train.json") if q.api_call in ids]
    train = rag_training_examples(asked[:48], [json.loads(d) for d in docs])
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in train))
    kube.kubectl(
        "create",
        "configmap",
        "torchhub-api",
        f"--from-file=torchhub_api.jsonl={tmp_path / 'api.jsonl'}",
        "-n",
        ns,
    )
    kube.kubectl(
        "create",
        "configmap",
        "torchhub-chat",
        f"--from-file=train.jsonl={tmp_path / 'train.jsonl'}",
        "-n",
        ns,
    )

    ftj = manifest("30-finetunejob.yaml")
    # A few short steps: what is checked is the flow, not what the adapter learns.
    ftj["spec"]["training"] = {
        "maxSteps": 3,
        "batchSize": 2,
        "maxSeqLength": 384,
        "learningRate": 0.001,
    }
    ftj["spec"]["checkpoint"] = {"everySteps": 2, "keep": 1}
    md = manifest("40-modeldeployment.yaml")
    watches = [
        PhaseWatch(kube, ns, "kb", "torchhub-docs"),
        PhaseWatch(kube, ns, "ftj", "torchhub-lora"),
        PhaseWatch(kube, ns, "md", "api-assistant"),
    ]
    kube.apply(
        [manifest("10-knowledgebase.yaml"), manifest("20-promptprofile.yaml"), ftj, md], "-n", ns
    )

    kb = wait_phase(kube, ns, "kb", "torchhub-docs", {"Ready"}, timeout=300)
    assert kb["status"]["documents"] == 24 and kb["status"]["vectors"] == 24
    done = wait_phase(kube, ns, "ftj", "torchhub-lora", {"Succeeded"}, timeout=600)
    progress = done["status"]["progress"]
    assert progress["step"] == progress["totalSteps"] == 3  # reported by the trainer itself
    assert progress["loss"] > 0 and progress["tokensPerSecond"] > 0
    assert done["status"]["artifact"]["uri"].startswith("pvc://tailor-artifacts/finetunejob/")
    adapter_dir = (
        local_operator
        / ns
        / "volumes"
        / "tailor-artifacts"
        / done["status"]["artifact"]["uri"].split("tailor-artifacts/", 1)[1]
    )
    assert (adapter_dir / "manifest.json").exists()

    ready = wait_phase(kube, ns, "md", "api-assistant", {"Ready"}, timeout=600)
    # One writer of phase: through the whole life of each, no phase goes backwards.
    kb_phases, ftj_phases, _ = (w.assert_monotonic() for w in watches)
    assert kb_phases[-1] == "Ready" and ftj_phases[-1] == "Succeeded"
    endpoint = ready["status"]["endpoint"]
    assert endpoint.startswith("http://127.0.0.1:")
    body = {
        "model": "api-assistant/torchhub",
        "messages": [{"role": "user", "content": "I need a model to classify actions in videos."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    answer = chat(endpoint, body)
    assert answer["choices"][0]["message"]["content"].strip()
    sources = answer["tailor"]["sources"]
    assert sources and answer["tailor"]["retrieval"] == "ok"
    assert any("video" in json.dumps(s).lower() for s in sources)
    models = json.loads(urllib.request.urlopen(f"{endpoint}/models", timeout=30).read())
    assert {m["id"] for m in models["data"]} == {"api-assistant", "api-assistant/torchhub"}

    # Two rungs of the ladder as an Evaluation: a candidate naming a missing deployment
    # waits with a condition naming it; then two candidates on the deployment, the run's
    # process killed after its first answers: the restarted one asks only what is missing.
    def evaluation(name: str, deployment: str) -> dict[str, Any]:
        return {
            "apiVersion": "tailor.dev/v1alpha1",
            "kind": "Evaluation",
            "metadata": {"name": name},
            "spec": {
                "questions": {
                    "inline": [{"question": q.question, "apiCall": q.api_call} for q in asked[:4]]
                },
                "scoring": {"type": "apibench", "corpus": "torchhub"},
                "candidates": [
                    {  # the profile's served revision, brought by each request
                        "name": "rag",
                        "deploymentRef": {"name": deployment},
                        "promptProfileRef": {"name": "api-assistant"},
                    },
                    {
                        "name": "lora-rag",
                        "deploymentRef": {"name": deployment},
                        "adapter": "torchhub",
                    },
                ],
                "baseline": "rag",
                "target": {"metric": "accuracy", "min": 0.0},
                "concurrency": 1,
                "maxTokens": 24,
            },
        }

    kube.apply([evaluation("missing", "no-such-deployment")], "-n", ns)
    waiting = wait_for(
        "a condition naming the missing deployment",
        lambda: condition_of(kube.get_json("evaluation", "missing", "-n", ns), "Ready"),
        60,
    )
    assert waiting["reason"] == "DeploymentNotFound"
    assert waiting["message"].startswith("spec.candidates[0].deploymentRef.name:")
    kube.apply([evaluation("ladder", "api-assistant")], "-n", ns)
    run_record = local_operator / ns / "runs" / "ladder-eval.json"
    ev_uid = wait_for("the Evaluation's uid", lambda: kube.get_json("evaluation", "ladder", "-n", ns)
                      ["metadata"].get("uid"), 30)  # fmt: skip
    answers = (
        local_operator / ns / "volumes" / "tailor-artifacts" / "evaluation" / "ladder" / ev_uid
        / "answers.jsonl"
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (answers.exists() and len(answers.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, "no answers written"
        time.sleep(0.1)
    os.killpg(int(json.loads(run_record.read_text())["pid"]), signal.SIGKILL)
    done = wait_phase(kube, ns, "evaluation", "ladder", {"Succeeded"}, timeout=300)
    assert json.loads(run_record.read_text())["attempts"] == 2  # killed, then restarted
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    asked_twice = Counter((r["candidate"], r["id"]) for r in rows if not r["error"])
    assert len(asked_twice) == 8 and set(asked_twice.values()) == {1}
    served = kube.get_json("promptprofile", "api-assistant", "-n", ns)["status"]["served"]
    assert {r["promptProfileRevision"] for r in rows if r["candidate"] == "rag"} == {
        served["revision"]
    }  # and the server took it (no error): the request carried the deployment's test key
    status = done["status"]
    results = {r["name"]: r for r in status["candidates"]}
    assert status["questions"] == 4 and set(results) == {"rag", "lora-rag"}
    for r in results.values():
        assert r["scored"] == 4 and r["errors"] == 0 and r["costPerQuery"] > 0
        for metric in ("accuracy", "exact", "hallucination"):
            low, value, high = (r[metric][k] for k in ("low", "value", "high"))
            assert 0 <= low <= value <= high <= 1 and value * 4 == round(value * 4)
    assert "pValue" not in results["rag"] and 0 < results["lora-rag"]["pValue"] <= 1
    # both meet a target of 0: the cheaper one is recommended
    cheaper = min(results.values(), key=lambda r: (r["costPerQuery"], r["latencyP50Seconds"]))
    assert status["recommendation"]["candidate"] == cheaper["name"]
    assert status["report"]["uri"].rstrip("/").endswith(f"evaluation/ladder/{ev_uid}")
    assert (answers.parent / "report.png").stat().st_size > 0
    assert {len(o) for o in status["outcomes"].values()} == {4}  # a character per question
    paired = compare(done, done, None)  # `tailor eval compare`: with itself, no difference
    assert "+0.0" in paired and "1.0000" in paired
    shown = table(done)  # `tailor eval show`
    assert "Evaluation ladder: Succeeded" in shown and "lora-rag" in shown
    assert f"recommendation: {cheaper['name']}:" in shown

    # The judge scorer, the builtin model judging (its quality is not the point: the
    # plumbing and the order swap are): each answer graded, each pair compared both ways.
    judged = evaluation("judged", "api-assistant")
    judged["spec"].update(
        questions={"inline": [{"question": q.question} for q in asked[4:6]]},
        scoring={"type": "judge", "judge": {"deploymentRef": {"name": "api-assistant"},
                 "rubric": "The answer names a PyTorch Hub model that fits the task."}},
        target={"metric": "winRate", "min": 0.0}, concurrency=4, maxTokens=16,
    )  # fmt: skip
    kube.apply([judged], "-n", ns)
    verdict = wait_phase(kube, ns, "evaluation", "judged", {"Succeeded"}, timeout=300)["status"]
    uid = kube.get_json("evaluation", "judged", "-n", ns)["metadata"]["uid"]
    rows = [json.loads(line) for line in (answers.parents[2] / "judged" / uid /
                                          "judgments.jsonl").read_text().splitlines()]  # fmt: skip
    grades = Counter(r["candidate"] for r in rows if r["kind"] == "grade")
    orders = Counter((r["id"], r["order"]) for r in rows if r["kind"] == "compare")
    assert grades == {"rag": 2, "lora-rag": 2} and len(orders) == 4  # two questions, two orders
    assert {o for _, o in orders} == {"candidate-first", "baseline-first"}
    graded = {r["name"]: r for r in verdict["candidates"]}
    assert "winRate" not in graded["rag"]  # the baseline is not compared with itself
    assert not [r["error"] for r in rows if r["error"]]  # the gateway enforces the JSON shape
    low, value, high = (graded["lora-rag"]["winRate"][k] for k in ("low", "value", "high"))
    assert 0 <= low <= value <= high <= 1 and value * 4 == round(value * 4)
    assert 0 <= graded["lora-rag"]["judgeAgreement"] <= 1
    assert verdict["recommendation"]["candidate"] == "lora-rag"  # the one with a win rate

    # An adapter added to the running deployment is served by the same server process
    # (no rollout: same revision, same pid), and the status says what the replica serves.
    record = local_operator / ns / "runs" / "api-assistant.json"
    pid, revision = json.loads(record.read_text())["pid"], ready["status"]["revision"]
    added = {"name": "torchhub-v2", "fineTuneJobRef": {"name": "torchhub-lora"}}
    patch = {"spec": {"adapters": [*md["spec"]["adapters"], added]}}
    kube.kubectl("patch", "md", "api-assistant", "-n", ns, "--type=merge", "-p", json.dumps(patch))

    def serving(names: set[str]) -> dict[str, Any] | None:
        obj = kube.get_json("md", "api-assistant", "-n", ns)
        status = obj.get("status") or {}
        loaded = next(
            (c for c in status.get("conditions") or [] if c["type"] == "AdaptersLoaded"), {}
        )
        replicas = status.get("replicaAdapters") or []
        if loaded.get("status") == "True" and [set(r["adapters"]) for r in replicas] == [names]:
            return obj
        return None

    both = wait_for("the added adapter served", lambda: serving({"torchhub", "torchhub-v2"}), 180)
    assert both["status"]["revision"] == revision and both["status"]["phase"] == "Ready"
    assert json.loads(record.read_text())["pid"] == pid
    body["model"] = "api-assistant/torchhub-v2"
    assert chat(endpoint, body)["choices"][0]["message"]["content"].strip()
    # removed again: unloaded in place, a 404 for it
    kube.kubectl("patch", "md", "api-assistant", "-n", ns, "--type=merge",
                 "-p", json.dumps({"spec": {"adapters": md["spec"]["adapters"]}}))  # fmt: skip
    wait_for("the adapter removed", lambda: serving({"torchhub"}), 180)
    models = json.loads(urllib.request.urlopen(f"{endpoint}/models", timeout=30).read())
    assert {m["id"] for m in models["data"]} == {"api-assistant", "api-assistant/torchhub"}
    assert json.loads(record.read_text())["pid"] == pid
