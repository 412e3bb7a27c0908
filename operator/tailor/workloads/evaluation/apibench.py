"""APIBench (Gorilla): questions, corpora and scoring as the RAFT paper scores it.

Data: the ``*_api.jsonl`` corpora (one API card per line: ``api_call``, ``domain``, ...)
and the question files (JSON lines; ``code`` holds the instruction as
``###Instruction: ...\n###Output: ...`` or ``{'Instruction': ..., 'Output': ...}``,
``api_call`` the gold call, ``api_data`` the gold corpus card with the question's domain).

Scoring is Gorilla's AST evaluation (``ast_eval_th.py`` / ``ast_eval_hf.py``),
re-implemented with Python's ``ast``: take the answer's call (after ``api_call`` when the
answer uses Gorilla's ``<<<api_call>>>:`` form, after the last ``##Answer:`` of a chain of
thought), find the first corpus API with the same function name whose identifying
arguments all appear in the call; none is a **hallucination**; the matched API's domain
equal to the question's is **correct** (the paper's accuracy). Beside it **exact**: the
answer's call is the gold call (function and identifying arguments, normalised). Used by
the evaluation workload, the benchmarks, the quickstart and ``tailor eval apibench``.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.records import json_lines

_INSTRUCTION = re.compile(
    r"Instruction'?\s*:\s*(?P<q>.*?)\s*(?:,\s*'Output'\s*:|\n\s*###\s*Output|$)", re.S
)
_EXPLANATION = re.compile(r"'explanation'\s*:\s*(?P<q>['\"])(?P<text>.*?)(?P=q)\s*,\s*'code'", re.S)
_GORILLA_EXPLANATION = re.compile(r"<<<explanation>>>:\s*(?:1\.\s*)?(?P<text>[^\n]*)")
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


def _instruction(code: str) -> str:
    match = _INSTRUCTION.search(code)
    text = match.group("q") if match else code
    return text.strip().strip("'\"").strip()


def load_questions(path: Path) -> list[Question]:
    """Every question of an APIBench question file (``*_train.json``, ``*_eval.json``);
    a line that is not JSON or lacks ``code`` / ``api_call`` fails naming file and line."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for number, row in json_lines(fh, str(path), "InvalidQuestions"):
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("code", "api_call")
            ):
                raise WorkloadError(
                    "InvalidQuestions",
                    f"{path}:{number}: a question line needs the string fields code and "
                    "api_call (APIBench's *_eval.json)",
                )
            data = row.get("api_data") or {}
            explanation = _EXPLANATION.search(row["code"]) or _GORILLA_EXPLANATION.search(
                row["code"]
            )
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
    """The assistant turn we train on: the gold call as written in the corpus card (a
    model reading the card can copy it verbatim), then why."""
    return f"{q.api_call.strip()}\n{q.explanation}".strip()


def chat_example(q: Question, system: str = SYSTEM) -> dict[str, Any]:
    """An OpenAI fine-tuning chat record for one question."""
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Task: {q.question}"},
            {"role": "assistant", "content": answer_text(q)},
        ]
    }


def raft_question(q: Question, id_field: str = "api_call") -> dict[str, Any]:
    """A RAFTJob question record: the gold document is the corpus card whose id (the
    knowledge base's idField: ``api_call`` for Torch Hub, ``api_name`` for HuggingFace,
    whose calls repeat) the question's gold card has."""
    document_id = q.api_name if id_field == "api_name" else q.api_call
    return {"question": q.question, "answer": answer_text(q), "document_id": document_id}


# --- scoring as published: Gorilla's AST evaluation (ast_eval_th.py, ast_eval_hf.py) ------

_CALL_START = re.compile(r"[A-Za-z_][\w.]*\s*\(")


@dataclass(frozen=True)
class Call:
    """One function call found in a text: the function's dotted name, the values of its
    positional and keyword arguments (strings unquoted, anything else as written) and the
    call's own source text (what Gorilla's substring check reads)."""

    function: str
    positional: tuple[str, ...]
    keywords: tuple[tuple[str, str], ...]
    text: str

    def keyword(self, name: str) -> str | None:
        return next((v for k, v in self.keywords if k == name), None)

    def identifying(self) -> tuple[str, ...]:
        """The arguments that name the API, by Gorilla's rule for the call's hub (the
        corpus decides: each API is judged by its own call): Torch Hub
        (``torch.hub.load``) the repository and model; TensorFlow Hub (``hub.*``) the
        positional arguments and ``model=``; anything else (HuggingFace) every argument."""
        if self.function == "torch.hub.load":
            repo = self.keyword("repo_or_dir") or self.keyword("github")
            model = self.keyword("model")
            rest = list(self.positional)
            if repo is None and rest:
                repo = rest.pop(0)
            if model is None and rest:
                model = rest.pop(0)
            return tuple(v for v in (repo, model) if v)
        if self.function.startswith("hub."):
            model = self.keyword("model")
            return (*self.positional, *((model,) if model else ()))
        return (*self.positional, *(v for _, v in self.keywords))

    def key(self) -> tuple[str, tuple[str, ...]]:
        """What ``exact`` compares: function and identifying arguments, whitespace and
        quotes normalised; Torch Hub repositories also lower case without a ``:tag``."""
        values = [" ".join(v.split()) for v in self.identifying()]
        if self.function == "torch.hub.load" and values:
            values = [values[0].lower().split(":")[0].rstrip("/"), *(v.lower() for v in values[1:])]
        return self.function, tuple(values)


