"""PromptProfile revisions that are tested before they are served, through the operator
(local runtime) and a real ModelDeployment (SmolLM2): with ``tests.gate`` a revision whose
cases fail is not served (the deployment keeps the last one that passed, and a condition
names the failing case); ``tailor prompt rollback`` pins an older revision, which the
deployment then serves; ``tailor prompt diff`` shows what changed.

The passing revision constrains answers to a JSON schema (responseFormat), so its case
passes whatever the small model prefers; the failing one drops the format, so the same
case (the answer must validate against that schema) fails on the model's free prose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tailor.devcluster.kube import Kube
from tests.e2e.helpers import chat, wait_for, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]

VERDICT = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def profile(system: str, constrained: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "system": system,
        "parameters": {"temperature": 0, "maxTokens": 48},
        "tests": {
            "deploymentRef": {"name": "judge"},
            "gate": True,
            "cases": [
                {
                    "name": "says-yes-or-no",
                    "input": {"question": "Is the sky blue on a clear day?"},
                    "expect": {"jsonSchema": VERDICT},
                }
            ],
        },
    }
    if constrained:
        spec["responseFormat"] = {"type": "json_schema", "schema": VERDICT}
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "PromptProfile",
        "metadata": {"name": "judge-prompt"},
        "spec": spec,
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def ask(endpoint: str) -> str:
    body = {
        "model": "judge",
        "messages": [{"role": "user", "content": "Is water wet?"}],
        "temperature": 0,
        "max_tokens": 48,
    }
    return str(chat(endpoint, body)["choices"][0]["message"]["content"])


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), VERDICT)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def tailor_cli(kube: Kube, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tailor.cli", "prompt", *args],
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_failing_revision_is_not_served_and_a_rollback_serves_the_pinned_one(
    kube: Kube, namespace: str, local_operator: Path
) -> None:
    ns = namespace
    md = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "judge"},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "promptProfileRef": {"name": "judge-prompt"},
            "cache": {"enabled": False},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    kube.apply([profile("Answer yes or no.", constrained=True), md], "-n", ns)

    def served(revision: int) -> Any:
        pp = kube.get_json("pp", "judge-prompt", "-n", ns)
        return (
            pp
            if ((pp.get("status") or {}).get("served") or {}).get("revision") == revision
            else None
        )

    pp = wait_for("revision 1 tested and served", lambda: served(1))
    assert pp["status"]["tests"]["summary"] == "1/1" and pp["status"]["lastPassed"] == 1
    assert pp["status"]["served"]["reason"] == "LastPassed"
    wait_phase(kube, ns, "md", "judge", {"Ready"}, timeout=600)

    def endpoint() -> str:  # (a local runtime's replica gets a new port when it rolls)
        return str(kube.get_json("md", "judge", "-n", ns)["status"]["endpoint"])

    def serving(check: Any) -> Any:
        try:
            text = ask(endpoint())
        except (OSError, KeyError):  # the deployment is rolling
            return None
        return text if check(text) else None

    wait_for("revision 1 answers", lambda: serving(valid))

    # Revision 2 drops the format: its case fails, so it is not served.
    kube.apply(profile("Answer yes or no, and explain why.", constrained=False), "-n", ns)

    def failed() -> Any:
        pp = kube.get_json("pp", "judge-prompt", "-n", ns)
        tests = condition(pp, "TestsPassed")
        status = pp.get("status") or {}
        if status.get("revision") == 2 and tests.get("reason") == "TestsFailed":
            return pp
        return None

    pp = wait_for("revision 2 tested", failed)
    assert "says-yes-or-no" in condition(pp, "TestsPassed")["message"]
    assert pp["status"]["tests"]["failed"] == 1 and pp["status"]["served"]["revision"] == 1
    case = pp["status"]["tests"]["cases"][0]
    assert not case["passed"] and case["answer"]  # the model's free answer, kept for review
    assert valid(ask(endpoint()))  # still revision 1

    diff = tailor_cli(kube, "diff", "judge-prompt", "1", "2", "-n", ns)
    assert '-  "responseFormat"' in diff and "explain why" in diff

    # Rollback to revision 2 anyway (a pin wins over the gate): it is served.
    assert "revision 2 pinned" in tailor_cli(kube, "rollback", "judge-prompt", "2", "-n", ns)
    pp = wait_for("revision 2 pinned", lambda: served(2))
    assert pp["status"]["served"]["reason"] == "Pinned"
    assert pp["status"]["revision"] == 2  # no new revision for the pin
    wait_for("revision 2 answers", lambda: serving(lambda text: not valid(text)))
    history = tailor_cli(kube, "history", "judge-prompt", "-n", ns)
    assert "Pinned" in history

    tailor_cli(kube, "rollback", "judge-prompt", "--clear", "-n", ns)
    wait_for("back to the last passed", lambda: served(1))
