"""Scoring answers against question records: the one scorer set of the Evaluation and the
RAFT evaluation stage.

A question record is ``{question, answer?, apiCall?, id?}``, or a chat record
``{messages}`` whose last user turn is the question and last assistant turn the answer (what
a feedback source's ``sft`` format writes). A scorer turns a reply into a
:class:`~tailor.workloads.evaluation.apibench.Verdict`:

- ``exact``, ``contains``, ``regex``: the reply's final answer (the text after
  ``##Answer:``, or the whole reply) against the record's answer, with the forgiving
  matchers of :mod:`tailor.workloads.evaluation.matchers` (:data:`GOLD_MATCHERS`);
- ``jsonSchema``: the reply parses as JSON and validates against the scoring's schema;
- ``apibench``: Gorilla's AST matcher against a packaged API corpus, as the RAFT paper
  scores APIBench (correct: a corpus API of the gold API's domain; exact; hallucination).

Records are checked before anything is asked: a record the scorer cannot score fails the
run naming where it was read and what it lacks.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailor.api.common import DataSource
from tailor.api.evaluation import Scoring
from tailor.api.workloads import Paths
from tailor.data import apibench_dir
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.apibench import Corpus, Verdict, final_answer, find_calls
from tailor.workloads.evaluation.matchers import (
    Matcher,
    contains_normalised,
    equals_normalised,
    json_schema_failure,
    regex_ignore_case,
)
from tailor.workloads.io.records import read_raw

GOLD_MATCHERS: dict[str, Matcher] = {
    "exact": equals_normalised,
    "contains": contains_normalised,
    "regex": regex_ignore_case,
}
"""Matchers of a reply's final answer against a gold answer: forgiving, as free-form
answers need (the Evaluation's and the RAFT evaluation's ``exact``, ``contains``, ``regex``)."""

Scorer = Callable[[str, "Item"], Verdict]


@dataclass(frozen=True)
class Item:
    """One question to ask and what its answer is scored against."""

    id: str
    question: str
    answer: str | None
    api_call: str | None
    domain: str | None
    where: str


def gold_matches(matcher: str, reply: str, gold: str) -> bool:
    """Whether ``reply``'s final answer matches ``gold`` under a gold matcher."""
    return GOLD_MATCHERS[matcher](final_answer(reply), gold)


@functools.cache
def corpus(name: str) -> Corpus:
    """A packaged APIBench corpus, loaded once."""
    return Corpus.load(apibench_dir() / f"{name}_api.jsonl")


def _turn(messages: list[Any], role: str) -> str | None:
    texts = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == role]
    text = texts[-1] if texts else None
    return text if isinstance(text, str) else None


def load_items(source: DataSource, paths: Paths, scoring: Scoring) -> list[Item]:
    """Every question record of ``source``, checked against what ``scoring`` needs."""
    items: list[Item] = []
    seen: set[str] = set()
    for where, record in read_raw(source, paths):
        if not isinstance(record, dict):
            raise WorkloadError(
                "InvalidQuestions",
                f"spec.questions: {where}: expected a JSON object {{question, answer?, "
                f"apiCall?, id?}}, got {type(record).__name__}",
            )
        messages = record.get("messages")
        if isinstance(messages, list):
            question, answer = _turn(messages, "user"), _turn(messages, "assistant")
        else:
            question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise WorkloadError(
                "InvalidQuestions",
                f"spec.questions: {where}: no question (a question field, or a user turn in "
                f"messages); the record has {sorted(record)[:10]}",
            )
        api_call = record.get("apiCall", record.get("api_call"))
        item_id = str(record.get("id") or hashlib.sha256(question.encode()).hexdigest()[:16])
        if item_id in seen:
            raise WorkloadError(
                "InvalidQuestions",
                f"spec.questions: {where}: id {item_id!r} is used twice (without ids, the "
                "same question twice); give each record its own id",
            )
        seen.add(item_id)
        domain = None
        if scoring.type in GOLD_MATCHERS:
            if not isinstance(answer, str):
                raise WorkloadError(
                    "InvalidQuestions",
                    f"spec.questions: {where}: scoring {scoring.type} needs the gold answer "
                    "in answer (or an assistant turn in messages)",
                )
            if scoring.type == "regex":
                try:
                    re.compile(answer)
                except re.error as exc:
                    raise WorkloadError(
                        "InvalidQuestions",
                        f"spec.questions: {where}: scoring regex: the answer {answer!r} is "
                        f"not a regular expression ({exc}); use scoring contains or exact",
                    ) from exc
        elif scoring.type == "apibench":
            assert scoring.corpus is not None
            gold = corpus(scoring.corpus).match(find_calls(str(api_call or "")))
            if gold is None:
                raise WorkloadError(
                    "InvalidQuestions",
                    f"spec.questions: {where}: scoring apibench needs apiCall, a call of an API "
                    f"of the {scoring.corpus} corpus (got {str(api_call)[:80]!r})",
                )
            domain = gold.domain
        items.append(
            Item(
                item_id,
                question.strip(),
                answer if isinstance(answer, str) else None,
                str(api_call) if api_call else None,
                domain,
                where,
            )
        )
    if not items:
        raise WorkloadError("InvalidQuestions", "spec.questions: the source holds no records")
    return items


def scorer(scoring: Scoring) -> Scorer:
    """The verdict of a reply to an item (items checked by :func:`load_items`)."""
    if scoring.type == "apibench":
        assert scoring.corpus is not None
        apis = corpus(scoring.corpus)
        return lambda reply, item: apis.score(reply, str(item.api_call), str(item.domain))
    if scoring.type == "jsonSchema":
        schema = scoring.json_schema or {}
        return lambda reply, item: Verdict(not json_schema_failure(reply, schema), False, False)
    matcher = scoring.type
    return lambda reply, item: Verdict(gold_matches(matcher, reply, str(item.answer)), False, False)
