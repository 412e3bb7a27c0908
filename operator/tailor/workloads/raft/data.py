"""RAFT training data from a knowledge base: ``python -m tailor.workloads.raft.data --spec FILE``.

The recipe of Zhang et al. 2024 ("RAFT: Adapting Language Model to Domain Specific RAG"):
every example is a question, a context of documents (the knowledge base's chunks) and a
chain-of-thought answer that quotes the gold document verbatim between ``##begin_quote##``
and ``##end_quote##`` and ends with an ``##Answer:`` line. For a share P of the examples
the gold document is in the context among k distractors; for the others the context holds
k + 1 distractors and no gold document, so the model learns both to read the right
document and to ignore the wrong ones. Distractors are the retriever's nearest neighbours
outside the gold document (hard negatives) or random chunks; documents are shuffled.

Questions come from a DataSource (question, gold answer, optional gold document id) or
are written per chunk by a teacher model behind an OpenAI-compatible endpoint, which then
also writes the reasoning. Without a teacher the reasoning is built from the gold answer
and the gold document's sentence that best matches it. Every quote is checked to be a
verbatim substring of the gold document; a teacher answer that fails the check is
replaced by the built one (or dropped when there is no gold answer), and counted.

The prompt is exactly what a ModelDeployment serving the knowledge base sends the model
(``prompting.build_messages``: the default context block, numbered documents), so the
adapter is trained in the format it is served in. Outputs, written to a temporary folder
and renamed into place: ``train.jsonl`` and ``validation.jsonl`` (OpenAI chat records for
the child FineTuneJob), ``holdout.jsonl`` (held-out questions with their paper-protocol
context, for the evaluation) and ``manifest.json`` (stats, recipe, sha256 of every file).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tailor.api.raftjob import Questions, RaftRecipe
from tailor.api.workloads import (
    RAFT_HOLDOUT_FILE,
    RAFT_TRAIN_FILE,
    RAFT_VALIDATION_FILE,
    Paths,
    RaftDataRun,
    RetrieverConfig,
)
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.apibench import ANSWER_MARK, final_answer
from tailor.workloads.evaluation.chat import ChatClient, ChatError
from tailor.workloads.io.sources import read_secret
from tailor.workloads.io.storage import artifact_uri, sha256_file, store_of
from tailor.workloads.program import limit_cpu_threads, run_main, write_termination_message
from tailor.workloads.progress import make_reporter

log = logging.getLogger("tailor.workloads.raft.data")


BEGIN_QUOTE = "##begin_quote##"


END_QUOTE = "##end_quote##"


RAFT_SYSTEM = (
    "Answer the question from the documents. First reason step by step and quote the "
    f"sentences you rely on verbatim between {BEGIN_QUOTE} and {END_QUOTE}; then give "
    f"the final answer on a last line that starts with {ANSWER_MARK}"
)


VALIDATION_SHARE = 0.05


TEACHER_CONCURRENCY = 8


_QUOTE = re.compile(re.escape(BEGIN_QUOTE) + r"(.*?)" + re.escape(END_QUOTE), re.S)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


_WORD = re.compile(r"\w+")


_NUMBERING = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022]|Q\d*[:.])\s*")


@dataclass(frozen=True)
class Doc:
    """A knowledge-base chunk: a RAFT "document" (fits ``prompting.ContextDocument``)."""

    id: str
    text: str
    title: str | None
    source: str | None
    document_id: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "title": self.title,
            "source": self.source,
            "documentId": self.document_id,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Doc:
        return cls(
            id=record["id"],
            text=record["text"],
            title=record.get("title"),
            source=record.get("source"),
            document_id=record.get("documentId", ""),
        )


@dataclass
class Question:
    """A question with its gold answer and gold chunk (once resolved)."""

    question: str
    answer: str | None
    document_id: str | None
    where: str
    gold: Doc | None = None
    cot: str | None = None  # a teacher's reasoning, already checked


@dataclass
class Stats:
    """What the run produced; ``status.dataset`` and the manifest carry it."""

    questions: int = 0
    examples: int = 0
    validation: int = 0
    holdout: int = 0
    with_oracle: float = 0.0
    mean_context_tokens: float = 0.0
    distractors: int = 0
    hard_negatives: float = 0.0
    skipped_unknown_document: int = 0
    teacher_answers: int = 0
    teacher_answers_rejected: int = 0
    teacher_questions: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


def quotes(answer: str) -> list[str]:
    """The quoted passages of an answer, stripped."""
    return [q.strip() for q in _QUOTE.findall(answer)]


def quotes_are_verbatim(answer: str, document: str) -> bool:
    """Whether the answer quotes at least once and every quote is in ``document``."""
    found = quotes(answer)
    return bool(found) and all(q and q in document for q in found)


def sentences(text: str) -> list[str]:
    """The sentences and lines of a document, each a verbatim substring of it."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def best_sentence(document: str, answer: str, question: str) -> str:
    """The document's sentence whose words best match the answer's (F1 of the word sets,
    so a short sentence that is all answer beats a long one that merely shares many
    words), then the question's. Falls back to the document's first 300 characters."""
    answer_words, question_words = _words(answer), _words(question)
    best: tuple[float, float, str] | None = None
    for sentence in sentences(document):
        words = _words(sentence)
        if not words:
            continue
        f1 = 2 * len(words & answer_words) / (len(words) + len(answer_words) or 1)
        key = (f1, len(words & question_words) / len(words), sentence)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None or best[0] == 0:
        return document.strip()[:300].strip()
    return best[2]


