"""Datasets from use: a DataSource's ``feedback`` (the exchanges a ModelDeployment captured,
joined with the ratings on them) as records of one format.

Each rating is joined to its exchange by response id; when one caller rated an exchange
twice, the later rating counts (a correction of one's own rating); when different callers
disagree, the exchange is skipped ("conflicting"). The prompt of every record is what the
engine saw (the profile's system prompt, the retrieved context and the conversation), so a
model trained on it is trained on what it is served with.

- ``sft``: an up-rated answer, or a correction, as a chat example.
- ``kto``: ``{prompt, completion, label}`` (TRL's unpaired format): up-rated answers and
  corrections are desirable, down-rated answers undesirable.
- ``dpo``: ``{prompt, chosen, rejected}``: a down-rated answer against its correction, or
  against an up-rated answer (or correction) to the same question.
- ``retrieval``: ``{question, document, negatives?}``: the question and each cited document
  marked useful (or cited by an up-rated answer), with the cited documents marked not useful
  as hard negatives, for a KnowledgeBase's spec.adaptation. A rating with no useful source
  but a correction gives ``{question, correction, negatives?}``: the knowledge base labels
  the question with the document the correction names (its id written in the correction),
  which reaches documents the retriever missed (a user can only mark what was cited).

The held-out share is chosen by a hash of the question (the last user message), so every
dataset of a deployment leaves out the same exchanges, a question asked twice is never on
both sides, and an evaluation can ask exactly those (``split: heldOut``).
Duplicates (the same prompt and completion) count once. What was used and what was skipped,
and why, is logged and returned with the records (:class:`FeedbackCounts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor.api.common import FeedbackData
from tailor.api.workloads import Paths, feedback_folder
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.segments import read_segment, segment_start, segment_store
from tailor.workloads.io.storage import store_of

log = logging.getLogger("tailor.workloads.io.feedback")


@dataclass
class FeedbackCounts:
    """What a feedback dataset was made of."""

    exchanges: int = 0
    rated: int = 0
    records: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    sha256: str = ""
    """Of the records (their JSON, sorted): the dataset's identity in lineage."""

    def wire(self) -> dict[str, Any]:
        return {
            "exchanges": self.exchanges,
            "rated": self.rated,
            "records": self.records,
            "skipped": dict(sorted(self.skipped.items())),
            "sha256": self.sha256,
        }


