"""Training data of the fine-tuning workload: read a DataSource (inline records, ConfigMap or
PVC files, or a url fetched by :mod:`tailor.workloads.io.fetch`), validate every record before
any training starts, tokenize records into (input ids, next-token targets) where only
assistant tokens (or the completion, for prompt/completion data) carry a loss, hold out a
validation split, and group examples into batches with almost no padding.

Three record formats are accepted, one per dataset: OpenAI fine-tuning chat JSONL
(``{"messages": [...]}``, optional per-message ``weight`` 0/1, so data prepared for OpenAI's
API works unchanged), prompt/completion JSONL (``{"prompt", "completion"}``; when both are
lists of messages it is treated as a chat whose completion messages are learned), and plain
text (``{"text"}`` records or whole ``.txt``/``.md`` files, every token learned, long
documents cut into ``max_seq_length`` pieces). A bad record fails the run with
``InvalidDataset`` and ``file:line: what is wrong``.

Batches are shuffled slices of ``batchSize`` examples, packing or not, so the optimisation
is that of any trainer. With packing (the default) a batch's examples share rows up to
twice as wide as its longest example, with position ids restarting at each example
(transformers then keeps every example masked off from the others), so little is spent on
padding while attention stays cheap. Without packing, one example per right-padded row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from tailor.api.common import DataSource
from tailor.api.finetunejob import DatasetSpec
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.records import read_raw

Format = Literal["chat", "completion", "text", "kto", "dpo"]
"""A dataset's format; kto and dpo records hold chat or completion records inside."""


IGNORE_INDEX = -100
"""Target id that carries no loss (prompt tokens, padding, unweighted messages)."""


ROLES = ("system", "developer", "user", "assistant")


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Used for tokenizers without a chat template (base models); saved with the artifact so
serving renders chats the same way."""


@dataclass(frozen=True)
class Message:
    """A validated chat message; ``weight`` 0 means it is context, never learned."""

    role: str
    content: str
    weight: int = 1


@dataclass(frozen=True)
class Record:
    """A validated training record and where it came from (``file:line`` or ``inline[i]``)."""

    where: str
    format: Format
    messages: tuple[Message, ...] = ()
    prompt: str = ""
    completion: str = ""
    text: str = ""
    rejected: Record | None = None
    """dpo: the rejected answer to the same prompt (this record holds the chosen one)."""
    label: bool | None = None
    """kto: whether this record's answer is desirable."""

    def answered_with(self, other: Record) -> Record:
        """This record's prompt with ``other``'s answer (kto's mismatched pairs)."""
        if self.format == "completion":
            return Record(self.where, "completion", prompt=self.prompt, completion=other.completion)
        context = tuple(m for m in self.messages if not m.weight)
        answer = tuple(m for m in other.messages if m.weight)
        return Record(self.where, "chat", messages=(*context, *answer))


@dataclass
class Paired:
    """What a preference example adds to its tokenized answer."""

    label: bool | None = None
    """kto: desirable or not."""
    rejected: Example | None = None
    """dpo: the rejected answer (the example itself is the chosen one)."""
    kl: Example | None = None
    """kto: the prompt with another record's answer, for the KL baseline."""


@dataclass
class Example:
    """A tokenized record: ``targets[t]`` is the token to predict after ``input_ids[t]``,
    or :data:`IGNORE_INDEX` where nothing is learned."""

    input_ids: list[int]
    targets: list[int]
    pair: Paired | None = None
    """Set for kto and dpo examples."""

    @property
    def units(self) -> int:
        """What a step's loss is averaged over: learned tokens (sft), or examples."""
        return 1 if self.pair is not None else self.num_targets

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class DatasetStats:
    """What tokenization did to a dataset, for logs and the manifest."""

    records: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class Datasets:
    """Tokenized train and (optional) validation sets."""

    format: Format
    train: list[Example]
    validation: list[Example]
    train_stats: DatasetStats = field(default_factory=DatasetStats)
    validation_stats: DatasetStats = field(default_factory=DatasetStats)


def detect_format(where: str, item: Any) -> Format:
    """The format of a dataset, told from its first record."""
    if isinstance(item, str):
        return "text"
    if isinstance(item, dict):
        if "chosen" in item and "rejected" in item:
            return "dpo"
        if "label" in item and "completion" in item:
            return "kto"
        if "messages" in item:
            return "chat"
        if "prompt" in item or "completion" in item:
            return "completion"
        if "text" in item:
            return "text"
        found = ", ".join(sorted(item)) or "none"
        raise WorkloadError(
            "InvalidDataset",
            f"{where}: cannot tell the record format: expected {{messages: [...]}} (chat), "
            f"{{prompt, completion}}, {{text}}, {{prompt, completion, label}} (kto) or "
            f"{{prompt, chosen, rejected}} (dpo); found keys {found}",
        )
    raise WorkloadError(
        "InvalidDataset", f"{where}: a record must be a JSON object, not {_kind(item)}"
    )


