"""Capture segments (``ModelDeployment.spec.feedback``): immutable JSONL files under
``feedback/<deployment>/segments/<YYYY-MM-DD>/<start-ms>-<replica>-<seq>.jsonl`` of the
namespace's artifacts root, in the bucket (one object each) or on the claim (one file
each). The gateway writes them (``serving.capture``); datasets read them (``io.feedback``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tailor.workloads.io.storage import Store


class _Claim:
    """Segments as files on the namespace's artifacts claim (a rename publishes one)."""

    def __init__(self, root: Path):
        self.root = root

    def publish(self, local: Path, rel: str) -> None:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, target)

    def listing(self, rel: str) -> list[str]:
        folder = self.root / rel
        if not folder.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in folder.rglob("*.jsonl"))

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def remove(self, rels: list[str]) -> None:
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)
        for folder in {(self.root / r).parent for r in rels}:
            try:
                folder.rmdir()
            except OSError:
                pass


class _Bucket:
    """Segments as objects in the namespace's prefix of the bucket (one PUT each)."""

    def __init__(self, store: Store):
        self.store = store

    def publish(self, local: Path, rel: str) -> None:
        self.store.put_file(local, rel)
        local.unlink()

    def listing(self, rel: str) -> list[str]:
        return self.store.listing(rel)

    def read(self, rel: str) -> bytes:
        return self.store.read(rel)

    def remove(self, rels: list[str]) -> None:
        self.store.remove(rels)


def segment_store(root: Path, store: Store | None) -> _Claim | _Bucket:
    return _Bucket(store) if store is not None else _Claim(root)


def segment_start(rel: str) -> float:
    """A segment's start time (seconds) from its name (``<start-ms>-<replica>-<seq>``)."""
    name = rel.rsplit("/", 1)[-1]
    try:
        return int(name.split("-", 1)[0]) / 1000
    except ValueError:
        return 0.0


def segment_days(folder: str, since: float, until: float) -> list[str]:
    """The day folders of ``folder``'s segments that can hold records of [since, until]."""
    first = datetime.fromtimestamp(since, UTC).date()
    last = datetime.fromtimestamp(until, UTC).date()
    days = (last - first).days
    return [f"{folder}/segments/{first + timedelta(days=d)}" for d in range(days + 1)]


def read_segment(data: bytes) -> Iterable[dict[str, Any]]:
    """The records of a segment; a torn last line (a recovered open segment) is skipped."""
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def day_of(rel: str) -> str | None:
    """The day folder (YYYY-MM-DD) a segment path is in."""
    parts = rel.split("/")
    if len(parts) >= 2 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", parts[-2]):
        return parts[-2]
    return None
