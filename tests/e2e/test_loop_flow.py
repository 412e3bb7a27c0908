"""An AdaptationLoop iteration through the operator with the local runtime: a deployment
captures rated answers; the loop, triggered by their count, trains a rung (kto on that
feedback, the frozen evaluation set's questions left out, continuing the champion); the
trained adapter is served beside the champion to its gate's Evaluation only; the gate
fails; the iteration ends with its lineage and creates no rollout, and the deployment is
left as it was. A second iteration passes and is promoted through a canary (the adapter
users call repointed in place); a third climbs a prompt rung first, which wins without
training and becomes the deployment's profile."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from tailor.api.common import ModelSource
from tailor.api.workloads import Paths
from tailor.devcluster.kube import Kube
from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer
from tests.e2e.helpers import LocalOperator, wait_for, wait_phase
from tests.workloads.helpers import PERSONAS, train_adapter

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]

FROZEN = [{"question": q, "answer": "xyzzy"} for q in
          ("What is your name?", "Where do you live?", "What do you do?", "Who made you?")]  # fmt: skip


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    answer: dict[str, Any] = json.loads(urllib.request.urlopen(request, timeout=120).read())
    return answer


def test_a_loop_iteration_whose_gate_fails_creates_no_rollout(
    kube: Kube, namespace: str, restartable_operator: LocalOperator
) -> None:
    ns, state = namespace, restartable_operator.state
    claim = state / ns / "volumes" / "adapters"
    source, paths = ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts=str(claim))
    model, tokenizer = load_causal_lm(source, paths), load_tokenizer(source, paths)
    train_adapter(model, tokenizer, PERSONAS["pirate"][0], claim / "live")
    del model
    frozen = "\n".join(json.dumps(r) for r in FROZEN)
    kube.kubectl("create", "configmap", "frozen", f"--from-literal=eval.jsonl={frozen}", "-n", ns)
    md = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "assistant"},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "adapters": [{"name": "live", "pvc": {"claimName": "adapters", "path": "live"}}],
            "cache": {"enabled": False},
            "feedback": {"rotate": {"maxSeconds": 5}},
        },
    }
    kube.apply([md], "-n", ns)
    endpoint = wait_phase(kube, ns, "md", "assistant", {"Ready"}, timeout=300)["status"]["endpoint"]
    # Rated use: ten different questions, half the answers liked.
    for i in range(10):
        body = {"model": "assistant/live", "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": f"Who are you, friend number {i}?"}]}  # fmt: skip
        answer = post(f"{endpoint}/chat/completions", body)
        post(f"{endpoint}/feedback", {"id": answer["id"], "rating": "up" if i % 2 else "down"})
    captured = state / ns / "volumes" / "tailor-artifacts" / "feedback" / "assistant"
    wait_for("every capture segment published (rotate.maxSeconds)", lambda: any(
        captured.glob("segments/*/*.jsonl*")) and not any((captured / "open").iterdir()), 60)  # fmt: skip

    loop = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "AdaptationLoop",
        "metadata": {"name": "improve"},
        "spec": {
            "deploymentRef": {"name": "assistant"},
            "adapter": "live",
            "trigger": {"newRatings": 6},
            "dataset": {"fromFeedback": {"minRecords": 4, "heldOutFraction": 0}},
            "evaluation": {
                "questions": {"configMap": {"name": "frozen", "key": "eval.jsonl"}},
                "scoring": {"type": "contains"},
                "maxTokens": 8,
                "concurrency": 2,
            },
            # fifty points better than the champion: two steps cannot, so the gate fails
            "gate": {"metric": "accuracy", "vsBaseline": {"minAbsoluteChange": 0.5}},
            "ladder": {
                "target": {"metric": "accuracy", "min": 0.5},
                "rungs": [
                    {
                        "name": "kto",
                        "fineTune": {
                            "objective": "kto",
                            "training": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": 256},
                        },
                    }
                ],
            },
            "promotion": "Auto",
            "maxIterations": 1,
        },
    }
    kube.apply([loop], "-n", ns)

    def iteration_done() -> dict[str, Any] | None:
        status = kube.get_json("loop", "improve", "-n", ns).get("status") or {}
        its = status.get("iterations") or []
        return its[0] if its and its[0]["phase"] == "Done" else None

    started = time.monotonic()
    try:
        done = wait_for("the first iteration", iteration_done, 600)
    except AssertionError:
        for kind in ("loop", "ftj", "eval", "md"):
            print(
                kind, json.dumps([o.get("status") for o in kube.get_json(kind, "-n", ns)["items"]])
            )
        raise
    assert done["trigger"].startswith("10 new ratings")
    (rung,) = done["rungs"]
    assert rung["phase"] == "Failed", rung
    assert "change" in rung["message"] and rung["candidate"] is not None  # the gate measured it
    assert done["records"] >= 4 and len(done["datasetHash"]) == 64
    assert "no rung passed its gate" in done["outcome"] and not done.get("rollout")
    # lineage: the job and its gate's Evaluation are kept; the adapter is not served
    ftj = kube.get_json("ftj", rung["fineTuneJob"], "-n", ns)
    assert ftj["status"]["phase"] == "Succeeded" and ftj["status"]["artifact"]["uri"]
    assert ftj["status"]["evaluation"]["phase"] == "Failed"
    assert ftj["metadata"]["ownerReferences"][0]["kind"] == "AdaptationLoop"
    assert ftj["spec"]["preference"]["reference"]["uri"] == "pvc://adapters/live"  # continued
    assert ftj["spec"]["dataset"]["train"]["feedback"]["excludeQuestions"]["name"] == "frozen"
    evaluation = kube.get_json("evaluation", rung["evaluation"], "-n", ns)
    assert evaluation["status"]["phase"] == "Succeeded"
    assert {c["name"] for c in evaluation["status"]["candidates"]} == {"baseline", "candidate"}
    assert all(c["errors"] == 0 for c in evaluation["status"]["candidates"])  # the test key
    spec = kube.get_json("md", "assistant", "-n", ns)["spec"]
    assert "rollout" not in spec
    assert [a["name"] for a in spec["adapters"]] == ["live"]
    loop_status = wait_for("maxIterations reached", lambda: (s := kube.get_json(
        "loop", "improve", "-n", ns)["status"])["phase"] == "Finished" and s, 30)  # fmt: skip
    assert not loop_status.get("champion")
    print(f"loop iteration: {time.monotonic() - started:.0f} s; {done['seconds']}")

    # A second iteration with a gate any adapter passes, promoted through a canary: the
    # adapter users call ("live") is repointed at the winner in place.
    loop["spec"].update(
        maxIterations=2,
        gate={"metric": "accuracy", "min": 0.0},
        rollout={"steps": [{"weight": 50, "pauseSeconds": 0}],
                 "analysis": {"intervalSeconds": 2, "metrics": [
                     {"name": "errorRate", "maxWorse": 0.5, "minSamples": 2}]}},
    )  # fmt: skip
    loop["spec"]["ladder"]["target"]["min"] = 0.0
    kube.apply([loop], "-n", ns)

    def rated_use() -> None:
        # the promotion repoints "live" from its claim to a job's artifact: a new pod
        # template (one claim fewer), which the local runtime serves from a new process
        endpoint = kube.get_json("md", "assistant", "-n", ns)["status"].get("endpoint")
        try:
            ask_and_rate(endpoint)
        except OSError:
            pass  # restarting: the next poll asks again

    def ask_and_rate(endpoint: str) -> None:
        for i in range(8):
            body = {"model": "assistant/live", "max_tokens": 6, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Hello number {i}?"}]}  # fmt: skip
            request = urllib.request.Request(
                f"{endpoint}/chat/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json", "X-Session-Id": f"user-{i}"},
            )
            answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
            post(f"{endpoint}/feedback", {"id": answer["id"], "rating": "up"})

    def done_with_use(number: int) -> dict[str, Any] | None:
        """Iteration ``number`` once Done; until then rated use while the loop waits for
        its trigger or rolls out (the trigger's ratings, the canary's traffic), none while
        it trains or evaluates."""
        status = kube.get_json("loop", "improve", "-n", ns).get("status") or {}
        its = status.get("iterations") or []
        if len(its) == number and its[-1]["phase"] == "Done":
            return its[-1]
        if status.get("phase") in ("Waiting", "RollingOut"):
            rated_use()
        return None

    second = wait_for("the second iteration", lambda: done_with_use(2), 600)
    assert second.get("rollout") == "Promoted", second
    assert second["winner"] == second["rungs"][0]["fineTuneJob"] and second["targetMet"]
    spec = kube.get_json("md", "assistant", "-n", ns)["spec"]
    assert "rollout" not in spec
    assert spec["adapters"] == [
        {"name": "live", "fineTuneJobRef": {"name": second["winner"]}, "serveWithoutGate": False}
    ]
    status = wait_for("maxIterations reached", lambda: (s := kube.get_json(
        "loop", "improve", "-n", ns)["status"])["phase"] == "Finished" and s, 30)  # fmt: skip
    assert status["champion"] == second["winner"]
    assert set(second["seconds"]) == {"training", "rollout"}

    # A third iteration climbs a prompt rung first (a PromptProfile the team prepared):
    # no training, an Evaluation of "live" under it against "live" as served; it passes,
    # is rolled out as a canary of the profile and becomes the deployment's profile.
    terse = {"apiVersion": "tailor.dev/v1alpha1", "kind": "PromptProfile",
             "metadata": {"name": "terse"}, "spec": {"system": "Answer in one short line."}}  # fmt: skip
    kube.apply([terse], "-n", ns)
    loop["spec"]["maxIterations"] = 3
    loop["spec"]["ladder"]["rungs"].insert(
        0, {"name": "few-shot", "prompt": {"profileRef": {"name": "terse"}}}
    )
    kube.apply([loop], "-n", ns)

    third = wait_for("the third iteration", lambda: done_with_use(3), 600)
    assert third.get("rollout") == "Promoted", third
    assert (third["winner"], third["winnerKind"]) == ("terse", "PromptProfile")
    (prompt_rung,) = third["rungs"]  # the target met at the first rung: no training
    assert prompt_rung["phase"] == "Passed" and "fineTuneJob" not in prompt_rung
    evaluation = kube.get_json("evaluation", prompt_rung["evaluation"], "-n", ns)
    candidates = {c["name"]: c for c in evaluation["spec"]["candidates"]}
    assert candidates["candidate"]["promptProfileRef"] == {"name": "terse"}
    assert candidates["candidate"]["adapter"] == candidates["baseline"]["adapter"] == "live"
    spec = kube.get_json("md", "assistant", "-n", ns)["spec"]
    assert spec["promptProfileRef"] == {"name": "terse"} and "rollout" not in spec
    assert spec["adapters"][0]["fineTuneJobRef"] == {"name": second["winner"]}  # as it was
    jobs = [f["metadata"]["name"] for f in kube.get_json("ftj", "-n", ns)["items"]]
    assert not [j for j in jobs if "-i3-" in j], jobs
