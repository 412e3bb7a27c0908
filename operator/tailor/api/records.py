"""JSON records as users write them (JSON lines, or one JSON array), parsed with the file and
line named in every error. Pure: the operator checks a PromptProfile's example pool with it
when a revision publishes, and workloads read their datasets with it
(:mod:`tailor.workloads.io.records` turns the error into a WorkloadError)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


class InvalidRecords(ValueError):
    """Text that is not JSON lines or a JSON array; the message names ``name:line``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def json_lines(lines: Iterable[str], name: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of JSON lines, blank lines skipped; a bad line raises
    :class:`InvalidRecords` naming ``name:line``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRecords(f"{name}:{number}: not valid JSON ({exc.msg})") from exc


def json_records(text: str, name: str) -> list[tuple[str, Any]]:
    """(where, record) of one JSON array (``name[i]``) or of JSON lines (``name:line``)."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRecords(f"{name}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        return [(f"{name}[{i}]", item) for i, item in enumerate(items)]
    return [(f"{name}:{n}", record) for n, record in json_lines(text.splitlines(), name)]