def _value(node: ast.expr, source: str) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return ast.get_source_segment(source, node) or ast.unparse(node)


def _code_chars(text: str, start: int = 0) -> Iterator[tuple[int, str, int]]:
    """(index, character, bracket depth after it) of each character outside string
    literals, from ``start``."""
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
            continue
        depth += (ch in "([{") - (ch in ")]}")
        yield i, ch, depth


def _balanced_end(text: str, open_at: int) -> int | None:
    """Index just past the ``)`` closing the ``(`` at ``open_at``, skipping strings."""
    for i, ch, depth in _code_chars(text, open_at):
        if depth == 0 and ch in ")]}":
            return i + 1
    return None


def _split_arguments(inner: str) -> list[str]:
    """The top-level comma-separated pieces of an argument list."""
    cuts = [i for i, ch, depth in _code_chars(inner) if ch == "," and depth == 0]
    bounds = zip([-1, *cuts], [*cuts, len(inner)], strict=True)
    return [piece for a, b in bounds if (piece := inner[a + 1 : b].strip())]


def _lenient_call(span: str, function: str) -> Call:
    """A call Python refuses but Gorilla's tree-sitter reads, such as a positional
    argument after a keyword one (one Torch Hub card has that): each argument on its own."""
    inner = span[span.index("(") + 1 : -1]
    positional: list[str] = []
    keywords: list[tuple[str, str]] = []
    for piece in _split_arguments(inner):
        name, eq, rest = piece.partition("=")
        keyword = bool(eq) and name.strip().isidentifier() and not rest.startswith("=")
        text = rest.strip() if keyword else piece
        try:
            value = _value(ast.parse(text, mode="eval").body, text)
        except SyntaxError:
            value = text  # as written (Gorilla compares the argument's text)
        if keyword:
            keywords.append((name.strip(), value))
        else:
            positional.append(value)
    return Call(function, tuple(positional), tuple(keywords), span)


def find_calls(text: str) -> list[Call]:
    """Every call expression in ``text``, outer before inner, in reading order. Prose
    around code is fine: each ``name(`` is tried on its own balanced span with Python's
    ``ast`` (what Gorilla's tree-sitter parse tolerates, without a grammar to install)."""
    calls: list[Call] = []
    for match in _CALL_START.finditer(text):
        end = _balanced_end(text, match.end() - 1)
        if end is None:
            continue
        span = text[match.start() : end]
        try:
            node = ast.parse(span, mode="eval").body
        except SyntaxError:
            calls.append(_lenient_call(span, "".join(match.group().rstrip("(").split())))
            continue
        if isinstance(node, ast.Call):
            calls.append(
                Call(
                    function=ast.unparse(node.func),
                    positional=tuple(_value(a, span) for a in node.args),
                    keywords=tuple((k.arg, _value(k.value, span)) for k in node.keywords if k.arg),
                    text=span,
                )
            )
    return calls


def extract_answer_call(reply: str) -> str:
    """The part of a reply Gorilla parses: after a chain of thought's last ``##Answer:``,
    the text after ``api_call`` (Gorilla's ``<<<api_call>>>:`` form) up to ``api_provider``
    and the last ``)``; without ``api_call``, the whole answer."""
    answer = final_answer(reply)
    if "api_call" not in answer:
        return answer.strip()
    part = answer.split("api_call", 1)[1].split("api_provider", 1)[0]
    start = part.index(":") + 1 if ":" in part else 0
    end = part.rindex(")") + 1 if ")" in part else len(part)
    return part[start:end].strip()


@dataclass(frozen=True)
class CorpusAPI:
    """One API of the corpus: its call and domain, where it was read."""

    call: Call
    domain: str
    name: str
    where: str


