"""A FineTuneJob's evaluation gate: the verdict on an Evaluation's two results
(controllers/gate.py) and the gate's rules."""

from __future__ import annotations

from typing import Any

import pytest

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.evaluation import Gate
from tailor.controllers.gate import verdict


def result(accuracy: float, p: float | None = None, **more: float) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": {"value": accuracy, "low": 0, "high": 1}}
    out |= {k: {"value": v, "low": 0, "high": 1} for k, v in more.items()}
    return out | ({"pValue": p} if p is not None else {})


def gate(**body: Any) -> Gate:
    return Gate.model_validate(body)


def test_min_and_the_change_against_the_baseline() -> None:
    passed = verdict(gate(metric="accuracy", min=0.5), result(0.6), result(0.4))
    assert passed["phase"] == "Passed" and passed["candidate"] == 0.6
    low = verdict(gate(metric="accuracy", min=0.5), result(0.45), result(0.4))
    assert low["phase"] == "Failed" and "accuracy 0.45 (min 0.5)" in low["message"]
    better = gate(metric="exact", vsBaseline={"minAbsoluteChange": 0.05})
    small = verdict(better, result(0.5, exact=0.33), result(0.5, exact=0.3))
    assert small["phase"] == "Failed" and small["change"] == 0.03
    enough = verdict(better, result(0.5, exact=0.4), result(0.5, exact=0.3))
    assert enough["phase"] == "Passed" and enough["baseline"] == 0.3


def test_a_paired_test_needs_a_significant_improvement() -> None:
    tested = gate(
        metric="accuracy", vsBaseline={"minAbsoluteChange": 0, "pairedTest": {"alpha": 0.05}}
    )
    assert verdict(tested, result(0.7, p=0.01), result(0.5))["phase"] == "Passed"
    assert verdict(tested, result(0.7, p=0.2), result(0.5))["phase"] == "Failed"
    worse = verdict(tested, result(0.3, p=0.01), result(0.5))  # significant, the wrong way
    assert worse["phase"] == "Failed" and worse["pValue"] == 0.01
    assert verdict(tested, {}, result(0.5))["phase"] == "Failed"  # nothing measured


@pytest.mark.parametrize(
    ("evaluation", "field"),
    [
        ({"gate": {"metric": "accuracy"}}, "spec.evaluation.gate.min"),
        ({"gate": {"metric": "exact", "min": 0.3}}, "spec.evaluation.gate.metric"),
        (
            {
                "gate": {"metric": "exact", "vsBaseline": {"pairedTest": {}}},
                "scoring": {"type": "apibench", "corpus": "torchhub"},
            },
            "spec.evaluation.gate.vsBaseline.pairedTest",
        ),
    ],
)
def test_gate_rules_name_the_field(evaluation: dict[str, Any], field: str) -> None:
    spec = {
        "baseModel": {"builtin": "smollm2-135m-instruct"},
        "dataset": {"train": {"configMap": {"name": "d", "key": "train.jsonl"}}},
        "evaluation": {
            "deploymentRef": {"name": "md"},
            "questions": {"configMap": {"name": "q", "key": "eval.jsonl"}},
            "scoring": {"type": "contains"},
            **evaluation,
        },
    }
    with pytest.raises(ManifestError) as error:
        parse_spec(KINDS["FineTuneJob"], spec)
    assert any(line.startswith(field) for line in error.value.lines), error.value.lines
