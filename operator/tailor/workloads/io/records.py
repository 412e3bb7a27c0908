"""Records of data files: JSON lines or one JSON array, text files as one record each, with the
file and line named in every error."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tailor.api import records
from tailor.api.common import DataSource
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.fetch import fetch_source
from tailor.workloads.io.sources import source_files


def json_lines(
    lines: Iterable[str], name: str, reason: str = "InvalidDataset"
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of JSON lines, blank lines skipped; a bad line raises
    ``WorkloadError(reason)`` naming ``name:line``."""
    try:
        yield from records.json_lines(lines, name)
    except records.InvalidRecords as exc:
        raise WorkloadError(reason, exc.message) from exc


def json_records(text: str, name: str, reason: str = "InvalidDataset") -> list[tuple[str, Any]]:
    """(where, record) of one JSON array (``name[i]``) or of JSON lines (``name:line``); bad
    JSON raises ``WorkloadError(reason)`` naming ``name:line``."""
    try:
        return records.json_records(text, name)
    except records.InvalidRecords as exc:
        raise WorkloadError(reason, exc.message) from exc


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of a JSON-lines file, read as it goes."""
    with path.open(encoding="utf-8") as fh:
        yield from json_lines(fh, str(path))


JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_raw(
    source: DataSource, paths: Paths, counts: dict[str, Any] | None = None
) -> list[tuple[str, Any]]:
    """(where, raw record) for every record of a source; a plain text file is one record.
    ``counts`` receives what a feedback source was made of."""
    if source.inline is not None:
        return [(f"inline[{i}]", item) for i, item in enumerate(source.inline)]
    if source.feedback is not None:
        from tailor.workloads.io.feedback import evaluation_question, feedback_records

        exclude = source.feedback.exclude_questions
        excluded = {
            evaluation_question(where, record)
            for where, record in (
                read_raw(DataSource(config_map=exclude), paths) if exclude else []
            )
        }
        records, used = feedback_records(source.feedback, paths, excluded)
        if counts is not None:
            counts.update(used.wire())
        name = f"feedback of ModelDeployment {source.feedback.deployment_ref.name}"
        return [(f"{name}[{i}]", item) for i, item in enumerate(records)]
    if source.url:
        fetched = fetch_source(source)
        name = fetched.url.split("?")[0]
        text = _decode(fetched.content, name, fetched.charset or "utf-8")
        is_json = name.lower().endswith(JSON_SUFFIXES) or "json" in fetched.content_type
        return parse_text(name, text, is_json)
    raw: list[tuple[str, Any]] = []
    for path in source_files(source, paths):
        text = _decode(path.read_bytes(), str(path), "utf-8")
        raw.extend(parse_text(str(path), text, path.suffix.lower() in JSON_SUFFIXES))
    return raw


def parse_text(name: str, text: str, is_json: bool) -> list[tuple[str, Any]]:
    """Records of a file's text: JSON lines (or one JSON array), else the whole text."""
    if not is_json:
        return [(name, text)]
    return json_records(text, name)


def _decode(content: bytes, name: str, charset: str) -> str:
    try:
        return content.decode(charset)
    except (UnicodeDecodeError, LookupError) as exc:
        raise WorkloadError("InvalidDataset", f"{name}: not {charset} text ({exc})") from exc
