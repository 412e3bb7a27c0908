"""The APIBench matcher and data helpers (no models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailor.workloads.apibench import answer_text, chat_example, load_questions, matches, parse_call

GOLD = "torch.hub.load(repo_or_dir='pytorch/vision', model='resnet50', pretrained=True)"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("model = torch.hub.load('pytorch/vision', 'resnet50', pretrained=True)", True),
        ('torch.hub.load("pytorch/vision:v0.10.0", "resnet50")', True),
        ("torch.hub.load(model='resnet50', repo_or_dir='PyTorch/Vision')", True),
        ("torch.hub.load('pytorch/vision', 'resnet18')", False),
        ("torch.hub.load('NVIDIA/DeepLearningExamples', 'resnet50')", False),
        ("Use ResNet-50 from pytorch/vision.", False),
        ("", False),
    ],
)
def test_matcher(answer: str, expected: bool) -> None:
    assert matches(answer, GOLD) is expected


def test_call_without_model_matches_on_the_repository() -> None:
    assert parse_call("torch.hub.load(repo_or_dir='pytorch/fairseq')") == ("pytorch/fairseq", "")
    assert matches(
        "torch.hub.load('pytorch/fairseq', 'transformer.wmt19.en-de')",
        "torch.hub.load(repo_or_dir='pytorch/fairseq')",
    )


def test_questions_and_chat_examples(apibench: Path) -> None:
    questions = load_questions(apibench / "torchhub_eval.json")
    assert len(questions) == 186
    assert all(q.question and not q.question.startswith("###") for q in questions)
    assert all(matches(answer_text(q), q.api_call) for q in questions)
    example = chat_example(questions[0])
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    train = load_questions(apibench / "torchhub_train.json")
    assert len(train) == 837 and all(matches(answer_text(q), q.api_call) for q in train)