def built_answer(question: str, answer: str, gold: Doc) -> str:
    """Chain of thought from the gold answer and the best-matching gold sentence."""
    quote = best_sentence(gold.text, answer, question)
    where = f"The document {gold.title!r}" if gold.title else "The relevant document"
    return (
        f"##Reason: {where} says {BEGIN_QUOTE}{quote}{END_QUOTE} "
        "This is what the question asks about, so the answer follows from it.\n"
        f"{ANSWER_MARK} {answer}"
    )


def load_chunks(config: RetrieverConfig, paths: Paths) -> list[Doc]:
    """Every chunk of the knowledge base's published index."""
    from tailor.workloads.knowledge.retriever import RetrieverUnavailable
    from tailor.workloads.knowledge.vectorstore import StoreUnavailable, open_store

    store = open_store(config, paths)
    try:
        points = list(store.searchable(config.alias).scroll())
    except (StoreUnavailable, RetrieverUnavailable, ValueError, OSError) as exc:
        raise WorkloadError(
            "KnowledgeBaseUnavailable", f"cannot read knowledge base {config.alias!r}: {exc}"
        ) from exc
    finally:
        store.close()
    docs = []
    for id_, payload in points:
        docs.append(
            Doc(
                id=id_,
                text=str(payload.get("text", "")),
                title=payload.get("title"),
                source=payload.get("source"),
                document_id=str(payload.get("document_id", "")),
                metadata=dict(payload.get("metadata") or {}),
            )
        )
    positions = {id_: int(payload.get("position") or 0) for id_, payload in points}
    docs.sort(key=lambda d: (d.document_id, positions[d.id], d.id))  # seeded runs repeat
    return docs


def read_questions(questions: Questions, paths: Paths) -> list[Question]:
    """Question records of ``questions.source``; a bad record fails with where it is."""
    from tailor.workloads.io.records import read_raw

    assert questions.source is not None
    fields = questions.fields
    out = []
    for where, record in read_raw(questions.source, paths):
        if not isinstance(record, dict):
            raise WorkloadError(
                "InvalidQuestions", f"{where}: a question record must be a JSON object"
            )
        question = record.get(fields.question)
        if not isinstance(question, str) or not question.strip():
            raise WorkloadError(
                "InvalidQuestions",
                f"{where}: field {fields.question!r} must be a non-empty string "
                "(set spec.questions.fields.question to the field that holds the question)",
            )
        answer = record.get(fields.answer) if fields.answer else None
        if not isinstance(answer, str) or not answer.strip():
            raise WorkloadError(
                "InvalidQuestions",
                f"{where}: field {fields.answer!r} must hold the gold answer; without a "
                "teacher, answers are built from it (set spec.questions.fields.answer, or "
                "use spec.questions.generate with a teacher)",
            )
        document_id = record.get(fields.document_id) if fields.document_id else None
        out.append(
            Question(
                question=question.strip(),
                answer=answer.strip(),
                document_id=None if document_id in (None, "") else str(document_id),
                where=where,
            )
        )
    if not out:
        raise WorkloadError("InvalidQuestions", "the question source holds no records")
    return out


