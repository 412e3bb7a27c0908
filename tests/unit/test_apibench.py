"""APIBench scoring as the RAFT paper does it (Gorilla's AST evaluation), the
``tailor eval apibench`` command, and the data helpers. No models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.cli import main as tailor
from tailor.workloads.evaluation.apibench import (
    Corpus,
    WorkloadError,
    answer_text,
    chat_example,
    extract_answer_call,
    find_calls,
    load_questions,
    score_files,
)

TORCHHUB = [
    {"api_name": "resnet50", "domain": "Classification",
     "api_call": "torch.hub.load(repo_or_dir='pytorch/vision', model='resnet50', pretrained=True)"},
    {"api_name": "resnet18", "domain": "Classification",
     "api_call": "torch.hub.load(repo_or_dir='pytorch/vision', model='resnet18', pretrained=True)"},
    {"api_name": "deeplabv3", "domain": "Semantic Segmentation",
     "api_call": "torch.hub.load(repo_or_dir='pytorch/vision', model='deeplabv3_mobilenet_v3_large', pretrained=True)"},
    # Not valid Python (positional after keyword), as in the real corpus: still matched.
    {"api_name": "meal_v2", "domain": "Classification",
     "api_call": "torch.hub.load(repo_or_dir='szq0214/MEAL-V2', 'meal_v2', model='mealv2_resnest50', pretrained=True)"},
]  # fmt: skip
GOLD = TORCHHUB[0]["api_call"]


@pytest.fixture
def corpus() -> Corpus:
    return Corpus.from_records((f"corpus:{i + 1}", r) for i, r in enumerate(TORCHHUB))


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # the gold API, in several spellings
        ("model = torch.hub.load('pytorch/vision', 'resnet50', pretrained=True)", "exact"),
        ('torch.hub.load("pytorch/vision:v0.10.0", "resnet50")', "exact"),
        ("torch.hub.load(model='resnet50', repo_or_dir='pytorch/vision')", "exact"),
        ("Load it with torch.hub.load('pytorch/vision', 'resnet50'), then call eval().", "exact"),
        # another real API of the question's domain: correct under the paper's metric
        ("torch.hub.load('pytorch/vision', 'resnet18', pretrained=True)", "correct"),
        ("torch.hub.load('szq0214/MEAL-V2', 'meal_v2', model='mealv2_resnest50')", "correct"),
        # a real API of another domain
        ("torch.hub.load('pytorch/vision', 'deeplabv3_mobilenet_v3_large', pretrained=True)", "wrong"),
        # invented or absent calls
        ("torch.hub.load('slow_r50', 'slow_r50_s')", "hallucination"),
        ("torch.hub.load('pytorch/vision', 'resnet51')", "hallucination"),
        ("torchvision.models.resnet50(pretrained=True)", "hallucination"),
        ("Use ResNet-50 from pytorch/vision.", "hallucination"),
        ("", "hallucination"),
        # Gorilla's own output form
        ("<<<domain>>>: Classification\n<<<api_call>>>: torch.hub.load('pytorch/vision', "
         "'resnet50', pretrained=True)\n<<<api_provider>>>: PyTorch\n<<<explanation>>>: ...",
         "exact"),
        # chain of thought: only the final answer counts, not the quoted documents
        ("##Reason: the document says ##begin_quote##api_call: torch.hub.load(repo_or_dir="
         "'pytorch/vision', model='resnet50')##end_quote##\n##Answer: model = torch.hub.load("
         "'pytorch/vision', 'resnet50', pretrained=True)", "exact"),
        ("##Reason: ##begin_quote##api_call: torch.hub.load(repo_or_dir='pytorch/vision', "
         "model='resnet50')##end_quote##\n##Answer: I do not know.", "hallucination"),
    ],
)  # fmt: skip
def test_torchhub_answers_score_as_gorilla_does(corpus: Corpus, reply: str, expected: str) -> None:
    verdict = corpus.score(reply, GOLD, "Classification")
    got = (
        "hallucination"
        if verdict.hallucination
        else "exact"
        if verdict.exact and verdict.correct
        else "correct"
        if verdict.correct
        else "wrong"
    )
    assert got == expected, verdict
    assert not (verdict.hallucination and verdict.correct)


def test_the_papers_substring_rule_is_kept(corpus: Corpus) -> None:
    """Gorilla checks that each argument of the corpus call is a substring of the answer's
    call, case-sensitively, first corpus API first; exact normalises instead."""
    cased = corpus.score("torch.hub.load('PyTorch/Vision', 'resnet50')", GOLD, "Classification")
    assert (cased.correct, cased.exact, cased.hallucination) == (False, True, True)
    # 'resnet50' is inside 'fcn_resnet50': the first card in corpus order is taken
    inside = corpus.score(
        "torch.hub.load('pytorch/vision', 'fcn_resnet50')", GOLD, "Classification"
    )
    assert (inside.correct, inside.exact, inside.matched) == (True, False, "resnet50")


def test_huggingface_every_argument_must_appear() -> None:
    corpus = Corpus.from_records(
        [
            ("hf:1", {"api_name": "a", "domain": "NLP Text Classification",
                      "api_call": "pipeline('sentiment-analysis', model='distilbert-sst2')"}),
            ("hf:2", {"api_name": "b", "domain": "NLP Feature Extraction",
                      "api_call": "AutoModel.from_pretrained('YituTech/conv-bert-base')"}),
        ]
    )  # fmt: skip
    gold = "pipeline('sentiment-analysis', model='distilbert-sst2')"
    ok = corpus.score(
        "classifier = pipeline('sentiment-analysis', model='distilbert-sst2')",
        gold,
        "NLP Text Classification",
    )
    assert ok.correct and ok.exact and ok.matched == "a"
    # the task argument alone is not enough: the model argument must appear too
    assert corpus.score(
        "pipeline('sentiment-analysis')", gold, "NLP Text Classification"
    ).hallucination
    other = corpus.score(
        "AutoModel.from_pretrained('YituTech/conv-bert-base')", gold, "NLP Text Classification"
    )
    assert (other.correct, other.exact, other.hallucination) == (False, False, False)


def test_tensorflow_hub_corpus_needs_no_code_change() -> None:
    corpus = Corpus.from_records(
        [("tf:1", {"api_name": "mobilenet", "domain": "Image classification",
                   "api_call": "hub.KerasLayer('https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5', trainable=False)"})]
    )  # fmt: skip
    gold = corpus.apis[0].call.text
    assert corpus.apis[0].call.identifying() == (
        "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5",
    )
    verdict = corpus.score(
        "layer = hub.KerasLayer('https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5')",
        gold,
        "Image classification",
    )
    assert verdict.correct and verdict.exact


def test_answer_call_extraction() -> None:
    assert extract_answer_call("<<<api_call>>>: f(1)\n<<<api_provider>>>: x") == "f(1)"
    assert extract_answer_call("x\n##Answer: g('a')") == "g('a')"
    calls = find_calls("see pipeline('x', model=AutoModel.from_pretrained('y')) here")
    assert [c.function for c in calls] == ["pipeline", "AutoModel.from_pretrained"]


def write_lines(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    corpus = write_lines(tmp_path / "api.jsonl", list(TORCHHUB))
    questions = write_lines(
        tmp_path / "eval.json",
        [
            {"code": f"###Instruction: question {i}\n###Output: {{}}", "api_call": GOLD,
             "api_data": TORCHHUB[0]}
            for i in range(4)
        ],
    )  # fmt: skip
    return corpus, questions


def test_eval_command_prints_the_fractions(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus, questions = files
    answers = write_lines(
        tmp_path / "answers.jsonl",
        [
            {"text": "torch.hub.load('pytorch/vision', 'resnet50')"},  # exact
            {"text": "##Reason: ...\n##Answer: torch.hub.load('pytorch/vision', 'resnet18')"},
            {
                "text": "torch.hub.load('pytorch/vision', 'deeplabv3_mobilenet_v3_large')"
            },  # other domain
            {"text": "torch.hub.load('me/mine', 'nothing')"},  # hallucination
        ],
    )
    argv = ["eval", "apibench", "--corpus", str(corpus), "--questions", str(questions)]
    assert tailor([*argv, "--answers", str(answers), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "n": 4, "accuracy": 0.5, "exact": 0.25, "hallucination": 0.25,
    }  # fmt: skip
    assert tailor([*argv, "--answers", str(answers)]) == 0
    assert "50.00%" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("which", "rows", "named"),
    [
        ("answers", [{"text": "a"}, {"text": "b"}], "2 answer lines for 4 questions"),
        (
            "answers",
            [{"text": "a"}, "not json", {"text": "c"}, {"text": "d"}],
            ":2: not valid JSON",
        ),
        ("answers", [{"reply": "a"}] * 4, ":1: an answer line needs a string field text"),
        ("corpus", [{"name": "x", "call": "f(1)"}], ":1: unknown corpus format"),
        ("questions", [{"question": "q"}], ":1: a question line needs the string fields code"),
    ],
)
def test_bad_inputs_name_the_file_and_line(
    files: tuple[Path, Path],
    tmp_path: Path,
    which: str,
    rows: list[object],
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corpus, questions = files
    answers = write_lines(tmp_path / "answers.jsonl", [{"text": "x"}] * 4)
    paths = {"corpus": corpus, "questions": questions, "answers": answers}
    paths[which] = write_lines(tmp_path / f"bad-{which}.jsonl", rows)
    with pytest.raises(WorkloadError) as caught:
        score_files(paths["corpus"], paths["questions"], paths["answers"])
    assert str(paths[which]) in str(caught.value) and named in str(caught.value)
    argv = [f"--{k}={v}" for k, v in paths.items()]
    assert tailor(["eval", "apibench", *argv]) == 2
    assert named in capsys.readouterr().err


def test_gold_answers_score_full_marks_on_torchhub(apibench: Path) -> None:
    corpus = Corpus.load(apibench / "torchhub_api.jsonl")
    questions = load_questions(apibench / "torchhub_eval.json")
    assert len(questions) == 186
    assert all(q.question and not q.question.startswith("###") for q in questions)
    for q in questions:
        verdict = corpus.score(answer_text(q), q.api_call, q.domain)
        assert verdict.correct and verdict.exact, (q.api_call, verdict)
    example = chat_example(questions[0])
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    assert len(load_questions(apibench / "torchhub_train.json")) == 837


def test_huggingface_data_loads_and_gold_answers_mostly_score(apibench: Path) -> None:
    """The paper's metric is not a ceiling of 100% on HuggingFace: cards that share a
    call (``joblib.load('model.joblib')``) or have none leave gold answers wrong."""
    corpus = Corpus.load(apibench / "huggingface_api.jsonl")
    questions = load_questions(apibench / "huggingface_eval.json")
    assert (len(corpus.apis) + len(corpus.skipped), len(questions)) == (936, 911)
    verdicts = [corpus.score(q.api_call, q.api_call, q.domain) for q in questions]
    assert 0.9 < sum(v.correct for v in verdicts) / len(verdicts) < 1.0
    assert all(q.explanation for q in questions[:20])


# --- the apibench matcher of PromptProfile test cases (the packaged Torch Hub corpus) -----

HARDNET68 = (
    "torch.hub.load(repo_or_dir='PingoLH/Pytorch-HarDNet', model='hardnet68', pretrained=True)"
)


@pytest.mark.parametrize(
    ("answer", "require", "failure"),
    [
        # The gold API, written positionally inside prose: exact, so it passes both ways.
        ("Use torch.hub.load('PingoLH/Pytorch-HarDNet', 'hardnet68', pretrained=True).",
         "exact", ""),
        # Another corpus API of the gold domain (Classification): the paper's accuracy
        # counts it, exact does not.
        ("torch.hub.load('PingoLH/Pytorch-HarDNet', 'hardnet85', pretrained=True)",
         "correct", ""),
        ("torch.hub.load('PingoLH/Pytorch-HarDNet', 'hardnet85', pretrained=True)",
         "exact", "not the gold API"),
        # A corpus API of another domain.
        ("torch.hub.load('sigsep/open-unmix-pytorch', 'umxhq', pretrained=True)",
         "correct", "outside the gold domain 'Classification'"),
        # A model the corpus does not have.
        ("torch.hub.load('PingoLH/Pytorch-HarDNet', 'hardnet999')", "correct", "hallucination"),
    ],
)  # fmt: skip
def test_prompt_test_apibench_matcher_scores_as_the_paper(
    answer: str, require: str, failure: str
) -> None:
    from tailor.api.promptprofile import Expectation
    from tailor.workloads.evaluation.prompt_tests import check

    expect = Expectation.model_validate(
        {"apibench": {"corpus": "torchhub", "apiCall": HARDNET68, "require": require}}
    )
    message = check(expect, answer)
    assert (failure in message and bool(message)) if failure else message == ""


def test_prompt_test_apibench_matcher_names_a_gold_call_outside_the_corpus() -> None:
    from pydantic import ValidationError

    from tailor.api.promptprofile import Expectation
    from tailor.workloads.evaluation.prompt_tests import check

    expect = Expectation.model_validate(
        {"apibench": {"apiCall": "torch.hub.load('nobody/nothing', 'x')"}}
    )
    assert "is not an API of the torchhub corpus" in check(expect, HARDNET68)
    with pytest.raises(ValidationError, match=r"(?s)apiCall.*not a function call"):
        Expectation.model_validate({"apibench": {"apiCall": "resnet50 please"}})
