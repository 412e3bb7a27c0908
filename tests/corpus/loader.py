"""The bad-manifest corpus: each file names a manifest, the field its error must name, and
for update cases the original object it replaces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BAD = Path(__file__).parent / "bad"


@dataclass(frozen=True)
class BadCase:
    name: str
    description: str
    field: str
    manifest: dict[str, Any]
    original: dict[str, Any] | None


def bad_cases() -> list[BadCase]:
    cases = []
    for path in sorted(BAD.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        cases.append(
            BadCase(
                path.stem, doc["description"], doc["field"], doc["manifest"], doc.get("original")
            )
        )
    return cases
