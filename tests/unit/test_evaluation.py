"""The Evaluation's pure parts: its statistics (against values worked out by hand), the
recommendation rule, the question records each scorer accepts, and the Job it runs as.
The run itself, on a real deployment through the operator and killed half-way:
tests/e2e/test_local_flow.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor.api import parse
from tailor.api.evaluation import CandidateResult, EvaluationSpec, Interval, Scoring
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import CandidateTarget, Paths
from tailor.builders.common import Parent, Program
from tailor.builders.evaluation import build_evaluation
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.measure import recommend, sample
from tailor.workloads.evaluation.scoring import load_items, scorer
from tailor.workloads.evaluation.stats import mcnemar_exact, share_interval

ROOT = Path(__file__).resolve().parents[2]
CALL = "torch.hub.load(repo_or_dir='pytorch/vision', model='resnet50', pretrained=True)"


def example() -> EvaluationSpec:
    spec = parse(yaml.safe_load((ROOT / "docs/examples/evaluation.yaml").read_text()))
    assert isinstance(spec, EvaluationSpec)
    return spec


def test_mcnemar_is_the_exact_binomial_tail_of_the_disagreements() -> None:
    # 6 disagreements, all one way: 2 * (1/2)^6
    assert mcnemar_exact([True] * 6 + [False] * 4, [False] * 6 + [False] * 4) == 0.03125
    # b = 1, c = 4: 2 * (C(5,0) + C(5,1)) / 32 = 0.375
    base = [True, False, False, False, False, True]
    cand = [False, True, True, True, True, True]
    assert mcnemar_exact(base, cand) == 0.375
    assert mcnemar_exact([True, False], [True, False]) == 1.0  # no disagreement
    assert mcnemar_exact([True] * 3 + [False] * 3, [False] * 3 + [True] * 3) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_the_bootstrap_interval_holds_the_share_narrows_with_n_and_is_seeded() -> None:
    small = [True] * 12 + [False] * 36
    value, low, high = share_interval(small, seed=1)
    assert value == 0.25 and low < 0.25 < high
    assert 0.10 < high - low < 0.30  # about +-12 points at n = 48
    big = small * 10
    _, big_low, big_high = share_interval(big, seed=1)
    assert big_high - big_low < (high - low) / 2.5
    assert share_interval(small, seed=1) == (value, low, high)  # the same seed, the same interval
    assert share_interval([True] * 5) == (1.0, 1.0, 1.0)
    assert share_interval([]) == (0.0, 0.0, 0.0)


def result(name: str, low: float, value: float, cost: float, p50: float = 1.0) -> CandidateResult:
    return CandidateResult(
        name=name,
        scored=48,
        accuracy=Interval(value=value, low=low, high=min(1.0, value + 0.1)),
        cost_per_query=cost,
        latency_p50_seconds=p50,
    )


def test_the_recommendation_is_the_cheapest_whose_lower_bound_meets_the_target() -> None:
    spec = example()  # target: accuracy >= 0.4 at the lower bound
    measured = [
        result("zero-shot", 0.10, 0.20, 0.5),
        result("rag", 0.41, 0.50, 1.0),
        result("lora-rag", 0.55, 0.65, 2.0),
    ]
    picked = recommend(spec, measured)
    assert picked is not None and picked.candidate == "rag"
    assert "the cheapest of 2 that do" in picked.message
    # a higher value whose interval reaches below the bar does not count
    measured[1] = result("rag", 0.35, 0.50, 1.0)
    assert recommend(spec, measured).candidate == "lora-rag"  # type: ignore[union-attr]
    none = recommend(spec, [result("zero-shot", 0.10, 0.20, 0.5), result("rag", 0.3, 0.38, 1.0)])
    assert none is not None and none.candidate is None
    assert (
        none.message.startswith("none meets accuracy >= 0.4") and "the best is rag" in none.message
    )
    assert recommend(spec.model_copy(update={"target": None}), measured) is None


def test_question_records_are_checked_against_what_the_scorer_needs(tmp_path: Path) -> None:
    paths = Paths(artifacts=str(tmp_path))
    spec = example()
    apibench = spec.scoring

    def items(records: list[Any], scoring: Scoring) -> Any:
        source = spec.questions.model_copy(update={"config_map": None, "inline": records})
        return load_items(source, paths, scoring)

    good = items([{"question": "Classify images", "apiCall": CALL, "id": "q1"}], apibench)
    assert good[0].domain == "Classification" and good[0].id == "q1"
    verdict = scorer(apibench)(f"Use {CALL}", good[0])
    assert verdict.correct and verdict.exact and not verdict.hallucination
    with pytest.raises(WorkloadError, match=r"inline\[0\]: scoring apibench needs apiCall"):
        items([{"question": "Classify images", "apiCall": "not.an.api()"}], apibench)
    contains = Scoring(type="contains")
    with pytest.raises(WorkloadError, match=r"inline\[1\]: scoring contains needs the gold"):
        items([{"question": "a", "answer": "x"}, {"question": "b"}], contains)
    with pytest.raises(WorkloadError, match="used twice"):
        items([{"question": "a", "answer": "x"}, {"question": "a", "answer": "y"}], contains)
    with pytest.raises(WorkloadError, match="not a regular expression"):
        items([{"question": "a", "answer": "(unclosed"}], Scoring(type="regex"))
    # chat records (a feedback source's sft format): the last user and assistant turns
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}  # fmt: skip
    (item,) = items([chat], contains)
    assert (item.question, item.answer) == ("2+2?", "4")
    assert scorer(contains)("##Answer: it is 4.", item).correct
    schema = Scoring(type="jsonSchema", json_schema={"type": "object", "required": ["a"]})
    (free,) = items([{"question": "q"}], schema)
    assert scorer(schema)('{"a": 1}', free).correct and not scorer(schema)("{}", free).correct
    # a seeded sample: the same questions for the same seed, in the source's order
    many = items([{"question": f"q{i}", "answer": "x"} for i in range(30)], contains)
    sized = spec.model_copy(update={"sample": spec.sample.model_copy(update={"size": 5})})  # type: ignore[union-attr]
    chosen = sample(many, sized)
    assert len(chosen) == 5 and chosen == sample(many, sized)
    assert [many.index(c) for c in chosen] == sorted(many.index(c) for c in chosen)


def test_an_evaluation_runs_as_one_retried_job_on_the_artifacts_claim() -> None:
    spec = example()
    parent = Parent(kind="Evaluation", name="ladder", namespace="ns", uid="uid-1", generation=1)
    targets = {
        c.name: CandidateTarget(
            base_url="http://api-assistant.ns.svc:8000/v1",
            model="api-assistant",
            retrieval=c.retrieval,
            devices=2.0,
            api_key_secret_ref={"name": "keys", "key": "api"},
        )
        for c in spec.candidates
    }
    workload = build_evaluation(spec, parent, OperatorSettings(), targets)
    kinds = {m["kind"]: m for m in workload.manifests}
    job = kinds["Job"]
    assert workload.module == Program.EVALUATION and job["spec"]["backoffLimit"] == 3
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == "tailor-artifacts"
    assert any(v.get("secret", {}).get("secretName") == "keys" for v in volumes.values())
    assert any(v.get("configMap", {}).get("name") == "torchhub-eval" for v in volumes.values())
    container = pod["containers"][0]
    assert container["resources"]["limits"]["memory"]  # bounded, like every pod
    assert workload.run.output_dir.endswith("/evaluation/ladder/uid-1")
    assert kinds["Role"]["rules"][0]["resourceNames"] == ["ladder"]


def test_tailor_eval_run_builds_the_evaluation_its_flags_describe() -> None:
    import argparse

    from tailor.cli.eval import evaluation_manifest

    args = argparse.Namespace(
        name="ladder", namespace="team-a", questions="configmap://torchhub-eval/eval.jsonl",
        scoring="apibench:torchhub", baseline="rag", target="accuracy=0.4", sample=48,
        concurrency=4, max_tokens=64,
        candidate=["zero=api-assistant:noretrieval", "rag=api-assistant",
                   "lora=api-assistant/torchhub"],
    )  # fmt: skip
    spec = evaluation_manifest(args)["spec"]
    assert spec["questions"] == {"configMap": {"name": "torchhub-eval", "key": "eval.jsonl"}}
    assert spec["candidates"] == [
        {"name": "zero", "deploymentRef": {"name": "api-assistant"}, "retrieval": False},
        {"name": "rag", "deploymentRef": {"name": "api-assistant"}},
        {"name": "lora", "deploymentRef": {"name": "api-assistant"}, "adapter": "torchhub"},
    ]
    assert spec["target"] == {"metric": "accuracy", "min": 0.4} and spec["sample"] == {"size": 48}
    # the API server's rules, before anything is sent
    with pytest.raises(SystemExit, match=r"spec\.baseline: baseline must be the name of one"):
        evaluation_manifest(argparse.Namespace(**{**vars(args), "baseline": "ragg"}))
    with pytest.raises(SystemExit, match="write NAME=DEPLOYMENT"):
        evaluation_manifest(argparse.Namespace(**{**vars(args), "candidate": ["api-assistant"]}))


def test_a_finished_evaluation_is_exported_as_operator_metrics() -> None:
    from prometheus_client import REGISTRY

    from tailor.controllers.evaluation import export_results

    status = {
        "candidates": [
            {"name": "rag", "scored": 4, "accuracy": {"value": 0.5, "low": 0.25, "high": 0.75},
             "costPerQuery": 1.5},
        ]
    }  # fmt: skip
    export_results("team-a", "ladder", status)

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"namespace": "team-a", "evaluation": "ladder",
                                                "candidate": "rag", **labels})  # fmt: skip

    assert sample("tailor_operator_evaluation_score", metric="accuracy", bound="low") == 0.25
    assert sample("tailor_operator_evaluation_score", metric="accuracy", bound="high") == 0.75
    assert sample("tailor_operator_evaluation_score", metric="exact", bound="value") is None
    assert sample("tailor_operator_evaluation_cost_per_query_device_seconds") == 1.5


def finished(name: str, outcomes: dict[str, str], digest: str = "h") -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"scoring": {"type": "contains"}},
        "status": {"phase": "Succeeded", "questions": 6, "questionsHash": digest,
                   "outcomes": outcomes},
    }  # fmt: skip


def test_tailor_eval_compare_pairs_two_evaluations_question_by_question() -> None:
    from tailor.cli.eval import compare

    before = finished("before", {"rag": "110000", "lora": "11-000"})
    after = finished("after", {"rag": "111111", "lora": "110000"})
    text = compare(before, after, None)
    rag = next(line for line in text.splitlines() if line.strip().startswith("rag"))
    # 6 paired, 33.3 -> 100.0, four disagreements all one way: p = 2 / 16
    assert rag.split() == ["rag", "6", "33.3", "100.0", "+66.7", "0.1250"]
    lora = next(line for line in text.splitlines() if line.strip().startswith("lora"))
    assert lora.split()[1] == "5"  # the question lora left unanswered in `before` is not paired
    named = compare(before, after, [("lora", "rag")])
    assert "lora / rag" in named
    with pytest.raises(SystemExit, match="asked different questions"):
        compare(before, finished("other", {"rag": "1"}, digest="x"), None)
    with pytest.raises(SystemExit, match="has not succeeded"):
        compare(before, {**after, "status": {"phase": "Running"}}, None)


def test_the_termination_message_fits_what_kubernetes_keeps() -> None:
    from tailor.workloads.evaluation.measure import TERMINATION_BYTES, termination_report

    row = result("a-rather-long-candidate-name", 0.41, 0.5, 1.0).wire()
    patch = {"questions": 48, "questionsHash": "h" * 64, "report": {"uri": "pvc://x/"},
             "recommendation": {"message": "m" * 200}, "outcomes": {"x": "1" * 48},
             "candidates": [row]}  # fmt: skip
    small = termination_report(patch)
    assert "outcomes" not in small and small["candidates"] == [row]  # outcomes: status only
    big = termination_report({**patch, "candidates": [row] * 40})
    assert "candidates" not in big and big["report"] == {"uri": "pvc://x/"}
    assert len(json.dumps(big)) <= TERMINATION_BYTES


def test_the_judge_counts_a_preference_only_when_both_orders_agree() -> None:
    from tailor.workloads.evaluation.judge import COMPARE, GRADE, agreed, parse, preference

    # (candidate first, baseline first): "A" then "B" both name the candidate
    assert preference("A", "B") == 1.0 and agreed("A", "B")
    assert preference("B", "A") == 0.0 and agreed("B", "A")
    assert preference("A", "A") == 0.5 and not agreed("A", "A")  # the first place won twice
    assert preference("tie", "tie") == 0.5 and agreed("tie", "tie")
    assert preference("A", None) is None and not agreed(None, "B")
    assert parse('{"verdict": "pass"}', GRADE) == "pass"
    assert parse('{"better": "C"}', COMPARE) is None and parse("A is better", COMPARE) is None