def validate_record(where: str, item: Any, fmt: Format) -> Record:
    """A :class:`Record` of the expected format, or ``InvalidDataset`` naming what is wrong."""

    def bad(problem: str) -> WorkloadError:
        return WorkloadError("InvalidDataset", f"{where}: {problem}")

    if fmt in ("kto", "dpo"):
        return _validate_preference(where, item, fmt, bad)
    if fmt == "text" and isinstance(item, str):
        if not item.strip():
            raise bad("empty text")
        return Record(where, "text", text=item)
    if not isinstance(item, dict):
        raise bad(f"a record must be a JSON object, not {_kind(item)}")
    if fmt == "chat":
        if "messages" not in item:
            raise bad(f"expected a chat record {{messages: [...]}}; found keys {_keys(item)}")
        messages = _validate_messages(item["messages"], "messages", bad)
        return Record(where, "chat", messages=messages)
    if fmt == "completion":
        prompt, completion = item.get("prompt"), item.get("completion")
        if prompt is None or completion is None:
            raise bad(f"expected {{prompt, completion}}; found keys {_keys(item)}")
        if isinstance(prompt, list) and isinstance(completion, list):
            context = [
                Message(m.role, m.content, 0)
                for m in _validate_messages(prompt, "prompt", bad, need_assistant=False)
            ]
            answer = _validate_messages(completion, "completion", bad, need_assistant=True)
            return Record(where, "chat", messages=(*context, *answer))
        if not isinstance(prompt, str):
            raise bad(f"prompt must be a string, not {_kind(prompt)}")
        if not isinstance(completion, str):
            raise bad(f"completion must be a string, not {_kind(completion)}")
        if not completion.strip():
            raise bad("completion is empty: there is nothing to learn")
        return Record(where, "completion", prompt=prompt, completion=completion)
    text = item.get("text")
    if not isinstance(text, str):
        raise bad(f"expected {{text: string}}; found keys {_keys(item)}")
    if not text.strip():
        raise bad("text is empty")
    return Record(where, "text", text=text)


def _validate_preference(where: str, item: Any, fmt: Format, bad: Any) -> Record:
    """A kto or dpo record in TRL's formats: prompt and answers as strings, or as message
    lists (the prompt's messages are context, the answers' assistant messages learned)."""
    if not isinstance(item, dict):
        raise bad(f"a record must be a JSON object, not {_kind(item)}")
    wanted = ("prompt", "completion", "label") if fmt == "kto" else ("prompt", "chosen", "rejected")
    if any(key not in item for key in wanted):
        raise bad(f"expected {{{', '.join(wanted)}}} ({fmt}); found keys {_keys(item)}")

    def answer(key: str) -> Record:
        pair = {"prompt": item["prompt"], "completion": item[key]}
        try:
            return validate_record(where, pair, "completion")
        except WorkloadError as exc:
            raise bad(str(exc).split(": ", 1)[-1].replace("completion", key)) from exc

    if fmt == "kto":
        if not isinstance(item["label"], bool):
            raise bad(f"label must be true or false, not {_kind(item['label'])}")
        return replace(answer("completion"), label=item["label"])
    return replace(answer("chosen"), rejected=answer("rejected"))


