"""Learning from use, its first half: the gateway captures exchanges and ratings
(``ModelDeployment.spec.feedback``) into segments in SeaweedFS or on a claim, and a
DataSource's ``feedback`` turns them into sft, kto, dpo and retrieval records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tailor.api.common import DataSource, FeedbackData
from tailor.api.modeldeployment import Feedback
from tailor.api.workloads import Paths, ServeRun
from tailor.devcluster.s3 import S3Server
from tailor.observability.serving import ServingMetrics
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.feedback import feedback_records, held_out
from tailor.workloads.io.segments import read_segment
from tailor.workloads.io.storage import Store
from tailor.workloads.serving.app import create_app
from tailor.workloads.serving.capture import CaptureLog
from tailor.workloads.serving.engine.builtin import Engine, load_engine
from tests.workloads.helpers import ThreadServer, store_config

pytestmark = pytest.mark.workloads

SERVED = "smol"
SECRETS = "Reach me at jane.doe@example.com or +1 415 555 0100 about ACCT-99812."


def serve_run(root: Path, store: Any = None, replica: str = "r0", **feedback: Any) -> ServeRun:
    return ServeRun.model_validate(
        {
            "spec": {
                "baseModel": {"builtin": "smollm2-135m-instruct"},
                "feedback": {"redact": {"patterns": [r"ACCT-\d+"]}, **feedback},
                "cache": {"enabled": False},
            },
            "servedName": SERVED,
            "owner": {"kind": "ModelDeployment", "namespace": "team-a", "name": SERVED},
            "paths": {"artifacts": str(root), "store": store},
            "replica": replica,
        }
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    run = serve_run(tmp_path_factory.mktemp("engine"))
    engine = load_engine(run.spec, [], run.paths, ServingMetrics(SERVED))
    yield engine
    engine.close()


def ask(client: openai.OpenAI, text: str, stream: bool = False) -> tuple[str, str]:
    """(response id, answer) of a short chat completion."""
    messages: Any = [{"role": "user", "content": text}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=SERVED, messages=messages, max_tokens=6, temperature=0, stream=True
            )
        )
        return chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = client.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=6, temperature=0
    )
    return answer.id, answer.choices[0].message.content or ""


def rate(base: str, response_id: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/feedback", json={"id": response_id, **fields}, timeout=30)


def test_exchanges_and_ratings_go_to_the_bucket_redacted_and_any_replica_joins_them(
    engine: Engine, s3_server: S3Server, tmp_path: Path
) -> None:
    """Two replicas on one bucket (SeaweedFS), the openai SDK as the client: every answered
    exchange (whole and streamed) becomes a record in a published segment, redacted before
    anything is written (the open segment on disk holds no address either); a rating joins
    its exchange on the replica that answered it and, once the segment is published, on the
    other; unknown and expired ids are 404s; a second rating by the same caller replaces
    the first."""
    bucket = f"capture-{uuid.uuid4().hex[:8]}"  # the dev server outlives a test run
    config = store_config(tmp_path, s3_server, bucket)
    Store(config, tmp_path).client.create_bucket(Bucket=bucket)
    run_a = serve_run(tmp_path / "a", config.wire(), "replica-a")
    run_b = serve_run(tmp_path / "b", config.wire(), "replica-b")
    with (
        ThreadServer(create_app(run_a, engine=engine)) as a,
        ThreadServer(create_app(run_b, engine=engine)) as b,
    ):
        client = openai.OpenAI(base_url=f"{a.url}/v1", api_key="unused", max_retries=0)
        first, answer = ask(client, f"{SECRETS} Who are you?")
        streamed, streamed_answer = ask(client, "Name a colour.", stream=True)
        assert rate(a.url, first, rating="down", correction=f"Write to {SECRETS}").json()[
            "captured"
        ]
        again = rate(a.url, first, rating="up").json()
        assert again["replaced"] is True and again["known"] is True

        gateway = a.app.state.server
        gateway.capture.flush()
        open_segments = list((tmp_path / "a" / "feedback" / SERVED / "open").glob("*.jsonl"))
        written = b"".join(p.read_bytes() for p in open_segments)
        assert b"jane.doe" not in written and b"415 555" not in written and b"99812" not in written
        assert b"[EMAIL]" in written and b"[PHONE]" in written and b"[REDACTED]" in written

        # B has not seen A's id: a 404 until A publishes its segment, then joined
        missing = rate(b.url, streamed, rating="up")
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["code"] == "response_not_found"
        gateway.capture.rotate()
        joined = rate(b.url, streamed, rating="up", sources=[{"id": "c1", "useful": True}])
        assert joined.status_code == 200 and joined.json()["known"] is True

        never = "chatcmpl-" + f"{int(time.time() * 1000):011x}" + "0" * 21
        assert rate(a.url, never, rating="up").json()["error"]["code"] == "response_not_found"
        old = "chatcmpl-" + f"{int((time.time() - 40 * 86400) * 1000):011x}" + "0" * 21
        assert rate(a.url, old, rating="up").json()["error"]["code"] == "response_expired"
        b.app.state.server.capture.rotate()

    store = Store(config, tmp_path)
    segments = store.listing(f"feedback/{SERVED}/segments")
    assert segments and all(s.startswith(f"feedback/{SERVED}/segments/") for s in segments)
    assert store.key(segments[0]).startswith("tailor/")  # under the namespace's prefix
    records = [r for rel in segments for r in read_segment(store.read(rel))]
    exchanges = {r["id"]: r for r in records if r["type"] == "exchange"}
    assert set(exchanges) == {first, streamed}
    assert exchanges[streamed]["answer"] == streamed_answer
    assert exchanges[first]["answer"] == answer
    assert "[EMAIL]" in exchanges[first]["asked"][-1]["content"]
    assert exchanges[first]["seen"][-1]["content"] == exchanges[first]["asked"][-1]["content"]
    assert exchanges[first]["usage"]["completion_tokens"] > 0
    ratings = [r for r in records if r["type"] == "feedback"]
    assert [(r["id"], r["rating"]) for r in ratings] == [
        (first, "down"),
        (first, "up"),
        (streamed, "up"),
    ]
    assert "jane.doe" not in json.dumps(records)


def test_only_the_caller_that_asked_may_rate_an_exchange(engine: Engine, tmp_path: Path) -> None:
    """With API keys, a rating by another key than the one that asked is a 404 (as if the
    exchange did not exist): one user cannot put words into another's training data."""
    for name in ("alice", "bob"):
        (tmp_path / "secrets" / name).mkdir(parents=True)
        (tmp_path / "secrets" / name / "key").write_text(f"sk-{name}-0123456789\n")
    run = serve_run(tmp_path, None, "r0")
    keys = [{"secretRef": {"name": n, "key": "key"}, "baseModel": True} for n in ("alice", "bob")]
    run.spec = run.spec.model_validate({**run.spec.wire(), "auth": {"keys": keys}})
    run.paths.secrets = str(tmp_path / "secrets")
    with ThreadServer(create_app(run, engine=engine)) as server:
        alice = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-alice-0123456789")
        response_id, _ = ask(alice, "Who are you?")

        def rate_as(name: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer sk-{name}-0123456789"}
            body = {"id": response_id, "rating": "down", "correction": f"{name} says so"}
            return httpx.post(f"{server.url}/v1/feedback", json=body, headers=headers)

        assert rate_as("bob").status_code == 404
        assert rate_as("alice").status_code == 200


def test_a_pattern_that_backtracks_forever_redacts_the_whole_string_in_bounded_time() -> None:
    """A user's redaction pattern cannot hold the capture writer: past its time limit the
    string is written as [REDACTED] whole, never as it was."""
    from tailor.api.modeldeployment import Redaction
    from tailor.workloads.serving.capture import Redactor

    redactor = Redactor(Redaction(patterns=["(a|aa)+c"]))
    started = time.perf_counter()
    assert redactor.record({"asked": ["a" * 60, "ok"]}) == {"asked": ["[REDACTED]", "ok"]}
    assert time.perf_counter() - started < 5 and redactor.timeouts == 1


WRITER = """
import json, os, sys, time
from pathlib import Path
from tailor.api.modeldeployment import Feedback
from tailor.workloads.serving.capture import CaptureLog
log = CaptureLog(Feedback.model_validate(json.loads(sys.argv[2])), "smol", Path(sys.argv[1]), None, "r0")
for i in range(200):
    log.append({"type": "exchange", "id": f"x{i}", "time": time.time(), "answer": "a" * 100})
log.flush()
print("written", flush=True)
time.sleep(600)
"""


def test_a_killed_writer_loses_nothing_written_on_the_claim_and_old_segments_are_pruned(
    tmp_path: Path,
) -> None:
    """On the claim a killed server's open segment stays; the replica that starts next
    publishes it (all 200 records); a day folder older than retentionDays is deleted."""
    spec = Feedback.model_validate({"rotate": {"maxSeconds": 3600}, "retentionDays": 7})
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), spec.model_dump_json(by_alias=True)],
        stdout=subprocess.PIPE,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == b"written"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(10)
    folder = tmp_path / "feedback" / SERVED
    assert not list(folder.glob("segments/*/*.jsonl"))  # nothing was published
    old = folder / "segments" / "2020-01-01" / "1577836800000-r9-1.jsonl"
    old.parent.mkdir(parents=True)
    old.write_text('{"type": "exchange", "id": "ancient"}\n')

    restarted = CaptureLog(spec, SERVED, tmp_path, None, "r0")  # the pod's name again
    published = list(folder.glob("segments/2*/*-r0-*.jsonl"))
    records = [r for p in published for r in read_segment(p.read_bytes())]
    assert [r["id"] for r in records] == [f"x{i}" for i in range(200)]
    assert restarted.prune(time.time()) == 1 and not old.exists()
    assert published[0].exists()
    restarted.close()


