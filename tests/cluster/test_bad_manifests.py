"""Every manifest of tests/corpus/bad is rejected by the real API server, naming its field.

Each corpus file holds ``description``, ``field`` (the path the user's error must
name, e.g. ``spec.lora.r``), ``manifest`` and optionally ``original``: when
present, ``original`` is applied for real first and the case is the update to
``manifest`` (immutability rules). The check goes through ``kubectl apply
--dry-run=server``, i.e. exactly what a user sees: OpenAPI schema validation,
CEL rules and strict field validation of the generated CRDs. The error must be
about the whole ``field`` path (see ``names_field``), not merely mention it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor.devcluster.kube import Kube

pytestmark = pytest.mark.cluster

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "bad"
CASES = sorted(CORPUS.glob("*.yaml"))


def in_namespace(manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    metadata = {**manifest.get("metadata", {}), "namespace": namespace}
    return {**manifest, "metadata": metadata}


def names_field(message: str, field: str) -> bool:
    """Whether an API error is about exactly ``field``, as the API server words it.

    Validation errors read ``spec.lora.r: Invalid value: ...``; strict decoding
    errors read ``unknown field "spec.epochs"``. The path must be whole: ``spec.lora``
    does not match an error about ``spec.lora.r``, nor ``r`` one about ``spec.lora.r``.
    """
    return re.search(rf'(?<![\w.\]]){re.escape(field)}(?=: |")', message) is not None


@pytest.mark.parametrize("case_file", CASES, ids=[p.stem for p in CASES])
def test_server_rejects_the_manifest_and_names_the_field(
    kube: Kube, namespace: str, crd_names: list[str], case_file: Path
) -> None:
    case = yaml.safe_load(case_file.read_text())
    assert {"description", "field", "manifest"} <= set(case) <= {
        "description", "field", "manifest", "original",
    }, f"{case_file.name}: malformed corpus case"  # fmt: skip
    if "original" in case:
        created = kube.kubectl(
            "apply", "-f", "-", input=json.dumps(in_namespace(case["original"], namespace)),
            check=False,
        )  # fmt: skip
        assert created.returncode == 0, (
            f"{case_file.name}: the original must be valid:\n{created.stderr}"
        )

    result = kube.kubectl(
        "apply", "--dry-run=server", "-f", "-",
        input=json.dumps(in_namespace(case["manifest"], namespace)), check=False,
    )  # fmt: skip
    message = (result.stderr + result.stdout).strip()
    assert result.returncode != 0, (
        f"{case_file.name}: the server accepted a bad manifest ({case['description']}):\n{message}"
    )
    assert "no matches for kind" not in message, f"{case_file.name}: CRD missing:\n{message}"
    assert names_field(message, case["field"]), (
        f"{case_file.name}: the error does not name {case['field']!r}:\n{message}"
    )
