"""An LLM judge for the Evaluation (``scoring.type: judge``).

Two kinds of question go to the judge, each answered in a JSON shape the request enforces
(``response_format`` json_schema: Tailor's gateway decodes it under a grammar, OpenAI's API
follows it), greedy:

- **grade**: the rubric, the question (and the record's reference answer, when it has one)
  and one answer: ``{"verdict": "pass" | "fail"}``; a pass is a correct answer (accuracy).
- **compare**, with a baseline: the question and two answers, the candidate's and the
  baseline's, asked twice with their places swapped (a judge that prefers whichever answer
  comes first is seen, not counted): ``{"better": "A" | "B" | "tie"}``. A question scores 1
  when the judge preferred the candidate in both orders, 0 when it preferred the baseline
  in both, a half otherwise; the judge's agreement with itself is the share of questions
  where both orders gave the same preference.

Every judgement is appended to ``judgments.jsonl`` like the answers: a restarted pod asks
the judge only what it has not answered. A judge reply that does not parse, or a request
that fails for good, is an error: that answer is not graded (never counted as wrong).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tailor.api.workloads import EvaluationRun
from tailor.workloads.evaluation.chat import ChatClient, ChatError
from tailor.workloads.evaluation.scoring import Item

log = logging.getLogger("tailor.workloads.evaluation.judge")

JUDGMENTS_FILE = "judgments.jsonl"
GRADE = {"verdict": ["pass", "fail"]}
COMPARE = {"better": ["A", "B", "tie"]}


def response_format(name: str, shape: dict[str, list[str]]) -> dict[str, Any]:
    """The response_format that makes the judge answer ``{field: one of the values}``."""
    ((field, values),) = shape.items()
    schema = {
        "type": "object",
        "properties": {field: {"enum": values}},
        "required": [field],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def grade_messages(rubric: str, item: Item, answer: str) -> list[dict[str, str]]:
    reference = f"Reference answer: {item.answer}\n" if item.answer else ""
    return [
        {"role": "system", "content": f"You grade answers against this rubric: {rubric}\n"
                                      'Reply with JSON: {"verdict": "pass"} or {"verdict": "fail"}.'},
        {"role": "user", "content": f"Question: {item.question}\n{reference}Answer: {answer}\n"
                                    "Does the answer satisfy the rubric?"},
    ]  # fmt: skip


def compare_messages(rubric: str, item: Item, first: str, second: str) -> list[dict[str, str]]:
    reference = f"Reference answer: {item.answer}\n" if item.answer else ""
    return [
        {"role": "system", "content": f"You compare two answers against this rubric: {rubric}\n"
                                      'Reply with JSON: {"better": "A"}, {"better": "B"} or '
                                      '{"better": "tie"}.'},
        {"role": "user", "content": f"Question: {item.question}\n{reference}Answer A: {first}\n"
                                    f"Answer B: {second}\nWhich answer satisfies the rubric "
                                    "better?"},
    ]  # fmt: skip


def parse(reply: str, shape: dict[str, list[str]]) -> str | None:
    """The judge's choice, or None when the reply is not the JSON asked for."""
    ((field, values),) = shape.items()
    try:
        choice = json.loads(reply).get(field)
    except (ValueError, AttributeError):
        return None
    return choice if choice in values else None


def judge_all(
    run: EvaluationRun,
    items: list[Item],
    replies: dict[tuple[str, str], str],
    done: set[tuple[str, ...]],
    write: Callable[[dict[str, Any]], None],
    api_key: str | None,
    transport: Any = None,
) -> None:
    """Every grade and comparison not in ``done`` (keys: ``(kind, candidate, id, order)``),
    ``spec.concurrency`` at a time; each result goes to ``write`` as it comes."""
    judge, target = run.spec.scoring.judge, run.judge
    assert judge is not None and target is not None
    baseline = run.spec.baseline
    work: list[tuple[tuple[str, ...], list[dict[str, str]], dict[str, list[str]]]] = []
    for name in run.targets:
        for item in items:
            reply = replies.get((name, item.id))
            if reply is None:
                continue
            key = ("grade", name, item.id, "")
            if key not in done:
                work.append((key, grade_messages(judge.rubric, item, reply), GRADE))
            base = replies.get((baseline, item.id)) if baseline and name != baseline else None
            if base is None:
                continue
            for order, (first, second) in (("candidate-first", (reply, base)),
                                           ("baseline-first", (base, reply))):  # fmt: skip
                key = ("compare", name, item.id, order)
                if key not in done:
                    work.append((key, compare_messages(judge.rubric, item, first, second), COMPARE))
    if not work:
        return
    log.info("judge: %d judgements to ask (%s)", len(work), target.model)

    def one(job: tuple[tuple[str, ...], list[dict[str, str]], dict[str, list[str]]]) -> None:
        key, messages, shape = job
        kind, name, item_id, order = key
        try:
            response = client.complete(
                messages,
                model=model,
                temperature=0,
                max_tokens=32,
                response_format=response_format(kind, shape),
                tailor={"retrieval": False},
            )
            text = str(response["choices"][0]["message"]["content"] or "")
            choice, error = parse(text, shape), None
            if choice is None:
                error = f"the judge's reply is not the JSON asked for: {text[:200]!r}"
        except ChatError as exc:
            choice, error = None, str(exc)
        write({"kind": kind, "candidate": name, "id": item_id, "order": order,
               "choice": choice, "error": error})  # fmt: skip

    client = ChatClient(target.base_url, api_key=api_key, timeout=600, transport=transport)
    with client:
        model = target.model or next(iter(client.models()), "")  # an external judge unnamed
        with ThreadPoolExecutor(run.spec.concurrency) as pool:
            list(pool.map(one, work))


def preference(first: str | None, second: str | None) -> float | None:
    """A question's score for the candidate from its two comparisons (candidate first, then
    baseline first): 1 preferred in both orders, 0 the baseline in both, else a half."""
    if first is None or second is None:
        return None
    said = ({"A": 1.0, "B": 0.0, "tie": 0.5}[first], {"A": 0.0, "B": 1.0, "tie": 0.5}[second])
    return said[0] if said[0] == said[1] else 0.5


def agreed(first: str | None, second: str | None) -> bool:
    """Whether both orders gave the same preference (the same answer, or tie twice)."""
    swapped = {"A": "B", "B": "A", "tie": "tie"}
    return first is not None and second is not None and swapped[first] == second
