"""APIBench (Gorilla) Torch Hub data: questions, gold calls, chat examples, and the
matcher that decides whether an answer names the right ``torch.hub.load`` repository and
model. Used by the quickstart, the evaluation workload and the benchmarks.

The files are JSON lines. ``code`` holds the instruction in one of two spellings
(``###Instruction: ...\\n###Output: ...`` or ``{'Instruction': ..., 'Output': ...}``);
``api_call`` is the gold call; ``api_data`` the gold corpus document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_INSTRUCTION = re.compile(
    r"Instruction'?\s*:\s*(?P<q>.*?)\s*(?:,\s*'Output'\s*:|\n\s*###\s*Output|$)", re.S
)
_EXPLANATION = re.compile(r"'explanation'\s*:\s*(?P<q>['\"])(?P<text>.*?)(?P=q)\s*,\s*'code'", re.S)
_CALL = re.compile(r"torch\.hub\.load\s*\((?P<args>[^()]*)\)", re.S)
_STRING = re.compile(r"""(?:(?P<key>\w+)\s*=\s*)?(?P<q>['"])(?P<value>[^'"]*)(?P=q)""")

SYSTEM = (
    "You recommend PyTorch Hub models. Answer with one line of Python that loads the "
    "model with torch.hub.load, then one sentence explaining why it fits."
)


@dataclass(frozen=True)
class Question:
    """One APIBench question with its gold answer."""

    question: str
    api_call: str
    api_name: str
    domain: str
    explanation: str

    @property
    def gold(self) -> tuple[str, str] | None:
        return parse_call(self.api_call)


def parse_call(text: str, normalise: bool = True) -> tuple[str, str] | None:
    """(repository, model) of the first ``torch.hub.load(...)`` in ``text``.

    Normalised: lower case, no ``:tag`` on the repository, so that
    ``pytorch/vision:v0.10.0`` and ``pytorch/vision`` match. A call without a model
    argument (``torch.hub.load('pytorch/fairseq')``) gives an empty model."""
    match = _CALL.search(text)
    if not match:
        return None
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in _STRING.finditer(match.group("args")):
        if arg.group("key"):
            named[arg.group("key")] = arg.group("value")
        else:
            positional.append(arg.group("value"))
    repo = (
        named.get("repo_or_dir") or named.get("github") or (positional[0] if positional else None)
    )
    rest = positional[1:] if "repo_or_dir" not in named and "github" not in named else positional
    model = named.get("model") or (rest[0] if rest else "")
    if not repo:
        return None
    if not normalise:
        return repo.strip(), model.strip()
    return repo.strip().lower().split(":")[0].rstrip("/"), model.strip().lower()


def matches(answer: str, gold_call: str) -> bool:
    """Whether ``answer`` loads the same repository and model as ``gold_call``."""
    gold = parse_call(gold_call)
    got = parse_call(answer)
    if gold is None or got is None:
        return False
    return got[0] == gold[0] and (not gold[1] or got[1] == gold[1])


def _instruction(code: str) -> str:
    match = _INSTRUCTION.search(code)
    text = match.group("q") if match else code
    return text.strip().strip("'\"").strip()


def load_questions(path: Path) -> list[Question]:
    """Every question of a torchhub_train.json or torchhub_eval.json file."""
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        data = row.get("api_data") or {}
        explanation = _EXPLANATION.search(row["code"])
        out.append(
            Question(
                question=_instruction(row["code"]),
                api_call=row["api_call"],
                api_name=str(data.get("api_name", "")),
                domain=str(data.get("domain", "")),
                explanation=explanation.group("text").strip() if explanation else "",
            )
        )
    return out


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The corpus (torchhub_api.jsonl), one document per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer_text(q: Question) -> str:
    """The assistant turn we train on: the call as a one-liner, then why."""
    gold = parse_call(q.api_call, normalise=False)
    if gold and gold[1]:
        call = f"model = torch.hub.load('{gold[0]}', '{gold[1]}', pretrained=True)"
    else:
        call = f"model = {q.api_call}"
    return f"{call}\n{q.explanation}".strip()


def chat_example(q: Question, system: str = SYSTEM) -> dict[str, Any]:
    """An OpenAI fine-tuning chat record for one question."""
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Task: {q.question}"},
            {"role": "assistant", "content": answer_text(q)},
        ]
    }


def raft_question(q: Question) -> dict[str, Any]:
    """A RAFTJob question record: the gold document is the corpus entry whose id
    (``api_call``, the knowledge base's idField) the question's gold call names."""
    return {"question": q.question, "answer": answer_text(q), "document_id": q.api_call}