class Teacher:
    """An OpenAI-compatible chat endpoint (a ModelDeployment or an external API) writing
    questions and answers; a request that fails for good is ``TeacherFailed`` (refused) or
    ``TeacherUnavailable`` (retries ran out)."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key: str | None,
        timeout: float = 300,
        transport: httpx.BaseTransport | None = None,
    ):
        self.endpoint = ChatClient(base_url, api_key=api_key, timeout=timeout, transport=transport)
        self.model = model or self._first_model()

    @property
    def client(self) -> httpx.Client:
        """The httpx client underneath (its transport is the URL guard, if any)."""
        return self.endpoint.http

    @contextmanager
    def _failures(self) -> Iterator[None]:
        try:
            yield
        except ChatError as exc:
            if exc.refused:
                raise WorkloadError(
                    "TeacherFailed", f"the teacher refused a request: {exc}"
                ) from exc
            raise WorkloadError("TeacherUnavailable", f"the teacher did not answer: {exc}") from exc

    def _first_model(self) -> str:
        with self._failures():
            models = self.endpoint.models()
        if not models:
            raise WorkloadError("TeacherUnavailable", "the teacher endpoint lists no models")
        return models[0]

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 512) -> str:
        with self._failures():
            return self.endpoint.chat(
                messages,
                model=self.model,
                temperature=0,
                max_tokens=max_tokens,
                tailor={"retrieval": False},  # ignored by other servers
            )

    def questions(self, doc: Doc, count: int) -> list[str]:
        text = self.chat(
            [
                {"role": "system", "content": "You write exam questions about documents."},
                {
                    "role": "user",
                    "content": f"Document:\n{doc.text}\n\nWrite {count} different questions "
                    "that this document answers, one per line, without answers.",
                },
            ],
            max_tokens=64 * count,
        )
        found = []
        for line in text.splitlines():
            line = _NUMBERING.sub("", line).strip()
            if len(line) >= 8 and line not in found:
                found.append(line)
        return found[:count]

    def answer(self, question: str, gold: Doc, max_tokens: int = 512) -> str:
        return self.chat(
            [
                {"role": "system", "content": RAFT_SYSTEM},
                {
                    "role": "user",
                    "content": f"Document:\n{gold.text}\n\nQuestion: {question}\n\nCopy every "
                    f"quoted sentence exactly as it appears in the document. End with one line "
                    f"'{ANSWER_MARK} <the answer>'.",
                },
            ],
            max_tokens,
        )

    def close(self) -> None:
        self.endpoint.close()


def make_teacher(run: RaftDataRun) -> Teacher:
    generate = run.spec.questions.generate
    assert generate is not None
    if not run.teacher_url:
        raise WorkloadError("TeacherUnavailable", "the teacher's URL was not resolved")
    teacher = generate.teacher
    api_key = (
        read_secret(teacher.api_key_secret_ref, run.paths) if teacher.api_key_secret_ref else None
    )
    model = teacher.model or (teacher.deployment_ref.name if teacher.deployment_ref else None)
    if teacher.deployment_ref is not None:  # the operator resolved its Service in-cluster
        return Teacher(run.teacher_url, model, api_key)
    from tailor.workloads.io.fetch import GuardedTransport

    guard = GuardedTransport(
        allow_private_addresses=teacher.allow_private_addresses,
        allow_insecure_http=teacher.allow_insecure_http,
    )
    return Teacher(run.teacher_url, model, api_key, transport=guard)


def generate_questions(
    teacher: Teacher, chunks: list[Doc], per_chunk: int, stats: Stats, answer_tokens: int = 512
) -> list[Question]:
    """Questions per chunk from the teacher, each answered by it with checked quotes."""

    def for_chunk(doc: Doc) -> tuple[list[Question], int]:
        out, asked = [], 0
        for text in teacher.questions(doc, per_chunk):
            cot = teacher.answer(text, doc, answer_tokens)
            asked += 1
            if ANSWER_MARK in cot and quotes_are_verbatim(cot, doc.text):
                out.append(
                    Question(text, final_answer(cot), doc.document_id, f"chunk {doc.id}", doc, cot)
                )
        return out, asked

    with ThreadPoolExecutor(TEACHER_CONCURRENCY) as pool:
        results = list(pool.map(for_chunk, chunks))
    questions = [q for batch, _ in results for q in batch]
    stats.teacher_answers = sum(asked for _, asked in results)
    stats.teacher_answers_rejected = stats.teacher_answers - len(questions)
    stats.teacher_questions = len(questions)
    if not questions:
        raise WorkloadError(
            "TeacherFailed",
            f"the teacher wrote {stats.teacher_answers} answers and none quoted its document "
            f"verbatim with an {ANSWER_MARK} line; use a stronger teacher model or give "
            "questions with answers (spec.questions.source)",
        )
    return questions


def resolve_gold(
    questions: list[Question], chunks: list[Doc], retriever: Any, stats: Stats
) -> list[Question]:
    """Each question's gold chunk: the named document's chunk nearest to the question
    (its only chunk when documents are not split); without a document id, the chunk
    nearest to question and answer. Questions naming a document the knowledge base does
    not hold are skipped and counted."""
    by_document: dict[str, list[Doc]] = defaultdict(list)
    by_id = {d.id: d for d in chunks}
    for doc in chunks:
        by_document[doc.document_id].append(doc)
    resolved, ambiguous = [], []
    for q in questions:
        if q.gold is not None:
            resolved.append(q)
        elif q.document_id is None:
            ambiguous.append(q)
        elif q.document_id not in by_document:
            stats.skipped_unknown_document += 1
            if len(stats.skipped) < 10:
                stats.skipped.append(
                    f"{q.where}: document {q.document_id!r} not in the knowledge base"
                )
        elif len(by_document[q.document_id]) == 1:
            q.gold = by_document[q.document_id][0]
            resolved.append(q)
        else:
            hit = retriever.search(
                q.question, top_k=1, score_threshold=-1.0, filters={"document_id": q.document_id}
            )
            q.gold = by_id.get(hit[0].id) if hit else by_document[q.document_id][0]
            resolved.append(q)
    if ambiguous:
        hits = retriever.search_batch(
            [f"{q.question}\n{q.answer}" for q in ambiguous], top_k=1, score_threshold=-1.0
        )
        for q, hit in zip(ambiguous, hits, strict=True):
            if hit and hit[0].id in by_id:
                q.gold = by_id[hit[0].id]
                resolved.append(q)
    if stats.skipped_unknown_document:
        log.warning(
            "%d questions name documents the knowledge base does not hold, e.g. %s",
            stats.skipped_unknown_document,
            stats.skipped[0],
        )
    if not resolved:
        raise WorkloadError(
            "InvalidQuestions",
            "no question's gold document is in the knowledge base "
            f"({'; '.join(stats.skipped[:3])}); check spec.questions.fields.documentId against "
            "the knowledge base's document ids (its format's idField)",
        )
    return resolved


def largest_document(chunks: list[Doc]) -> int:
    """How many chunks the most-split document has (0 for no chunks)."""
    return max(Counter(doc.document_id for doc in chunks).values(), default=0)


def check_distractors(recipe: RaftRecipe, chunks: list[Doc]) -> None:
    """Every example needs k + 1 chunks outside its gold document (k distractors, plus
    one to stand in for the gold document in the 1 - P examples without it)."""
    available = len(chunks) - largest_document(chunks)
    needed = recipe.distractors + 1
    if available < needed:
        raise WorkloadError(
            "TooFewDocuments",
            f"spec.raft.distractors is {recipe.distractors}, so every example needs "
            f"{needed} chunks outside its gold document, but the knowledge base has "
            f"{len(chunks)} chunks ({available} outside the largest document): lower "
            f"spec.raft.distractors to at most {max(available - 1, 0)} or add documents",
        )


def pick_distractors(
    questions: list[Question],
    chunks: list[Doc],
    recipe: RaftRecipe,
    retriever: Any,
    rng: random.Random,
) -> tuple[list[list[Doc]], int]:
    """k + 1 distractors per question, best first, none from the gold document.

    Hard: the retriever's nearest neighbours of the question (topped up at random if the
    index returns too few); random: a uniform sample. Returns the lists and how many
    distractors were hard negatives."""
    needed = recipe.distractors + 1
    neighbours: list[list[str]] = [[] for _ in questions]
    if recipe.distractor_sampling == "hard" and needed:
        top_k = min(len(chunks), needed + largest_document(chunks))
        hits = retriever.search_batch(
            [q.question for q in questions], top_k=top_k, score_threshold=-1.0
        )
        neighbours = [[h.id for h in hit] for hit in hits]
    by_id = {d.id: d for d in chunks}
    out, hard = [], 0
    for q, near in zip(questions, neighbours, strict=True):
        assert q.gold is not None
        gold_document = q.gold.document_id
        chosen = [by_id[i] for i in near if i in by_id and by_id[i].document_id != gold_document][
            :needed
        ]
        hard += len(chosen)
        if len(chosen) < needed:
            taken = {d.id for d in chosen}
            pool = [d for d in chunks if d.document_id != gold_document and d.id not in taken]
            chosen += rng.sample(pool, needed - len(chosen))
        out.append(chosen)
    return out, hard


def context_for(
    gold: Doc, distractors: list[Doc], with_oracle: bool, k: int, rng: random.Random
) -> list[Doc]:
    """k + 1 shuffled documents: the gold one and k distractors, or k + 1 distractors."""
    docs = [gold, *distractors[:k]] if with_oracle else list(distractors[: k + 1])
    rng.shuffle(docs)
    return docs


def chat_record(question: str, context: list[Doc], answer: str | None = None) -> dict[str, Any]:
    """An OpenAI chat record whose user turn is what serving would send the model."""
    from tailor.workloads.serving.prompting import Message, build_messages

    messages = build_messages(
        None, [Message("system", RAFT_SYSTEM), Message("user", question)], context
    )
    record = {"messages": [m.as_dict() for m in messages]}
    if answer is not None:
        record["messages"].append({"role": "assistant", "content": answer})
    return record


def split(
    items: list[Question], share: float, rng: random.Random, minimum: int = 1
) -> tuple[list[Question], list[Question]]:
    """(rest, held out): a seeded random ``share`` of the items, at least ``minimum``."""
    order = list(range(len(items)))
    rng.shuffle(order)
    count = max(minimum, round(share * len(items)))
    held = sorted(order[:count])
    rest = sorted(order[count:])
    return [items[i] for i in rest], [items[i] for i in held]


def answer_for(q: Question, chain_of_thought: bool) -> str:
    assert q.gold is not None and q.answer is not None
    if not chain_of_thought:
        return q.answer
    return q.cot or built_answer(q.question, q.answer, q.gold)


def holdout_record(q: Question, context: list[Doc]) -> dict[str, Any]:
    """A held-out question with the context the paper's protocol shows with it."""
    assert q.gold is not None and q.answer is not None
    return {
        "question": q.question,
        "answer": q.answer,
        "documentId": q.gold.document_id,
        "goldChunkId": q.gold.id,
        "context": [d.as_record() for d in context],
    }