def exchange(i: int, question: str, answer: str, **extra: Any) -> dict[str, Any]:
    asked = [{"role": "user", "content": question}]
    seen = [{"role": "system", "content": "Be brief."}, *asked]
    return {
        "type": "exchange",
        "id": f"chatcmpl-{i:032x}",
        "time": time.time(),
        "asked": asked,
        "seen": seen,
        "answer": answer,
        "sources": [{"id": f"chunk-{i}", "document": f"doc-{i}"}],
    } | extra


def rating(i: int, value: str, caller: str = "k1", **extra: Any) -> dict[str, Any]:
    return {
        "type": "feedback",
        "id": f"chatcmpl-{i:032x}",
        "time": time.time(),
        "caller": caller,
        "rating": value,
        **extra,
    }


def test_each_dataset_format_is_built_from_captured_records(tmp_path: Path) -> None:
    """sft, kto, dpo and retrieval records from one capture: later ratings by the same
    caller replace earlier ones, conflicting callers skip an exchange, the held-out share is
    the same exchanges in every format and excluded from training, and each skip is counted."""
    log = CaptureLog(Feedback(), SERVED, tmp_path, None, "r0")
    records = [
        exchange(1, "What is 2+2?", "5"),
        rating(1, "down", correction="4"),
        exchange(2, "What is 2+2?", "4"),
        rating(2, "down"),
        rating(2, "up"),  # the same caller changed its mind
        exchange(3, "Capital of France?", "Lyon"),
        rating(3, "down"),  # no correction, no up-rated answer to the same question
        exchange(4, "Colour of the sky?", "Blue"),
        rating(4, "up", caller="k1"),
        rating(4, "down", caller="k2"),  # two users disagree
        exchange(5, "Unrated?", "Yes"),
        exchange(6, "What is 2+2?", "22"),
        rating(6, "down", sources=[{"id": "chunk-6", "useful": True}]),
    ]
    for record in records:
        log.append(record)
    log.close()
    paths = Paths(artifacts=str(tmp_path))

    def dataset(fmt: str, **more: Any) -> tuple[list[Any], dict[str, Any]]:
        spec = FeedbackData.model_validate(
            {"deploymentRef": {"name": SERVED}, "format": fmt, "heldOutFraction": 0, **more}
        )
        built, counts = feedback_records(spec, paths)
        return built, counts.wire()

    sft, counts = dataset("sft")
    # the correction of 1 and the up-rated answer of 2 are one example: counted once
    assert [r["messages"][-1]["content"] for r in sft] == ["4"]
    assert sft[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert counts["skipped"] == {
        "conflictingRatings": 1,
        "downWithoutCorrection": 2,
        "duplicate": 1,
        "notRated": 1,
    }
    kto, _ = dataset("kto")
    assert sorted((r["completion"][0]["content"], r["label"]) for r in kto) == [
        ("22", False),
        ("4", True),
        ("5", False),
        ("Lyon", False),
    ]
    dpo, counts = dataset("dpo")
    assert sorted((r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo) == [
        ("4", "22"),
        ("4", "5"),
    ]
    assert counts["skipped"]["noPair"] == 1  # Lyon
    retrieval, _ = dataset("retrieval")
    assert retrieval == [
        {"question": "What is 2+2?", "correction": "4"},  # labelled by the document it names
        {"question": "What is 2+2?", "document": "doc-2"},
        {"question": "What is 2+2?", "document": "doc-6"},
    ]

    # the held-out split: by question, disjoint from training, the same in every format
    questions = ["What is 2+2?", "Capital of France?"]
    grid = [f / 1000 for f in range(1, 1000)]
    fraction = next(f for f in grid if sum(held_out(q, f) for q in questions) == 1)
    train, _ = dataset("kto", heldOutFraction=fraction)
    held, _ = dataset("kto", heldOutFraction=fraction, split="heldOut")
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, kto))
    assert {r["prompt"][-1]["content"] for r in train}.isdisjoint(
        r["prompt"][-1]["content"] for r in held
    )
    with pytest.raises(WorkloadError, match="fewer than minRecords 50"):
        dataset("dpo", minRecords=50)
    # the same records through a DataSource, as training reads any source
    from tailor.workloads.io.records import read_raw

    source = DataSource.model_validate(
        {"feedback": {"deploymentRef": {"name": SERVED}, "format": "dpo", "heldOutFraction": 0}}
    )
    assert [r for _, r in read_raw(source, paths)] == dpo

    # an evaluation set's questions are never trained on (an AdaptationLoop's frozen set),
    # whatever their case and spacing
    (tmp_path / "configmaps" / "frozen").mkdir(parents=True)
    (tmp_path / "configmaps" / "frozen" / "eval.jsonl").write_text(
        json.dumps({"question": "  what is  2+2? "}) + "\n"
    )
    excluded = DataSource.model_validate({"feedback": {
        "deploymentRef": {"name": SERVED}, "format": "kto", "heldOutFraction": 0,
        "excludeQuestions": {"name": "frozen", "key": "eval.jsonl"}}})  # fmt: skip
    used: dict[str, Any] = {}
    frozen_paths = Paths(artifacts=str(tmp_path), config_maps=str(tmp_path / "configmaps"))
    kept = [r for _, r in read_raw(excluded, frozen_paths, used)]
    assert [r["completion"][0]["content"] for r in kept] == ["Lyon"]
    assert used["skipped"]["evaluationQuestion"] == 3 and len(used["sha256"]) == 64