@dataclass(frozen=True)
class Verdict:
    """How one answer scores: ``correct`` (the paper's metric: a real corpus API of the
    question's domain), ``exact`` (the gold API itself) or ``hallucination`` (no corpus
    API matches); ``matched`` names the corpus API the answer was taken for."""

    correct: bool
    exact: bool
    hallucination: bool
    matched: str | None = None


class Corpus:
    """An APIBench API corpus (``*_api.jsonl``) and Gorilla's matching rule."""

    def __init__(self, apis: list[CorpusAPI], skipped: list[str] | None = None):
        if not apis:
            raise WorkloadError(
                "InvalidCorpus", "unknown corpus format: no record holds an API call to match"
            )
        self.apis = apis
        self.skipped = skipped or []
        self._by_function: dict[str, list[CorpusAPI]] = defaultdict(list)
        for api in apis:
            self._by_function[api.call.function].append(api)

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, Any]]) -> Corpus:
        """From (where, record) pairs; each record needs ``api_call`` (one Python call)
        and ``domain``; anything else is an unknown corpus format, named by ``where``."""
        apis: list[CorpusAPI] = []
        skipped: list[str] = []
        for where, record in records:
            call_text = record.get("api_call") if isinstance(record, dict) else None
            domain = record.get("domain") if isinstance(record, dict) else None
            if not isinstance(call_text, str) or not isinstance(domain, str):
                raise WorkloadError(
                    "InvalidCorpus",
                    f"{where}: unknown corpus format: an API record needs the string fields "
                    "api_call and domain (APIBench's *_api.jsonl)",
                )
            calls = find_calls(call_text)
            if not calls or not calls[0].identifying():
                skipped.append(where)  # Gorilla skips a card whose call has no arguments
                continue
            apis.append(CorpusAPI(calls[0], domain, str(record.get("api_name") or ""), where))
        return cls(apis, skipped)

    @classmethod
    def load(cls, path: Path) -> Corpus:
        with path.open(encoding="utf-8") as fh:
            return cls.from_records(
                (f"{path}:{n}", r) for n, r in json_lines(fh, str(path), "InvalidCorpus")
            )

    def match(self, calls: list[Call]) -> CorpusAPI | None:
        """The first corpus API (in corpus order) for which a call in the answer has the
        same function and contains every identifying argument of the API's call."""
        for api in self.apis:
            same = next((c for c in calls if c.function == api.call.function), None)
            if same is not None and all(arg in same.text for arg in api.call.identifying()):
                return api
        return None

    def score(self, reply: str, gold_call: str, domain: str) -> Verdict:
        """Score one reply against the question's gold call and domain."""
        calls = find_calls(extract_answer_call(reply))
        gold = find_calls(gold_call)
        exact = bool(gold) and any(c.key() == gold[0].key() for c in calls)
        api = self.match(calls)
        if api is None:
            return Verdict(False, exact, True)
        return Verdict(api.domain == domain, exact, False, api.name or api.call.text)


def score_totals(verdicts: list[Verdict]) -> dict[str, Any]:
    """``{"n", "accuracy", "exact", "hallucination"}`` as fractions (``None`` when empty)."""
    n = len(verdicts)

    def share(flag: str) -> float | None:
        return round(sum(getattr(v, flag) for v in verdicts) / n, 4) if n else None

    return {
        "n": n,
        "accuracy": share("correct"),
        "exact": share("exact"),
        "hallucination": share("hallucination"),
    }


# --- `tailor eval apibench`: scoring a file of answers ---------------------------------------


def read_answers(path: Path, count: int) -> list[str]:
    """The ``text`` of each line of an answers file (JSON lines, in question order)."""
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for number, record in json_lines(fh, str(path), "InvalidAnswers"):
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise WorkloadError(
                    "InvalidAnswers",
                    f"{path}:{number}: an answer line needs a string field text "
                    '(the model\'s reply), e.g. {"text": "torch.hub.load(...)"}',
                )
            texts.append(text)
    if len(texts) != count:
        raise WorkloadError(
            "InvalidAnswers",
            f"{path}: {len(texts)} answer lines for {count} questions; write one line per "
            "question, in the questions file's order",
        )
    return texts


def score_files(corpus: Path, questions: Path, answers: Path) -> dict[str, Any]:
    """``{"n", "accuracy", "exact", "hallucination"}`` of an answers file."""
    api = Corpus.load(corpus)
    asked = load_questions(questions)
    texts = read_answers(answers, len(asked))
    return score_totals(
        [api.score(text, q.api_call, q.domain) for q, text in zip(asked, texts, strict=True)]
    )


ANSWER_MARK = "##Answer:"


def final_answer(text: str) -> str:
    """The text after the last ``##Answer:`` mark, or the whole text without one."""
    _, mark, tail = text.rpartition(ANSWER_MARK)
    return tail.strip() if mark else text.strip()
