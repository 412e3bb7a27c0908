"""The ``tailor`` command tree: every command runs something, building the tree imports no
cluster or model library, and bad arguments are named with the fix (no cluster needed)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailor.cli import build_parser
from tailor.cli import main as tailor


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf of the tree with the words that reach it."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
        return
    for name, child in groups[0].choices.items():
        yield from commands(child, (*path, name))


def test_every_command_runs_a_handler() -> None:
    leaves = dict(commands(build_parser()))
    for words in (("dev", "cluster", "build"), ("operator", "run"), ("status",), ("store", "push")):
        assert words in leaves
    assert [" ".join(w) for w, p in leaves.items() if not callable(p.get_default("handler"))] == []


def test_building_the_tree_imports_no_cluster_library() -> None:
    code = (
        "import sys; from tailor.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kopf', 'kubernetes', 'pydantic', 'torch', 'boto3') or m.startswith("
        "('tailor.api', 'tailor.controllers', 'tailor.workloads', 'tailor.devcluster'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_rollback_without_a_revision_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        tailor(["prompt", "rollback", "assistant"])
    assert exited.value.code == 2
    assert "tailor prompt: error: give a REVISION, or --clear" in capsys.readouterr().err


def test_store_push_names_the_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        tailor(["store", "push", str(tmp_path / "absent"), "s3://bucket/model/"])
    assert exited.value.code == 2
    assert f"folder: {tmp_path / 'absent'} is not a folder" in capsys.readouterr().err
