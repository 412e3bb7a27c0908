"""Training data of the fine-tuning workload: every format is read, validated line by line
(a bad record names its file and line), tokenized with the chat template so that only
assistant or completion tokens are learned, split for validation and batched without
padding waste. Uses the builtin SmolLM2 tokenizer (no model weights)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tailor.api.common import DataSource, ModelSource
from tailor.api.finetunejob import DatasetSpec
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_tokenizer
from tailor.workloads.training.data import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    Example,
    collate,
    epoch_batches,
    load_datasets,
    read_records,
    tokenize_record,
    validate_record,
)

pytestmark = pytest.mark.workloads

CHAT = {
    "messages": [
        {"role": "system", "content": "Answer with the API call."},
        {"role": "user", "content": "Depth from one image?"},
        {"role": "assistant", "content": "torch.hub.load('intel-isl/MiDaS', 'MiDaS')"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts="/tmp"))


def learned_text(tokenizer: Any, example: Example) -> str:
    """The text of the tokens the example learns (its targets), in order."""
    return tokenizer.decode([t for t in example.targets if t != IGNORE_INDEX])


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def pvc_source(tmp_path: Path, name: str) -> tuple[DataSource, Paths]:
    return DataSource(pvc={"claimName": "data", "path": name}), Paths(
        artifacts=str(tmp_path), pvcs=str(tmp_path)
    )


# --- tokenizing: what is learned ----------------------------------------------------------


def test_chat_learns_only_the_assistant_turn_and_its_end(tokenizer: Any) -> None:
    record = validate_record("inline[0]", CHAT, "chat")
    [example], truncated = tokenize_record(record, tokenizer, 1024)
    assert not truncated
    assert learned_text(tokenizer, example) == (
        "torch.hub.load('intel-isl/MiDaS', 'MiDaS')<|im_end|>\n"
    )
    # Inputs are the whole rendered conversation; targets are inputs shifted by one.
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    for t, target in enumerate(example.targets[:-1]):
        assert target in (IGNORE_INDEX, example.input_ids[t + 1])


def test_multi_turn_learns_every_weighted_assistant_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Say A."},
        {"role": "assistant", "content": "A", "weight": 0},
        {"role": "user", "content": "Say B."},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "Say C."},
        {"role": "assistant", "content": [{"type": "text", "text": "C"}]},
    ]
    [example], _ = tokenize_record(
        validate_record("x:1", {"messages": messages}, "chat"), tokenizer, 1024
    )
    assert learned_text(tokenizer, example) == "B<|im_end|>\nC<|im_end|>\n"


def test_completion_learns_the_completion_and_end_of_text(tokenizer: Any) -> None:
    record = validate_record("x:1", {"prompt": "2+2=", "completion": " 4"}, "completion")
    [example], _ = tokenize_record(record, tokenizer, 1024)
    assert learned_text(tokenizer, example) == " 4" + tokenizer.eos_token
    assert tokenizer.decode(example.input_ids) == "2+2= 4" + tokenizer.eos_token


def test_conversational_prompt_completion_is_a_chat(tokenizer: Any) -> None:
    item = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello"}],
    }
    record = validate_record("x:1", item, "completion")
    assert record.format == "chat"
    [example], _ = tokenize_record(record, tokenizer, 1024)
    assert learned_text(tokenizer, example) == "Hello<|im_end|>\n"


def test_text_learns_everything_and_long_documents_are_cut(tokenizer: Any) -> None:
    text = " ".join(f"word{i}" for i in range(200))
    examples, _ = tokenize_record(validate_record("a.txt", text, "text"), tokenizer, 64)
    assert len(examples) > 2 and all(len(e) <= 64 for e in examples)
    ids = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    assert [t for e in examples for t in e.input_ids] == ids[:-1]
    assert [t for e in examples for t in e.targets] == ids[1:]


def test_truncation_keeps_the_start_and_drops_examples_with_nothing_left(
    tokenizer: Any, tmp_path: Path
) -> None:
    long_prompt = {"prompt": "word " * 200, "completion": "end"}
    spec = DatasetSpec(train=DataSource(inline=[CHAT, CHAT, long_prompt]), format="auto")
    with pytest.raises(WorkloadError, match="expected a chat record"):
        load_datasets(spec, Paths(artifacts=str(tmp_path)), tokenizer, 64, seed=1)
    long_chat = {"messages": [{"role": "user", "content": "word " * 200}, CHAT["messages"][2]]}
    spec = DatasetSpec(train=DataSource(inline=[CHAT, long_chat]))
    data = load_datasets(spec, Paths(artifacts=str(tmp_path)), tokenizer, 64, seed=1)
    assert (data.train_stats.truncated, data.train_stats.dropped) == (1, 1)
    assert len(data.train) == 1


def test_a_tokenizer_without_chat_template_gets_chatml(tokenizer: Any, tmp_path: Path) -> None:
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        spec = DatasetSpec(train=DataSource(inline=[CHAT]))
        data = load_datasets(spec, Paths(artifacts=str(tmp_path)), tokenizer, 1024, seed=1)
        assert tokenizer.chat_template == CHATML_TEMPLATE
        assert tokenizer.decode(data.train[0].input_ids).startswith("<|im_start|>system\nAnswer")
    finally:
        tokenizer.chat_template = template


# --- reading sources -----------------------------------------------------------------------


def test_formats_are_detected_from_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "a.jsonl", [CHAT, CHAT])
    (tmp_path / "data" / "b.txt").write_text("A plain text document.")
    source, paths = pvc_source(tmp_path, "a.jsonl")
    assert read_records(source, paths, "auto")[0] == "chat"
    source = DataSource(pvc={"claimName": "data", "path": "", "glob": "*.txt"})
    fmt, [record] = read_records(source, paths, "auto")
    assert (fmt, record.text) == ("text", "A plain text document.")
    (tmp_path / "data" / "c.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    fmt, records = read_records(*pvc_source(tmp_path, "c.json"), "auto")
    assert fmt == "text" and [r.where.rsplit("/", 1)[1] for r in records] == [
        "c.json[0]",
        "c.json[1]",
    ]


BAD_RECORDS = [
    ('{"messages": [', "not valid JSON"),
    ({"prompt": "x", "completion": "y"}, "expected a chat record {messages: [...]}"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role is 'bot'; expected"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message with weight 1"),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
        "messages[0].content must be a string, not int",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        "messages[1]: assistant content is empty",
    ),
    (
        {"messages": [{"role": "assistant", "content": "a", "weight": 2}]},
        "messages[0].weight is 2; expected 0 or 1",
    ),
    (
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
        "tool and function calling examples are not supported",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0] is 'image_url'; only text parts are supported",
    ),
    ("[1, 2]", "a record must be a JSON object, not a list"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_RECORDS)
def test_a_bad_line_names_file_line_and_problem(tmp_path: Path, bad: Any, problem: str) -> None:
    (tmp_path / "data").mkdir()
    path = write_lines(tmp_path / "data" / "train.jsonl", [CHAT, CHAT, bad, CHAT])
    with pytest.raises(WorkloadError) as caught:
        read_records(*pvc_source(tmp_path, "train.jsonl"), "auto")
    assert caught.value.reason == "InvalidDataset"
    assert caught.value.message.startswith(f"{path}:3: ")
    assert problem in caught.value.message


@pytest.mark.parametrize(
    ("records", "fmt", "problem"),
    [
        ([{"input": "x"}], "auto", "inline[0]: cannot tell the record format"),
        ([{"prompt": "x", "completion": " "}], "auto", "inline[0]: completion is empty"),
        ([{"text": "a"}, {"text": 5}], "auto", "inline[1]: expected {text: string}"),
        ([{"prompt": "p", "completion": ["c"]}], "completion", "completion must be a string"),
        ([], "auto", "the dataset has no records"),
    ],
)
def test_bad_inline_records(records: list[Any], fmt: str, problem: str) -> None:
    with pytest.raises(WorkloadError) as caught:
        read_records(DataSource(inline=records), Paths(artifacts="/tmp"), fmt)
    assert caught.value.reason == "InvalidDataset"
    assert problem in caught.value.message


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[str]:
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_url_sources_are_fetched_and_validated(tmp_path: Path, http_folder: str) -> None:
    write_lines(tmp_path / "good.jsonl", [CHAT, CHAT])
    write_lines(tmp_path / "bad.jsonl", [CHAT, {"messages": "no"}])
    policy = {"allowPrivateAddresses": True, "allowInsecureHttp": True}
    good = DataSource.model_validate({"url": f"{http_folder}/good.jsonl", **policy})
    fmt, records = read_records(good, Paths(artifacts="/tmp"), "auto")
    assert fmt == "chat" and [r.where for r in records] == [
        f"{http_folder}/good.jsonl:1",
        f"{http_folder}/good.jsonl:2",
    ]
    bad = DataSource.model_validate({"url": f"{http_folder}/bad.jsonl", **policy})
    with pytest.raises(WorkloadError, match=r"bad.jsonl:2: messages must be a non-empty list"):
        read_records(bad, Paths(artifacts="/tmp"), "auto")


# --- validation split and batches ----------------------------------------------------------


def test_validation_split_is_deterministic_and_disjoint(tokenizer: Any) -> None:
    records = [
        {"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(20)
    ]  # distinct prompts so examples can be told apart
    spec = DatasetSpec(train=DataSource(inline=records), validation_split=0.2)
    first = load_datasets(spec, Paths(artifacts="/tmp"), tokenizer, 64, seed=7)
    again = load_datasets(spec, Paths(artifacts="/tmp"), tokenizer, 64, seed=7)
    assert (len(first.train), len(first.validation)) == (16, 4)
    assert [e.input_ids for e in first.validation] == [e.input_ids for e in again.validation]
    train_ids = {tuple(e.input_ids) for e in first.train}
    assert not train_ids & {tuple(e.input_ids) for e in first.validation}


def test_epoch_batches_cover_every_example_once_in_a_seeded_order() -> None:
    batches = epoch_batches(203, 8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert [len(b) for b in batches] == [8] * 25 + [3]
    assert batches == epoch_batches(203, 8, seed=3, epoch=0)
    assert batches != epoch_batches(203, 8, seed=3, epoch=1)
    assert batches != epoch_batches(203, 8, seed=4, epoch=0)


def test_collate_packs_examples_into_shared_rows_with_restarting_positions() -> None:
    long = Example([1, 2, 3, 4], [2, 3, 4, -100])
    short = [Example([5, 6], [-100, 7]), Example([8, 9, 10], [9, 10, -100])]
    batch = [short[0], long, short[1]]
    packed = collate(batch, pad_id=0, packing=True, max_length=1024)  # rows up to 2 x 4 tokens
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 8, 9, 10], [5, 6, 0, 0, 0, 0, 0]]
    assert packed.targets.tolist() == [
        [2, 3, 4, -100, 9, 10, -100],
        [-100, 7, -100, -100, -100, -100, -100],
    ]
    assert packed.position_ids is not None
    assert packed.position_ids.tolist()[0] == [0, 1, 2, 3, 0, 1, 2]
    assert (packed.num_tokens, packed.num_targets) == (9, 6)

    narrow = collate(batch, pad_id=0, packing=True, max_length=5)  # rows up to 5 tokens
    assert narrow.input_ids.tolist() == [[1, 2, 3, 4, 0], [8, 9, 10, 5, 6]]

    padded = collate(batch, pad_id=0, packing=False, max_length=1024)
    assert padded.input_ids.tolist() == [[5, 6, 0, 0], [1, 2, 3, 4], [8, 9, 10, 0]]
    assert padded.position_ids is None  # nothing shared: plain causal attention
    assert (padded.num_tokens, padded.num_targets) == (9, 6)
