"""The quickstart's data and ladder helpers (no cluster, no model)."""

from __future__ import annotations

import re
from pathlib import Path

from tailor.cli.ladder import chart, eval_questions
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


def test_eval_subset_is_spread_over_the_file(apibench: Path) -> None:
    every = load_questions(apibench / "torchhub_eval.json")
    subset = eval_questions(apibench, 48)
    assert len(subset) == 48 and subset[0] == every[0] and subset[-1] != every[47]
    assert eval_questions(apibench, None) == every


def test_the_chart_is_a_png(tmp_path: Path) -> None:
    row = {"accuracy": 0.5, "exact": 0.1, "hallucination": 0.3, "costDeviceSecondsPerQuery": 0.4}
    assert chart({"zero-shot": row, "LoRA + RAG": {**row, "accuracy": 0.9}}, tmp_path / "l.png")
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