def test_a_knowledge_base_adapts_from_feedback_pairs(tmp_path: Path) -> None:
    """spec.adaptation.questions from feedback (format retrieval): the cited documents users
    marked useful, or that an up-rated answer cited, become the labelled pairs the
    embedding model is tuned on (the tuning itself: tests/workloads/test_adaptation.py); a
    correction labels its question with the document whose id it writes, also one that was
    not retrieved, and the cited ones become its hard negatives."""
    from tailor.api.knowledgebase import Adaptation
    from tailor.workloads.knowledge.adaptation import _labelled, named_document, read_pairs

    log = CaptureLog(Feedback(), SERVED, tmp_path, None, "r0")
    for i in range(12):
        cited = [{"id": f"chunk-{i}", "document": f"doc-{i}"}, {"id": "c-x", "document": "doc-x"}]
        log.append(
            exchange(i, f"Which model classifies images, number {i}?", "resnet", sources=cited)
        )
        useful = i % 3 != 0  # every third user marked the cited card not useful
        judged = [{"id": f"chunk-{i}", "useful": useful}, {"id": "c-x", "useful": False}]
        log.append(rating(i, "up", sources=judged))
    cited = [{"id": "c-x", "document": "doc-x"}]
    log.append(exchange(20, "Which model segments images?", "resnet", sources=cited))
    fix = "torch.hub.load('pytorch/vision', 'deeplabv3_resnet101') segments images"
    log.append(rating(20, "down", correction=fix, sources=[{"id": "c-x", "useful": False}]))
    log.close()
    adaptation = Adaptation.model_validate(
        {
            "questions": {
                "feedback": {
                    "deploymentRef": {"name": SERVED},
                    "format": "retrieval",
                    "heldOutFraction": 0,
                }
            }
        }
    )
    pairs = read_pairs(adaptation, Paths(artifacts=str(tmp_path)))
    assert [(p.question, p.document, p.negatives) for p in pairs[:-1]] == [
        (f"Which model classifies images, number {i}?", f"doc-{i}", ("doc-x",))
        for i in range(12)
        if i % 3
    ]  # the card marked not useful is a hard negative
    corrected = pairs[-1]
    assert (corrected.question, corrected.document) == ("Which model segments images?", "")
    ids = ["doc-x", "deeplabv3_resnet10", "deeplabv3_resnet101", "fcn_resnet101", "101"]
    labelled = _labelled(corrected, ids)
    # the longest id written in the correction; a short id ("101") is never looked for
    assert (labelled.document, labelled.negatives) == ("deeplabv3_resnet101", ("doc-x",))
    assert named_document("use a bigger model", ids) is None
    assert _labelled(corrected, ["doc-x"]).document == ""  # names nothing indexed: unmatched