def held_out(question: str, fraction: float) -> bool:
    """Whether a question is in the held-out share: by a hash of its text, the same in
    every dataset, so a question asked twice is never on both sides."""
    digest = hashlib.sha256(f"heldout:{question.strip()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def read_captured(spec: FeedbackData, paths: Paths) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(exchanges by id, feedback records in time order) of the deployment's segments."""
    folder = feedback_folder(spec.deployment_ref.name)
    segments = segment_store(Path(paths.artifacts), store_of(paths))
    since = spec.since.timestamp() if spec.since else None
    until = spec.until.timestamp() if spec.until else None
    exchanges: dict[str, Any] = {}
    ratings: list[dict[str, Any]] = []
    for rel in segments.listing(f"{folder}/segments"):
        if until is not None and segment_start(rel) >= until:
            continue
        for record in read_segment(segments.read(rel)):
            if record.get("type") == "exchange" and isinstance(record.get("id"), str):
                moment = float(record.get("time") or 0)
                if (since is None or moment >= since) and (until is None or moment < until):
                    exchanges[record["id"]] = record
            elif record.get("type") == "feedback" and isinstance(record.get("id"), str):
                ratings.append(record)
    ratings.sort(key=lambda r: float(r.get("time") or 0))
    return exchanges, ratings


def feedback_records(
    spec: FeedbackData, paths: Paths, excluded: set[str] | None = None
) -> tuple[list[Any], FeedbackCounts]:
    """The records of a feedback DataSource, and what was used and skipped; ``excluded``:
    the normalised questions of ``spec.excludeQuestions``, never in the records."""
    exchanges, ratings = read_captured(spec, paths)
    counts = FeedbackCounts(exchanges=len(exchanges))
    excluded = excluded or set()
    latest: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # id -> caller -> rating
    for rating in ratings:
        latest[rating["id"]][str(rating.get("caller") or "")] = rating
    verdicts: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (exchange, its rating)
    for response_id, by_caller in latest.items():
        exchange = exchanges.get(response_id)
        if exchange is None:
            counts.skipped["exchangeNotCaptured"] += 1
            continue
        counts.rated += 1
        if len({r["rating"] for r in by_caller.values()}) > 1:
            counts.skipped["conflictingRatings"] += 1
            continue
        question = _question(exchange) or response_id
        if held_out(question, spec.held_out_fraction) != (spec.split == "heldOut"):
            counts.skipped["otherSplit"] += 1
            continue
        if _normal(question) in excluded:
            counts.skipped["evaluationQuestion"] += 1
            continue
        if not isinstance(exchange.get("seen"), list):
            counts.skipped["notAChat"] += 1  # a text completion: no chat prompt to learn
            continue
        verdicts.append((exchange, list(by_caller.values())[-1]))
    counts.skipped["notRated"] = max(0, len(exchanges) - counts.rated)
    records = _FORMATS[spec.format](verdicts, counts)
    unique: dict[str, Any] = {}
    for record in records:
        unique.setdefault(json.dumps(record, sort_keys=True), record)
    counts.skipped["duplicate"] += len(records) - len(unique)
    counts.records = len(unique)
    counts.sha256 = hashlib.sha256("\n".join(sorted(unique)).encode()).hexdigest()
    counts.skipped = +counts.skipped  # zero counts left out
    log.info(
        "feedback of %s (%s, %s): %s",
        spec.deployment_ref.name,
        spec.format,
        spec.split,
        json.dumps(counts.wire()),
    )
    if counts.records < spec.min_records:
        raise WorkloadError(
            "FeedbackTooSmall",
            f"feedback of ModelDeployment {spec.deployment_ref.name}: {counts.records} "
            f"{spec.format} records, fewer than minRecords {spec.min_records} "
            f"({json.dumps(counts.wire())}); wait for more ratings or lower minRecords",
        )
    return list(unique.values()), counts


def evaluation_question(where: str, record: Any) -> str:
    """The (normalised) question of an evaluation set's record ({question} or a chat)."""
    if isinstance(record, dict) and isinstance(record.get("question"), str):
        return _normal(record["question"])
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        users = [m.get("content") for m in record["messages"]
                 if isinstance(m, dict) and m.get("role") == "user"]  # fmt: skip
        if users and isinstance(users[-1], str):
            return _normal(users[-1])
    raise WorkloadError(
        "InvalidDataset", f"{where}: excludeQuestions records are {{question}} or chat records"
    )


def _normal(question: str) -> str:
    """A question as compared with an evaluation set's: case and spacing aside."""
    return " ".join(question.lower().split())


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _question(exchange: dict[str, Any]) -> str:
    """The last user message the caller sent."""
    asked = exchange.get("asked") or []
    users = [m.get("content", "") for m in asked if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""


def _sft(
    verdicts: list[tuple[dict[str, Any], dict[str, Any]]], counts: FeedbackCounts
) -> list[Any]:
    records = []
    for exchange, rating in verdicts:
        if rating.get("correction"):
            records.append({"messages": exchange["seen"] + _assistant(rating["correction"])})
        elif rating["rating"] == "up":
            records.append({"messages": exchange["seen"] + _assistant(exchange["answer"])})
        else:
            counts.skipped["downWithoutCorrection"] += 1
    return records


def _kto(
    verdicts: list[tuple[dict[str, Any], dict[str, Any]]], counts: FeedbackCounts
) -> list[Any]:
    records = []
    for exchange, rating in verdicts:
        prompt = exchange["seen"]
        good = rating["rating"] == "up"
        records.append(
            {"prompt": prompt, "completion": _assistant(exchange["answer"]), "label": good}
        )
        if rating.get("correction"):
            records.append(
                {"prompt": prompt, "completion": _assistant(rating["correction"]), "label": True}
            )
    return records


def _dpo(
    verdicts: list[tuple[dict[str, Any], dict[str, Any]]], counts: FeedbackCounts
) -> list[Any]:
    good: dict[str, list[tuple[list[Any], str]]] = defaultdict(list)  # question -> (prompt, text)
    bad: dict[str, list[tuple[list[Any], str]]] = defaultdict(list)
    records = []
    for exchange, rating in verdicts:
        question, prompt = _question(exchange), exchange["seen"]
        if rating["rating"] == "down" and rating.get("correction"):
            records.append(
                {
                    "prompt": prompt,
                    "chosen": _assistant(rating["correction"]),
                    "rejected": _assistant(exchange["answer"]),
                }
            )
            good[question].append((prompt, rating["correction"]))
        elif rating["rating"] == "up":
            good[question].append((prompt, rating.get("correction") or exchange["answer"]))
        else:
            bad[question].append((prompt, exchange["answer"]))
    for question, rejected in bad.items():
        if not good.get(question):
            counts.skipped["noPair"] += len(rejected)
            continue
        chosen = good[question][-1][1]
        for prompt, text in rejected:
            if text != chosen:
                records.append(
                    {"prompt": prompt, "chosen": _assistant(chosen), "rejected": _assistant(text)}
                )
    return records


def _retrieval(
    verdicts: list[tuple[dict[str, Any], dict[str, Any]]], counts: FeedbackCounts
) -> list[Any]:
    records: list[Any] = []
    for exchange, rating in verdicts:
        question = _question(exchange)
        documents = {s.get("id"): s.get("document") for s in exchange.get("sources") or []}
        judged = {s.get("id"): bool(s.get("useful")) for s in rating.get("sources") or []}
        useful = [documents[c] for c, ok in judged.items() if ok and documents.get(c)]
        if not judged and rating["rating"] == "up":  # an up-rated answer vouches for its sources
            useful = [d for d in documents.values() if d]
        wrong = [documents[c] for c, ok in judged.items() if not ok and documents.get(c)]
        extra = {"negatives": list(dict.fromkeys(wrong))} if wrong else {}
        if question and not useful and rating.get("correction"):
            records.append({"question": question, "correction": rating["correction"], **extra})
            continue
        if not question or not useful:
            counts.skipped["noUsefulSource"] += 1
            continue
        records.extend(
            {"question": question, "document": d, **extra} for d in dict.fromkeys(useful)
        )
    return records


_FORMATS = {"sft": _sft, "kto": _kto, "dpo": _dpo, "retrieval": _retrieval}
