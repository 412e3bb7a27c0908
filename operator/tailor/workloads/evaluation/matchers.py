"""Answer matchers, each named for exactly what it compares.

Two families with the same three shapes (equality, substring, regular expression):

- on the text as the model wrote it, case-sensitive: :func:`equals_stripped`,
  :func:`contains_exact`, :func:`regex_case_sensitive`, plus :func:`json_schema_failure`.
  The PromptProfile test matchers ``equals``, ``contains``, ``regex`` and ``jsonSchema``
  (``prompt_tests.check``) are these;
- forgiving, for scoring free-form answers against a gold answer:
  :func:`equals_normalised` and :func:`contains_normalised` compare SQuAD-normalised text
  (:func:`normalise`), :func:`regex_ignore_case` searches the text as written, ignoring
  case, ``.`` matching newlines too. The RAFT evaluation's ``exact``, ``contains`` and
  ``regex`` are these.

A matcher takes ``(answer, expected)``. APIBench's AST matcher is
:meth:`tailor.workloads.evaluation.apibench.Corpus.score`.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from typing import Any

Matcher = Callable[[str, str], bool]
"""``(answer, expected) -> whether the answer matches``."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def equals_stripped(answer: str, expected: str) -> bool:
    """The whole answer is ``expected``, whitespace at the ends of either ignored."""
    return answer.strip() == expected.strip()


def equals_normalised(answer: str, expected: str) -> bool:
    """The answer is ``expected`` once both are normalised."""
    return normalise(answer) == normalise(expected)


def contains_exact(answer: str, expected: str) -> bool:
    """``expected`` is a substring of the answer, character for character."""
    return expected in answer


def contains_normalised(answer: str, expected: str) -> bool:
    """Normalised ``expected`` is a substring of the normalised answer; an ``expected``
    that normalises to nothing (only articles or punctuation) matches nothing."""
    wanted = normalise(expected)
    return bool(wanted) and wanted in normalise(answer)


def regex_case_sensitive(answer: str, pattern: str) -> bool:
    """``re.search(pattern, answer)`` finds a match, no flags. Raises ``re.error`` for a
    pattern that does not compile."""
    return re.search(pattern, answer) is not None


def regex_ignore_case(answer: str, pattern: str) -> bool:
    """``re.search`` finds a match ignoring case, ``.`` matching newlines too
    (``re.IGNORECASE | re.DOTALL``). Raises ``re.error`` for a pattern that does not
    compile."""
    return re.search(pattern, answer, re.IGNORECASE | re.DOTALL) is not None


def json_schema_failure(answer: str, schema: dict[str, Any]) -> str:
    """Why the answer, parsed as JSON, fails ``schema``; empty when it validates."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(answer), schema)
    except ValueError as exc:
        return f"not JSON: {exc}"
    except jsonschema.ValidationError as exc:
        return f"does not validate: {exc.message}"
    return ""