def _validate_messages(
    value: Any, name: str, bad: Any, need_assistant: bool = True
) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise bad(f"{name} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{at} must be an object with role and content, not {_kind(message)}")
        role = message.get("role")
        if (
            role in ("tool", "function")
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            raise bad(f"{at}: tool and function calling examples are not supported yet")
        if role not in ROLES:
            raise bad(f"{at}.role is {role!r}; expected one of {', '.join(ROLES)}")
        content = _content_text(message.get("content"), at, bad)
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise bad(f"{at}.weight is {weight!r}; expected 0 or 1")
        if role == "assistant" and not content.strip():
            raise bad(f"{at}: assistant content is empty")
        messages.append(Message("system" if role == "developer" else role, content, weight))
    if need_assistant and not any(m.role == "assistant" and m.weight for m in messages):
        raise bad(f"{name} has no assistant message with weight 1: there is nothing to learn")
    return tuple(messages)


def _content_text(content: Any, at: str, bad: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise bad(f"{at}.content[{j}] is {kind!r}; only text parts are supported")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad(f"{at}.content must be a string, not {_kind(content)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _keys(item: dict[str, Any]) -> str:
    return ", ".join(sorted(item)) or "none"


def read_records(
    source: DataSource, paths: Paths, fmt: str, counts: dict[str, Any] | None = None
) -> tuple[Format, list[Record]]:
    """Every record of a source, validated; ``fmt`` is ``auto`` or a :data:`Format`;
    ``counts`` receives what a feedback source was made of."""
    raw = read_raw(source, paths, counts)
    if not raw:
        raise WorkloadError("InvalidDataset", "the dataset has no records")
    detected: Format = detect_format(*raw[0]) if fmt == "auto" else fmt  # type: ignore[assignment]
    return detected, [validate_record(where, item, detected) for where, item in raw]


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template a plain ChatML one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def tokenize_record(record: Record, tokenizer: Any, max_length: int) -> tuple[list[Example], bool]:
    """The examples of a record (text may make several) and whether it was truncated."""
    if record.format == "chat":
        text, spans = _render_chat(record, tokenizer)
        return _from_spans(text, spans, tokenizer, max_length, add_special_tokens=False)
    if record.format == "completion":
        text = record.prompt + record.completion
        return _from_spans(text, [(len(record.prompt), len(text))], tokenizer, max_length, eos=True)
    ids = tokenizer(record.text, add_special_tokens=True)["input_ids"]
    ids = [*ids, tokenizer.eos_token_id]
    examples = []
    for start in range(0, len(ids) - 1, max_length):  # long documents: consecutive pieces
        piece = ids[start : start + max_length + 1]
        examples.append(Example(piece[:-1], piece[1:]))
    return examples, False


def _render_chat(record: Record, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the messages to learn.

    A learned message spans from the end of the conversation before it rendered with a
    generation prompt (``<|im_start|>assistant\\n``) to the end of the conversation through
    it (content and end-of-turn tokens), so the model learns to answer and to stop.
    """
    messages = [{"role": m.role, "content": m.content} for m in record.messages]

    def render(upto: int, generation_prompt: bool = False) -> str:
        return str(
            tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    full = render(len(messages))
    spans = []
    searched = 0
    for i, message in enumerate(record.messages):
        if message.role != "assistant" or not message.weight:
            continue
        before, through = render(i, True) if i else "", render(i + 1)
        if i and full.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
        else:  # a template that rewrites earlier turns: find the content itself
            start = full.find(message.content, searched)
            if start < 0:
                raise WorkloadError(
                    "InvalidDataset",
                    f"{record.where}: the chat template drops messages[{i}]; "
                    "check the roles and their order",
                )
            spans.append((start, start + len(message.content)))
        searched = spans[-1][1]
    return full, spans


def _from_spans(
    text: str,
    spans: list[tuple[int, int]],
    tokenizer: Any,
    max_length: int,
    add_special_tokens: bool = True,
    eos: bool = False,
) -> tuple[list[Example], bool]:
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    learned = [any(s <= start < e for s, e in spans) for start, _ in encoded["offset_mapping"]]
    if eos:
        ids.append(tokenizer.eos_token_id)
        learned.append(True)
    labels = [i if keep else IGNORE_INDEX for i, keep in zip(ids, learned, strict=True)]
    truncated = len(ids) > max_length
    example = Example(ids[:max_length], [*labels[1:], IGNORE_INDEX][:max_length])
    return ([example] if example.num_targets else []), truncated


def tokenize_records(
    records: list[Record], tokenizer: Any, max_length: int
) -> tuple[list[Example], DatasetStats]:
    """Tokenize every record; examples left with nothing to learn are dropped and counted.
    A kto or dpo record is one example, its other answer (dpo) or its mismatched pair
    (kto: the prompt with the next record's answer) inside."""
    stats = DatasetStats(records=len(records))
    examples: list[Example] = []
    for i, record in enumerate(records):
        produced, truncated = tokenize_record(record, tokenizer, max_length)
        if produced and (record.rejected is not None or record.label is not None):
            other = (
                record.rejected
                if record.rejected is not None
                else record.answered_with(records[(i + 1) % len(records)])
            )
            second, cut = tokenize_record(other, tokenizer, max_length)
            truncated = truncated or cut
            if second:
                kto = record.label is not None
                produced[0].pair = Paired(
                    label=record.label,
                    rejected=None if kto else second[0],
                    kl=second[0] if kto else None,
                )
            produced = produced[:1] if second else []
        stats.truncated += truncated
        stats.dropped += not produced
        examples.extend(produced)
    stats.examples = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.target_tokens = sum(e.num_targets for e in examples)
    return examples, stats


@dataclass
class RecordSets:
    """Validated train and validation records, before tokenization."""

    format: Format
    train: list[Record]
    validation: list[Record]
    feedback: dict[str, Any] = field(default_factory=dict)
    """By dataset (train, validation): what a feedback source was made of."""


def read_datasets(spec: DatasetSpec, paths: Paths, seed: int) -> RecordSets:
    """Read and validate train and validation records (a source or a held-out share of
    train, chosen by ``seed``). Needs no model, so bad data fails in a second."""
    feedback: dict[str, Any] = {"train": {}, "validation": {}}
    fmt, train = read_records(spec.train, paths, spec.format, feedback["train"])
    validation: list[Record] = []
    if spec.validation is not None:
        _, validation = read_records(spec.validation, paths, fmt, feedback["validation"])
    elif spec.validation_split:
        if len(train) < 2:
            raise WorkloadError(
                "InvalidDataset", "validationSplit needs at least 2 training records"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        held = min(max(1, math.ceil(spec.validation_split * len(train))), len(train) - 1)
        chosen = set(order[:held].tolist())
        validation = [r for i, r in enumerate(train) if i in chosen]
        train = [r for i, r in enumerate(train) if i not in chosen]
    return RecordSets(fmt, train, validation, {k: v for k, v in feedback.items() if v})


def tokenize_datasets(records: RecordSets, tokenizer: Any, max_length: int) -> Datasets:
    """Tokenize validated records with the tokenizer's chat template (ChatML if it has none)."""
    ensure_chat_template(tokenizer)
    train, train_stats = tokenize_records(records.train, tokenizer, max_length)
    validation, validation_stats = tokenize_records(records.validation, tokenizer, max_length)
    if not train:
        raise WorkloadError(
            "InvalidDataset",
            f"no training example has a token to learn within maxSeqLength {max_length}; "
            "raise training.maxSeqLength or shorten the prompts",
        )
    return Datasets(records.format, train, validation, train_stats, validation_stats)


def load_datasets(
    spec: DatasetSpec, paths: Paths, tokenizer: Any, max_length: int, seed: int
) -> Datasets:
    """:func:`read_datasets` then :func:`tokenize_datasets`."""
    return tokenize_datasets(read_datasets(spec, paths, seed), tokenizer, max_length)


@dataclass
class Batch:
    """Model inputs of one device step; ``targets`` is aligned with ``input_ids``."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor | None
    num_tokens: int
    num_targets: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.targets.to(device),
            None if self.position_ids is None else self.position_ids.to(device),
            self.num_tokens,
            self.num_targets,
        )


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch: shuffled slices in the order
    transformers' Trainer uses for the same seed (``randperm`` seeded with seed + epoch),
    so runs can be compared with it. A pure function of its arguments: a resumed run sees
    exactly the order the interrupted one would have. (Grouping batches by length saves
    padding too, but cost 0.02-0.04 of eval loss in the APIBench benchmark; packing saves
    it without changing what a batch holds.)"""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def collate(examples: list[Example], pad_id: int, packing: bool, max_length: int) -> Batch:
    """The rows of one batch, right-padded. With packing, examples share rows (first fit,
    longest first) with position ids restarting at each example, so transformers masks
    every example off from the others; without, one example per row and no attention
    mask at all (with a causal mask no token sees the padding after it)."""
    if packing:
        longest = max(len(e) for e in examples)
        rows = pack_rows(examples, max(longest, min(2 * longest, max_length)))
    else:
        rows = [[e] for e in examples]
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    targets = torch.full((len(rows), width), IGNORE_INDEX)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for e in row:
            ids[r, offset : offset + len(e)] = torch.tensor(e.input_ids)
            targets[r, offset : offset + len(e)] = torch.tensor(e.targets)
            positions[r, offset : offset + len(e)] = torch.arange(len(e))
            offset += len(e)
    shared = any(len(row) > 1 for row in rows)
    return Batch(
        ids,
        targets,
        positions if shared else None,
        sum(len(e) for e in examples),
        sum(e.num_targets for e in examples),
    )


def pack_rows(examples: list[Example], width: int) -> list[list[Example]]:
    """First-fit decreasing into rows of at most ``width`` tokens. Rows twice as wide as the
    longest example let short ones pair up while attention, whose cost grows with the
    square of a row's width, stays cheap (one row for a whole batch was measured slower
    than padding)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        for r, free in enumerate(room):
            if len(example) <= free:
                rows[r].append(example)
                room[r] -= len(example)
                break
        else:
            rows.append([example])
            room.append(width - len(example))
    return rows
