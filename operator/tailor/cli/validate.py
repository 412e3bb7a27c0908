"""``tailor validate FILE...``: check manifests offline with the same rules the API server
enforces (the pydantic models the CRDs are generated from); one line per document that is
valid, one line per bad field on stderr naming the field and the fix, exit 1 if any is bad."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    validate = commands.add_parser("validate", help="validate manifests offline")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(handler=lambda args: validate_files(args.files))


def validate_files(files: list[str]) -> int:
    """Validate manifests offline; print one line per bad field. Exit 1 if any is bad."""
    from tailor.api import ManifestError, parse

    bad = 0
    for file in files:
        for doc in yaml.safe_load_all(Path(file).read_text()):
            if not doc:
                continue
            name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            try:
                parse(doc)
                print(f"{file}: {name}: valid")
            except ManifestError as exc:
                bad += 1
                for line in exc.lines:
                    print(f"{file}: {name}: {line}", file=sys.stderr)
    return 1 if bad else 0
