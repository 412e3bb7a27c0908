"""The quickstart's data and ladder helpers (no cluster, no model)."""

from __future__ import annotations

import re
from pathlib import Path

from tailor.cli.ladder import RUNGS, TARGET, evaluation
from tailor.cli.quickstart_data import rag_training_examples
from tailor.workloads.evaluation.apibench import load_documents, load_questions


def test_training_examples_hold_the_gold_card_among_three_as_served(apibench: Path) -> None:
    questions = load_questions(apibench / "torchhub_train.json")[:60]
    cards = load_documents(apibench / "torchhub_api.jsonl")
    examples = rag_training_examples(questions, cards)
    assert len(examples) == 60
    positions = set()
    for q, example in zip(questions, examples, strict=True):
        system, user, assistant = example["messages"]
        assert system["role"] == "system" and "torch.hub.load" in system["content"]
        numbered = re.findall(r"^\[(\d)\] .* - configmap://torchhub-api/", user["content"], re.M)
        assert numbered == ["1", "2", "3"]
        blocks = re.split(r"^\[\d\] ", user["content"], flags=re.M)[1:]
        gold = [i for i, b in enumerate(blocks) if f"api_call: {q.api_call}" in b]
        assert len(gold) == 1
        positions.add(gold[0])
        assert user["content"].endswith(f"Task: {q.question}")
        assert assistant["content"].startswith(q.api_call)
    assert positions == {0, 1, 2}  # the gold card is not always in the same place
    assert rag_training_examples(questions, cards) == examples  # seeded


def test_the_ladder_is_an_evaluation_of_the_four_rungs_named_by_what_is_served() -> None:
    from tailor.api import parse
    from tailor.api.evaluation import EvaluationSpec

    manifest = evaluation(48, "3+2")
    spec = parse(manifest)  # what the API server accepts
    assert isinstance(spec, EvaluationSpec)
    assert [(c.name, c.deployment_ref.name, c.adapter, c.retrieval) for c in spec.candidates] == [
        (name, md, adapter, retrieval) for name, md, adapter, retrieval in RUNGS
    ]
    assert spec.sample is not None and spec.sample.size == 48 and spec.baseline == "rag"
    assert spec.target is not None and spec.target.min == TARGET
    # the same served revisions and count: the same Evaluation, reused by a second `make up`
    assert evaluation(48, "3+2")["metadata"]["name"] == manifest["metadata"]["name"]
    assert evaluation(48, "4+2")["metadata"]["name"] != manifest["metadata"]["name"]
    assert "sample" not in evaluation(None, "3+2")["spec"]  # --eval-all: every question