def generate(run: RaftDataRun, retriever: Any = None, tokenizer: Any = None) -> Stats:
    """Build the dataset into ``run.output_dir``; returns its stats."""
    started = time.monotonic()
    spec, recipe = run.spec, run.spec.raft
    stats = Stats(distractors=recipe.distractors)
    chunks = load_chunks(run.knowledge_base, run.paths)
    log.info("knowledge base %s: %d chunks", run.knowledge_base.alias, len(chunks))
    check_distractors(recipe, chunks)
    if retriever is None:
        from tailor.workloads.knowledge.retriever import Retriever

        retriever = Retriever(run.knowledge_base, run.paths)
    rng = random.Random(recipe.seed)

    if spec.questions.generate:
        teacher = make_teacher(run)
        try:
            questions = generate_questions(
                teacher, chunks, spec.questions.generate.per_chunk, stats
            )
        finally:
            teacher.close()
    else:
        questions = read_questions(spec.questions, run.paths)
    stats.questions = len(questions)
    questions = resolve_gold(questions, chunks, retriever, stats)
    if len(questions) < 3:
        raise WorkloadError(
            "InvalidQuestions",
            f"{len(questions)} usable questions; RAFT needs at least 3 (training, validation "
            "and held-out evaluation)",
        )
    train_questions, holdout = split(questions, spec.evaluation.holdout, rng)
    train_questions, validation = split(train_questions, VALIDATION_SHARE, rng)
    if not train_questions:
        raise WorkloadError(
            "InvalidQuestions", "no question is left for training after the holdout"
        )

    # The paper's P: exactly round(P * n) training examples carry the gold document.
    everything = train_questions + validation
    oracle_count = round(recipe.oracle_probability * len(everything))
    oracle = set(rng.sample(range(len(everything)), oracle_count))
    distractors, hard = pick_distractors(everything + holdout, chunks, recipe, retriever, rng)
    stats.hard_negatives = hard / max(1, len(distractors) * (recipe.distractors + 1))

    records, context_tokens = [], []
    for index, q in enumerate(everything):
        assert q.gold is not None
        context = context_for(q.gold, distractors[index], index in oracle, recipe.distractors, rng)
        record = chat_record(q.question, context, answer_for(q, recipe.chain_of_thought))
        if recipe.chain_of_thought and not quotes_are_verbatim(
            record["messages"][-1]["content"], q.gold.text
        ):
            raise AssertionError(f"{q.where}: a quote is not verbatim")  # by construction
        records.append(record)
        if tokenizer is not None:
            user = record["messages"][-2]["content"]
            context_tokens.append(len(tokenizer(user, add_special_tokens=False)["input_ids"]))
        else:
            context_tokens.append(sum(len(_WORD.findall(d.text)) for d in context))
    holdout_records = [
        holdout_record(q, context_for(q.gold, chosen, True, recipe.distractors, rng))
        for q, chosen in zip(holdout, distractors[len(everything) :], strict=True)
        if q.gold is not None
    ]

    stats.examples = len(train_questions)
    stats.validation = len(validation)
    stats.holdout = len(holdout)
    stats.with_oracle = oracle_count / len(everything)
    stats.mean_context_tokens = sum(context_tokens) / len(context_tokens)
    stats.seconds = round(time.monotonic() - started, 2)
    write_dataset(
        run,
        records[: len(train_questions)],
        records[len(train_questions) :],
        holdout_records,
        stats,
    )
    return stats


