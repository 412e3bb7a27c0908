"""The RAFT workloads: training data (tailor.workloads.raft.data) and the evaluation
(tailor.workloads.raft.evaluate), on APIBench's Torch Hub corpus indexed for real (MiniLM,
embedded Qdrant) and, for the evaluation, the real serve workload with SmolLM2."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailor.api.settings import OperatorSettings
from tailor.api.workloads import EvaluateRun, IndexRun, RaftDataRun, ServeRun
from tailor.builders.common import Program
from tailor.devcluster.s3 import S3Server
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.apibench import (
    ANSWER_MARK,
    Corpus,
    final_answer,
    load_documents,
    load_questions,
    raft_question,
)
from tailor.workloads.evaluation.matchers import normalise
from tailor.workloads.evaluation.scoring import gold_matches
from tailor.workloads.io.storage import MARKER, sha256_file
from tailor.workloads.knowledge.index import build_index
from tailor.workloads.raft.data import (
    BEGIN_QUOTE,
    END_QUOTE,
    Stats,
    Teacher,
    generate,
    generate_questions,
    load_chunks,
    quotes,
    quotes_are_verbatim,
)
from tailor.workloads.raft.evaluate import evaluate, load_holdout
from tailor.workloads.raft.evaluate import work as evaluate_work
from tailor.workloads.serving.app import create_app
from tests.workloads.helpers import ThreadServer, run_program, store_config

pytestmark = pytest.mark.workloads

KB_FORMAT = {
    "json": {
        "textFields": ["api_name", "domain", "functionality", "description", "api_call"],
        "idField": "api_call",
        "titleField": "api_name",
        "metadataFields": ["domain", "api_call"],
    }
}
OWNER = {"kind": "RAFTJob", "namespace": "test", "name": "raft"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, apibench: Path) -> Path:
    root = tmp_path_factory.mktemp("raft")
    data = root / "pvcs" / "data"
    data.mkdir(parents=True)
    shutil.copy(apibench / "torchhub_api.jsonl", data / "torchhub_api.jsonl")
    questions = load_questions(apibench / "torchhub_train.json")[:200]
    (data / "questions.jsonl").write_text(
        "".join(json.dumps(raft_question(q)) + "\n" for q in questions)
    )
    return root


def paths(root: Path) -> dict[str, str]:
    return {"artifacts": str(root / "artifacts"), "pvcs": str(root / "pvcs")}


@pytest.fixture(scope="module")
def knowledge_base(root: Path) -> IndexRun:
    run = IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "test", "name": "torchhub"},
            "paths": paths(root),
            "reporter": {"kind": "none"},
            "spec": {
                "sources": [{"pvc": {"claimName": "data", "path": "torchhub_api.jsonl"}}],
                "format": KB_FORMAT,
                "chunking": {"strategy": "none"},
            },
            "target": {"alias": "torchhub", "retrieval": {"topK": 3}},
        }
    )
    assert build_index(run).chunks == 94
    return run


def data_run(root: Path, kb: IndexRun, out: str = "data", **raft: Any) -> RaftDataRun:
    return RaftDataRun.model_validate(
        {
            "owner": OWNER,
            "paths": paths(root),
            "reporter": {"kind": "file", "path": str(root / f"{out}-progress.jsonl")},
            "spec": {
                "knowledgeBaseRef": {"name": "torchhub"},
                "questions": {
                    "source": {"pvc": {"claimName": "data", "path": "questions.jsonl"}}
                },
                "raft": {"seed": 7, **raft},
                "fineTune": {"baseModel": {"builtin": "smollm2-135m-instruct"}},
                "evaluation": {"holdout": 0.1, "matcher": "apibench", "maxQuestions": 4,
                               "maxTokens": 24},
            },
            "knowledgeBase": kb.target.model_dump(by_alias=True),
            "outputDir": str(root / "artifacts" / out),
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def dataset(root: Path, knowledge_base: IndexRun) -> RaftDataRun:
    run = data_run(root, knowledge_base)
    generate(run)
    return run


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def documents_in(user_turn: str) -> list[str]:
    """The numbered context documents of a user turn (prompting.format_context)."""
    return re.findall(r"^\[(\d+)\] ", user_turn, re.M)


def test_p_share_of_examples_hold_the_gold_document_among_k_distractors(
    dataset: RaftDataRun, apibench: Path
) -> None:
    out = Path(dataset.output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["stats"]
    assert stats["questions"] == 200
    assert stats["examples"] + stats["validation"] + stats["holdout"] == 200
    assert stats["holdout"] == 20
    assert stats["withOracle"] == pytest.approx(0.8, abs=0.01)
    assert stats["hardNegatives"] == 1.0  # the retriever supplied every distractor

    gold_text = {d["api_call"]: d for d in load_documents(apibench / "torchhub_api.jsonl")}
    by_question = {raft_question(q)["question"]: raft_question(q)
                   for q in load_questions(apibench / "torchhub_train.json")[:200]}  # fmt: skip
    rows = records(out / "train.jsonl") + records(out / "validation.jsonl")
    assert len(rows) == stats["examples"] + stats["validation"]
    with_gold = 0
    for row in rows:
        system, user, assistant = row["messages"]
        assert system["role"] == "system" and "##begin_quote##" in system["content"]
        assert len(documents_in(user["content"])) == 5  # k + 1 documents, always
        question = user["content"].rsplit("Question: ", 1)[1]
        gold = gold_text[by_question[question]["document_id"]]
        with_gold += gold["api_call"] in user["content"]
        assert assistant["content"].rstrip().splitlines()[-2].startswith(ANSWER_MARK)
        assert assistant["content"].endswith(by_question[question]["answer"])
    assert with_gold / len(rows) == pytest.approx(0.8, abs=0.01)


def test_every_quote_is_verbatim_from_the_gold_document(
    dataset: RaftDataRun, knowledge_base: IndexRun
) -> None:
    chunks = {c.document_id: c for c in load_chunks(knowledge_base.target, knowledge_base.paths)}
    questions = records(Path(knowledge_base.paths.pvcs) / "data" / "questions.jsonl")
    gold = {q["question"]: chunks[q["document_id"]] for q in questions}
    rows = records(Path(dataset.output_dir) / "train.jsonl")
    for row in rows:
        answer = row["messages"][-1]["content"]
        found = quotes(answer)
        assert found, answer
        assert answer.count(BEGIN_QUOTE) == answer.count(END_QUOTE) == len(found)
        question = row["messages"][1]["content"].rsplit("Question: ", 1)[1]
        assert quotes_are_verbatim(answer, gold[question].text), question
        assert not quotes_are_verbatim(
            answer.replace(found[0], found[0] + " x"), gold[question].text
        )
    # The quote is the gold document's call line: the sentence sharing most words.
    assert sum("api_call:" in quotes(r["messages"][-1]["content"])[0] or
               "torch.hub.load" in quotes(r["messages"][-1]["content"])[0]
               for r in rows) > 0.9 * len(rows)  # fmt: skip


def test_status_and_manifest_describe_the_dataset(dataset: RaftDataRun) -> None:
    out = Path(dataset.output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    assert names == {"train.jsonl", "validation.jsonl", "holdout.jsonl"}
    holdout = records(out / "holdout.jsonl")
    assert len(holdout) == 20
    for item in holdout:  # the paper's protocol: gold among k distractors
        ids = [d["id"] for d in item["context"]]
        assert item["goldChunkId"] in ids and len(ids) == 5
    assert not list(out.parent.glob(".data.partial"))


def test_the_same_seed_gives_the_same_dataset(
    root: Path, knowledge_base: IndexRun, dataset: RaftDataRun
) -> None:
    again = data_run(root, knowledge_base, out="again")
    generate(again)
    for name in ("train.jsonl", "validation.jsonl", "holdout.jsonl"):
        assert (Path(again.output_dir) / name).read_text() == (
            Path(dataset.output_dir) / name
        ).read_text()


def test_random_distractors_and_no_chain_of_thought(root: Path, knowledge_base: IndexRun) -> None:
    run = data_run(root, knowledge_base, out="plain", oracleProbability=0.0, distractors=2,
                   distractorSampling="random", chainOfThought=False)  # fmt: skip
    stats = generate(run)
    assert stats.with_oracle == 0.0 and stats.hard_negatives == 0.0
    row = records(Path(run.output_dir) / "train.jsonl")[0]
    assert len(documents_in(row["messages"][1]["content"])) == 3
    assert BEGIN_QUOTE not in row["messages"][-1]["content"]


def test_the_data_workload_reports_its_dataset_last_for_the_operator(
    root: Path, knowledge_base: IndexRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = data_run(root, knowledge_base, out="reported")
    code, message = run_program(Program.RAFT_DATA, run, tmp_path, monkeypatch)
    assert code == 0, message
    out = Path(run.output_dir)
    assert message["reason"] == "DataGenerated"
    assert message["dataset"]["artifact"]["sha256"] == sha256_file(out / "manifest.json")
    assert message["dataset"]["examples"] == len(records(out / "train.jsonl"))


def test_with_the_s3_store_the_dataset_lands_in_the_bucket_and_the_child_reads_it_there(
    root: Path, knowledge_base: IndexRun, tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """The data stage uploads its dataset (marker last) and reports the bucket's URI; the
    child FineTuneJob's source (``uri: s3://.../data/train.jsonl``, as the builder writes
    it) reads the same records from the bucket, checked against that marker."""
    from tailor.api.common import DataSource
    from tailor.api.workloads import Paths
    from tailor.builders.raftjob import dataset_file
    from tailor.workloads.io.records import read_raw
    from tailor.workloads.raft.data import work

    store = store_config(tmp_path, s3_server, bucket)
    (root / "raftjob/raft/u1").mkdir(parents=True, exist_ok=True)
    run = data_run(root, knowledge_base, out="raftjob/raft/u1/data")
    run.paths.store = store
    work(run)
    progress = records(root / "raftjob/raft/u1/data-progress.jsonl")[-1]["status"]
    assert progress["dataset"]["artifact"]["uri"] == f"{store.uri('raftjob/raft/u1/data')}/"
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert {f"tailor/raftjob/raft/u1/data/{n}" for n in ("train.jsonl", MARKER)} <= keys

    settings = OperatorSettings(
        artifacts_store="s3", s3_bucket=bucket, s3_prefix="tailor", s3_secret="s3-keys"
    )
    source = dataset_file(settings, "ns", "raftjob/raft/u1/data", "train.jsonl")
    assert source == DataSource(uri=f"s3://{bucket}/tailor/ns/raftjob/raft/u1/data/train.jsonl")
    source = DataSource(uri=f"s3://{bucket}/tailor/raftjob/raft/u1/data/train.jsonl")  # as written
    child = Paths(artifacts=str(tmp_path / "child-scratch"), store=store, s3=store)
    read = [record for _, record in read_raw(source, child)]
    assert read == records(root / "artifacts/raftjob/raft/u1/data/train.jsonl")
    assert len(read) == progress["dataset"]["examples"]


def test_an_oracle_share_outside_0_1_is_refused_naming_the_field(
    root: Path, knowledge_base: IndexRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = json.loads(data_run(root, knowledge_base).model_dump_json(by_alias=True))
    spec["spec"]["raft"]["oracleProbability"] = 1.5
    code, message = run_program(Program.RAFT_DATA, json.dumps(spec), tmp_path, monkeypatch)
    assert code == 2
    assert message["reason"] == "InvalidSpec"
    assert "oracleProbability" in message["message"] and "1" in message["message"]


def test_more_distractors_than_documents_fails_with_the_fix(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "test", "name": "small"},
            "paths": paths(root),
            "reporter": {"kind": "none"},
            "spec": {"sources": [{"inline": [{"id": f"d{i}", "text": f"Document {i}."}
                                             for i in range(4)]}]},
            "target": {"alias": "small"},
        }
    )  # fmt: skip
    build_index(small)
    code, message = run_program(
        Program.RAFT_DATA, data_run(root, small, distractors=4), tmp_path, monkeypatch
    )
    assert code == 2
    assert message["reason"] == "TooFewDocuments"
    assert "spec.raft.distractors" in message["message"]
    assert "at most 2" in message["message"]


def test_a_question_without_an_answer_names_file_and_line(
    root: Path, knowledge_base: IndexRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = root / "pvcs" / "data"
    (data / "bad.jsonl").write_text(
        json.dumps({"question": "Which model?", "answer": "x", "document_id": "y"}) + "\n"
        + json.dumps({"question": "Which other model?"}) + "\n"
    )  # fmt: skip
    run = data_run(root, knowledge_base)
    assert run.spec.questions.source and run.spec.questions.source.pvc
    run.spec.questions.source.pvc.path = "bad.jsonl"
    code, message = run_program(Program.RAFT_DATA, run, tmp_path, monkeypatch)
    assert code == 2
    assert message["reason"] == "InvalidQuestions"
    assert "bad.jsonl:2" in message["message"] and "'answer'" in message["message"]


def test_questions_naming_unknown_documents_are_skipped_and_all_unknown_fails(
    root: Path, knowledge_base: IndexRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = root / "pvcs" / "data"
    (data / "unknown.jsonl").write_text(
        "".join(json.dumps({"question": f"q{i}?", "answer": "a", "document_id": f"nope-{i}"})
                + "\n" for i in range(5))
    )  # fmt: skip
    run = data_run(root, knowledge_base)
    assert run.spec.questions.source and run.spec.questions.source.pvc
    run.spec.questions.source.pvc.path = "unknown.jsonl"
    code, message = run_program(Program.RAFT_DATA, run, tmp_path, monkeypatch)
    assert code == 2
    assert "nope-0" in message["message"] and "idField" in message["message"]


# ------------------------------------------------------------------ matchers


@pytest.mark.parametrize(
    ("matcher", "reply", "gold", "correct"),
    [
        ("exact", "##Reason: ... \n##Answer: The Eiffel Tower.", "eiffel tower", True),
        ("exact", "##Answer: Eiffel Tower in Paris", "Eiffel Tower", False),
        ("contains", "##Answer: It is the Eiffel Tower in Paris", "the eiffel tower", True),
        ("contains", "##Reason: Eiffel Tower\n##Answer: Louvre", "Eiffel Tower", False),
        ("regex", "##Answer: 42 items", r"\b4[0-9]\b", True),
        ("regex", "##Answer: 24 items", r"\b4[0-9]\b", False),
    ],
)  # fmt: skip
def test_matchers(matcher: str, reply: str, gold: str, correct: bool) -> None:
    assert gold_matches(matcher, reply, gold) is correct


def test_normalise_is_squad_style() -> None:
    assert normalise("  The  Eiffel-Tower, a landmark! ") == "eiffeltower landmark"


# ------------------------------------------------------------------ evaluation, served


@pytest.fixture(scope="module")
def server(root: Path, knowledge_base: IndexRun) -> Iterator[str]:
    run = ServeRun.model_validate(
        {
            "spec": {"baseModel": {"builtin": "smollm2-135m-instruct"}},
            "servedName": "md",
            "owner": {"kind": "ModelDeployment", "namespace": "test", "name": "md"},
            "paths": paths(root),
            "knowledgeBase": knowledge_base.target.model_dump(by_alias=True),
        }
    )
    with ThreadServer(create_app(run)) as server:
        yield f"{server.url}/v1"


@pytest.mark.parametrize("protocol", ["oracle", "retriever"])
def test_evaluation_asks_every_system_and_scores_with_the_matcher(
    root: Path, dataset: RaftDataRun, knowledge_base: IndexRun, server: str, protocol: str
) -> None:
    spec = dataset.spec.model_copy(deep=True)
    spec.evaluation.protocol = protocol  # type: ignore[assignment]
    out = root / "artifacts" / f"evaluation-{protocol}"
    run = EvaluateRun.model_validate(
        {
            "owner": OWNER,
            "paths": paths(root),
            "reporter": {"kind": "none"},
            "spec": spec.model_dump(by_alias=True),
            "knowledgeBase": knowledge_base.target.model_dump(by_alias=True),
            "datasetDir": dataset.output_dir,
            "endpoints": {
                "rag": {"baseUrl": server, "model": "md"},
                "closed-book": {"baseUrl": server, "model": "md", "context": "none"},
            },
            "outputDir": str(out),
        }
    )
    summary = evaluate(run)
    assert summary["protocol"] == protocol and summary["questions"] == 4
    results = records(out / "results.jsonl")
    assert len(results) == 8
    corpus = Corpus.load(root / "pvcs" / "data" / "torchhub_api.jsonl")
    gold_calls = {h["goldChunkId"]: h["documentId"] for h in records(Path(dataset.output_dir) / "holdout.jsonl")}  # fmt: skip
    domains = {api.call.text: api.domain for api in corpus.apis}
    for row, item in zip(results, [*load_holdout(Path(dataset.output_dir), 4)] * 2, strict=True):
        assert row["error"] is None and row["reply"]
        gold = gold_calls[item.gold_chunk_id]
        verdict = corpus.score(row["reply"], gold, domains[gold])  # the paper's metric
        assert (row["correct"], row["exact"], row["hallucination"]) == (
            verdict.correct, verdict.exact, verdict.hallucination,
        )  # fmt: skip
    rag = summary["systems"]["rag"]
    assert rag["exact"] == sum(r["exact"] for r in results if r["system"] == "rag") / 4
    assert (
        rag["hallucination"] == sum(r["hallucination"] for r in results if r["system"] == "rag") / 4
    )
    assert rag["total"] == 4 and rag["correct"] == sum(
        r["correct"] for r in results if r["system"] == "rag"
    )
    assert summary["systems"]["closed-book"]["goldInContext"] == 0
    if protocol == "oracle":
        assert rag["goldInContext"] == 1.0
    else:  # the server's own retrieval (topK 3) found some gold documents, not all
        assert 0 < rag["goldInContext"] <= 1.0


def test_a_teacher_writes_questions_and_only_verbatim_quoting_answers_are_kept(
    server: str, knowledge_base: IndexRun
) -> None:
    """The served SmolLM2 as the teacher, for real: whatever it writes, an answer is kept
    only if every quote is in its chunk and it ends with an answer line; when none is,
    the run fails saying so instead of training on nothing."""
    chunks = load_chunks(knowledge_base.target, knowledge_base.paths)[:3]
    teacher = Teacher(server, None, None)  # the model name comes from GET /models
    assert teacher.model == "md"
    stats = Stats()
    try:
        kept = generate_questions(teacher, chunks, 1, stats, answer_tokens=96)
    except WorkloadError as exc:
        kept = []
        assert exc.reason == "TeacherFailed" and "verbatim" in exc.message
    finally:
        teacher.close()
    assert stats.teacher_answers >= 1  # questions were parsed from its replies
    assert stats.teacher_answers_rejected == stats.teacher_answers - len(kept)
    for q in kept:
        assert q.gold is not None and q.cot is not None
        assert quotes_are_verbatim(q.cot, q.gold.text) and q.answer == final_answer(q.cot)


def test_the_evaluation_reports_its_scores_last_for_the_operator(
    root: Path,
    dataset: RaftDataRun,
    knowledge_base: IndexRun,
    server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TAILOR_TERMINATION_LOG", str(log))
    out = root / "artifacts" / "evaluation-reported"
    run = EvaluateRun.model_validate(
        {
            "owner": OWNER,
            "paths": paths(root),
            "reporter": {"kind": "none"},
            "spec": dataset.spec.model_dump(by_alias=True),
            "knowledgeBase": knowledge_base.target.model_dump(by_alias=True),
            "datasetDir": dataset.output_dir,
            "endpoints": {"rag": {"baseUrl": server, "model": "md"}},
            "outputDir": str(out),
        }
    )
    evaluate_work(run)
    message = json.loads(log.read_text())
    assert message["reason"] == "Evaluated"
    report = message["evaluation"]
    assert report["artifact"]["sha256"] == sha256_file(out / "results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert report["rag"]["accuracy"] == summary["systems"]["rag"]["accuracy"]
    assert report["rag"]["total"] == 4
