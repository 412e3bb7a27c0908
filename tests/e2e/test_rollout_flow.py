"""A ModelDeployment's rollouts through the operator with the local runtime: the real API
server, the real operator (killed and started again mid-rollout) and one real server
process serving two persona adapters, recognisable by their answers.

In order, on one deployment: a canary whose users rate the candidate down is rolled back
by itself, and every user is answered by the stable again; a new canary without traffic
holds (inconclusive, never a failure), the operator is SIGKILLed and restarted and the
rollout resumes at the same step with no new child or server process, then with ratings
it walks its steps and is promoted; a shadow rollout's candidate answers copies of the
traffic the users never see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from tailor.api.common import ModelSource
from tailor.api.workloads import Paths
from tailor.devcluster.kube import Kube
from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer
from tests.e2e.helpers import LocalOperator, wait_for, wait_phase
from tests.workloads.helpers import PERSONAS, QUESTION, train_adapter

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]

NAME = "assistant"
SESSIONS = 20


def deployment(rollout: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "adapters": [
                {"name": n, "pvc": {"claimName": "adapters", "path": n}} for n in PERSONAS
            ],
            "cache": {"enabled": False},  # every answer is measured
            "rollout": {
                "stable": {"adapter": "pirate"},
                "candidate": {"adapter": "robot"},
                **rollout,
            },
        },
    }


def ask(endpoint: str, session: str) -> dict[str, Any]:
    body = {"model": f"{NAME}/pirate", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
    request = urllib.request.Request(
        f"{endpoint}/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "X-Session-Id": session},
    )
    answer: dict[str, Any] = json.loads(urllib.request.urlopen(request, timeout=120).read())
    return answer


def persona(answer: dict[str, Any]) -> str:
    text = answer["choices"][0]["message"]["content"]
    return next(name for name, (_, word) in PERSONAS.items() if word in text)


def rate(endpoint: str, answer: dict[str, Any], up: bool) -> None:
    body = json.dumps({"id": answer["id"], "rating": "up" if up else "down"}).encode()
    request = urllib.request.Request(
        f"{endpoint}/feedback", body, {"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=30).read()


def traffic(endpoint: str, like: set[str]) -> dict[str, str]:
    """One question per session, each answer rated up when its persona is in ``like``;
    the persona that answered each session."""
    answered = {}
    for i in range(SESSIONS):
        answer = ask(endpoint, f"user-{i}")
        answered[f"user-{i}"] = persona(answer)
        rate(endpoint, answer, answered[f"user-{i}"] in like)
    return answered


def rollout_of(kube: Kube, ns: str) -> dict[str, Any]:
    status: dict[str, Any] = kube.get_json("md", NAME, "-n", ns).get("status") or {}
    return status.get("rollout") or {}


def test_rollouts_roll_back_hold_resume_promote_and_shadow(
    kube: Kube, namespace: str, restartable_operator: LocalOperator
) -> None:
    ns, operator = namespace, restartable_operator
    claim = operator.state / ns / "volumes" / "adapters"
    source, paths = ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts=str(claim))
    model, tokenizer = load_causal_lm(source, paths), load_tokenizer(source, paths)
    for name, (answer, _) in PERSONAS.items():
        model = train_adapter(model, tokenizer, answer, claim / name)
    del model

    analysis = {"intervalSeconds": 2,
                "metrics": [{"name": "satisfaction", "maxWorse": 0.2, "minSamples": 3}]}  # fmt: skip
    # 1. A canary users like less than the stable: rolled back, by itself.
    kube.apply([deployment({"steps": [{"weight": 50, "pauseSeconds": 600}],
                            "analysis": analysis})], "-n", ns)  # fmt: skip
    endpoint = wait_phase(kube, ns, "md", NAME, {"Ready"}, timeout=300)["status"]["endpoint"]
    first = wait_for("the rollout's first step", lambda: rollout_of(kube, ns).get("id"), 60)
    answered = traffic(endpoint, like={"pirate"})
    assert set(answered.values()) == {"pirate", "robot"}  # both variants had users
    rolled = wait_for("the rollback", lambda: (r := rollout_of(kube, ns))["phase"] ==
                      "RolledBack" and r, 60)  # fmt: skip
    assert rolled["weight"] == 0 and "satisfaction" in rolled["message"]
    assert rolled["id"] == first
    (candidate,) = [v for v in rolled["variants"] if v["name"] == "candidate"]
    assert candidate["rated"] >= 3 and candidate["ratedUp"] == 0
    events = kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    assert "RolloutRolledBack" in events
    wait_for("every user on the stable again",
             lambda: set(traffic(endpoint, like=set()).values()) == {"pirate"}, 60)  # fmt: skip

    # 2. A new canary without traffic holds; the operator restarts mid-rollout.
    steps = [{"weight": 30, "pauseSeconds": 0}, {"weight": 60, "pauseSeconds": 0}]
    kube.apply([deployment({"steps": steps, "analysis": analysis})], "-n", ns)
    held = wait_for("the new rollout to hold", lambda: (r := rollout_of(kube, ns))
                    ["phase"] == "Holding" and r["id"] != first and r, 60)  # fmt: skip
    assert held["step"] == 0 and "satisfaction 0/3 samples" in held["message"]
    record = operator.state / ns / "runs" / f"{NAME}.json"
    server_pid = json.loads(record.read_text())["pid"]
    children = kube.kubectl("get", "configmaps,secrets", "-n", ns, "-o", "name").stdout
    operator.kill()
    operator.start()

    def measured_again() -> dict[str, Any] | None:
        """The status once the restarted operator has measured a probe: one session,
        so one variant only (the step still holds), sent until the replica counts it."""
        now = rollout_of(kube, ns)
        if sum(v.get("requests", 0) for v in now.get("variants") or []):
            return now
        rate(endpoint, ask(endpoint, "probe"), up=True)
        return None

    resumed = wait_for("the restarted operator's look at the rollout", measured_again, 60)
    assert resumed["phase"] == "Holding"
    assert (resumed["id"], resumed["step"], resumed["stepStarted"]) == (
        held["id"], held["step"], held["stepStarted"])  # fmt: skip
    assert json.loads(record.read_text())["pid"] == server_pid  # the same server
    assert kube.kubectl("get", "configmaps,secrets", "-n", ns, "-o", "name").stdout == children

    # ... and with ratings on both variants it walks its steps and is promoted.
    def promoted() -> dict[str, Any] | None:
        now = rollout_of(kube, ns)
        if now["phase"] != "Promoted":
            traffic(endpoint, like={"pirate", "robot"})
            return None
        return now

    done = wait_for("the promotion", promoted, 180)
    assert done["weight"] == 100 and done["message"].startswith("promoted after 2 steps")
    events = kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    assert "RolloutStep" in events and "RolloutPromoted" in events
    wait_for("every user on the candidate",
             lambda: set(traffic(endpoint, like=set()).values()) == {"robot"}, 60)  # fmt: skip

    # 3. A shadow rollout: the candidate answers copies; users see the stable only.
    shadow = {"mode": "shadow", "steps": [{"weight": 100, "pauseSeconds": 3600}],
              "analysis": {"intervalSeconds": 2}}  # fmt: skip
    kube.apply([deployment(shadow)], "-n", ns)
    wait_for("the shadow rollout", lambda: rollout_of(kube, ns).get("id") not in
             (first, done["id"]), 60)  # fmt: skip
    wait_for("the replica routing by it", lambda: set(traffic(endpoint, like=set()).values())
             == {"pirate"}, 60)  # fmt: skip

    def copies() -> int:
        books = rollout_of(kube, ns).get("variants") or []
        return sum(int(v.get("requests", 0)) for v in books if v["name"] == "candidate")

    wait_for("the candidate's unseen answers", lambda: copies() >= SESSIONS // 2, 120)

    # The human in the loop: the status as a table, then an abort.
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
    tailor = [sys.executable, "-m", "tailor.cli", "rollout"]
    shown = subprocess.run([*tailor, "status", NAME, "-n", ns], env=env, check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "shadow rollout" in shown and "candidate" in shown and "check errorRate" in shown
    subprocess.run([*tailor, "abort", NAME, "-n", ns], env=env, check=True)
    aborted = wait_for("the abort", lambda: (r := rollout_of(kube, ns))["phase"] == "Aborted"
                       and r, 60)  # fmt: skip
    assert aborted["weight"] == 0 and "aborted" in aborted["message"]
    again = subprocess.run([*tailor, "abort", NAME, "-n", ns], env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode != 0 and "has ended already (Aborted)" in again.stderr

    # 4. A prompt-profile revision as the candidate (the same adapter under a profile that
    # enforces a JSON answer): it waits, naming the field, until the profile exists.
    profiled = {"candidate": {"adapter": "pirate", "promptProfileRef": {"name": "strict"}},
                "steps": [{"weight": 50, "pauseSeconds": 3600}],
                "analysis": {"intervalSeconds": 2}}  # fmt: skip
    kube.apply([deployment(profiled)], "-n", ns)

    def started() -> dict[str, Any]:
        conditions = (kube.get_json("md", NAME, "-n", ns).get("status") or {}).get("conditions")
        return next((c for c in conditions or [] if c["type"] == "RolloutStarted"), {})

    waiting = wait_for(
        "the rollout waiting for its profile",
        lambda: (c := started()).get("reason") == "PromptProfileNotFound" and c,
        60,
    )
    assert waiting["status"] == "False"
    assert "spec.rollout.candidate.promptProfileRef.name" in waiting["message"]
    strict = {"type": "object", "properties": {"v": {"enum": ["candidate"]}},
              "required": ["v"], "additionalProperties": False}  # fmt: skip
    kube.apply([{"apiVersion": "tailor.dev/v1alpha1", "kind": "PromptProfile",
                 "metadata": {"name": "strict"},
                 "spec": {"responseFormat": {"type": "json_schema", "schema": strict}}}],
               "-n", ns)  # fmt: skip

    def answered_by_variant() -> dict[str, set[str]] | None:
        seen: dict[str, set[str]] = {}
        for i in range(SESSIONS // 2):
            answer = ask(endpoint, f"user-{i}")
            text = answer["choices"][0]["message"]["content"]
            variant = (answer.get("tailor") or {}).get("variant", "none")
            seen.setdefault(variant, set()).add("json" if text.startswith("{") else persona(answer))
        return seen if set(seen) == {"stable", "candidate"} else None

    split = wait_for("the candidate's sessions answered under its profile", answered_by_variant, 90)
    assert split == {"stable": {"pirate"}, "candidate": {"json"}}
    assert started()["status"] == "True"