def write_dataset(
    run: RaftDataRun,
    train_records: list[dict[str, Any]],
    validation_records: list[dict[str, Any]],
    holdout_records: list[dict[str, Any]],
    stats: Stats,
) -> None:
    """Write the files into a temporary folder, then rename it into place: a run that
    dies half-way leaves no folder that looks complete."""
    output = Path(run.output_dir)
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, rows in (
        (RAFT_TRAIN_FILE, train_records),
        (RAFT_VALIDATION_FILE, validation_records),
        (RAFT_HOLDOUT_FILE, holdout_records),
    ):
        with (staging / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    files = [
        {"path": p.name, "sha256": sha256_file(p), "sizeBytes": p.stat().st_size}
        for p in sorted(staging.iterdir())
    ]
    manifest = {
        "kind": "RAFTDataset",
        "owner": run.owner.model_dump(by_alias=True),
        "knowledgeBase": run.knowledge_base.alias,
        "recipe": run.spec.raft.model_dump(by_alias=True),
        "questions": "generated" if run.spec.questions.generate else "source",
        "systemPrompt": RAFT_SYSTEM,
        "stats": {_camel(k): v for k, v in asdict(stats).items()},
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def status_patch(run: RaftDataRun, stats: Stats) -> dict[str, Any]:
    output = Path(run.output_dir)
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    return {
        "dataset": {
            "examples": stats.examples,
            "withOracle": round(stats.with_oracle, 4),
            "meanContextTokens": round(stats.mean_context_tokens, 1),
            "holdout": stats.holdout,
            "artifact": {
                "uri": artifact_uri(output, run.paths),
                "sha256": sha256_file(output / "manifest.json"),
                "sizeBytes": size,
            },
        }
    }


def work(run: RaftDataRun) -> None:
    from tailor.workloads.io.model_loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(run.spec.fine_tune.base_model, run.paths)
    except WorkloadError:
        raise
    except Exception as exc:  # counting context tokens is worth a warning, not a failure
        log.warning("cannot load the base model's tokenizer (%s); counting words instead", exc)
        tokenizer = None
    stats = generate(run, tokenizer=tokenizer)
    log.info(
        "wrote %d training, %d validation and %d held-out examples (gold document in %.0f%%, "
        "%.0f context tokens on average) to %s",
        stats.examples,
        stats.validation,
        stats.holdout,
        100 * stats.with_oracle,
        stats.mean_context_tokens,
        run.output_dir,
    )
    store = store_of(run.paths)
    if store:  # the dataset also lands in the bucket (marker last); the claim keeps its copy
        store.push(run.output_dir)
    patch = status_patch(run, stats)
    make_reporter(run.reporter, run.owner).report(patch, final=True)
    # last: the operator takes the stage as done only with this report
    write_termination_message("DataGenerated", patch["dataset"]["artifact"]["uri"], **patch)


def main(argv: list[str] | None = None) -> int:
    limit_cpu_threads()  # the retriever's embedding model runs in this process
    return run_main(RaftDataRun, work, argv)


if __name__ == "__main__":
    sys.exit(main())
