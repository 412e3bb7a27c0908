"""The API models: generated CRDs match the models and are structural, every example is
valid, every bad manifest is rejected with a message naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor.api import KINDS, ManifestError, parse, parse_update
from tailor.api.crd import all_crds
from tailor.cli.crds import write_crds
from tests.corpus.loader import bad_cases

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "docs" / "examples").rglob("*.yaml"))


def test_crds_are_up_to_date() -> None:
    assert write_crds(ROOT / "crds", check=True) == 0, "run `tailor crds` and commit crds/"


def test_one_crd_per_kind_with_names_and_category() -> None:
    crds = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))]
    assert {c["spec"]["names"]["kind"] for c in crds} == set(KINDS)
    short = {c["spec"]["names"]["kind"]: c["spec"]["names"]["shortNames"] for c in crds}
    assert short == {
        "PromptProfile": ["pp"],
        "KnowledgeBase": ["kb"],
        "FineTuneJob": ["ftj"],
        "RAFTJob": ["raft"],
        "ModelDeployment": ["md"],
        "Evaluation": ["eval"],
        "AdaptationLoop": ["loop"],
    }
    for crd in crds:
        assert crd["spec"]["names"]["categories"] == ["tailor"]
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert columns[0] == "Phase" and columns[-1] == "Age"


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_crd_schema_is_structural(name: str) -> None:
    schema = all_crds()[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert node.get("type") != "null", path
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        if "properties" in node and not path.endswith("/properties"):
            assert "additionalProperties" not in node, path
        if "properties" in node and path.endswith("/properties"):
            for prop, sub in node.items():
                typed = (
                    "type" in sub
                    or sub.get("x-kubernetes-int-or-string")
                    or sub.get("x-kubernetes-preserve-unknown-fields")
                )
                assert typed, f"{path}/{prop} has no type"


def test_free_form_only_where_content_is_free_form() -> None:
    free = []
    for name, crd in all_crds().items():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        free += [
            f"{name}:{p}" for p, n in _walk(schema) if n.get("x-kubernetes-preserve-unknown-fields")
        ]
    # JSON schemas, inline data records, test expectations: nothing else.
    allowed = ("schema", "jsonSchema", "inline/items")
    assert free and all(p.endswith(allowed) for p in free), free


def test_cel_rules_carry_messages_and_field_paths() -> None:
    rules = [
        n
        for crd in all_crds().values()
        for _, node in _walk(crd)
        for n in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 15
    assert all(r["message"] and r["rule"] for r in rules)
    assert any("oldSelf" in r["rule"] for r in rules)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_are_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if doc.get("apiVersion", "").startswith("tailor.dev/"):
            parse(doc)


def test_corpus_is_large_and_covers_every_kind() -> None:
    cases = bad_cases()
    assert len(cases) >= 30
    assert {c.manifest["kind"] for c in cases} == set(KINDS)
    assert any(c.original for c in cases)


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c.name)
def test_bad_manifest_is_rejected_naming_the_field(case) -> None:
    with pytest.raises(ManifestError) as info:
        if case.original:
            parse(case.original)  # the original itself is fine
            parse_update(case.original, case.manifest)
        else:
            parse(case.manifest)
    lines = info.value.lines
    assert any(
        line.startswith(case.field + ":")
        or line.startswith(case.field + " ")
        or line.split(":")[0] == case.field
        for line in lines
    ), (case.field, lines)


def test_error_lines_explain_the_fix() -> None:
    manifest = yaml.safe_load((ROOT / "docs/examples/finetunejob.yaml").read_text())
    manifest["spec"]["method"] = "full"
    with pytest.raises(ManifestError) as info:
        parse(manifest)
    assert info.value.lines == [
        "spec.lora: lora settings apply only to method lora or qlora; remove lora or change method"
    ]


def test_wire_round_trip_keeps_camel_case() -> None:
    manifest = yaml.safe_load((ROOT / "docs/examples/modeldeployment.yaml").read_text())
    spec = parse(manifest)
    wire = spec.wire()
    assert wire["knowledgeBaseRef"] == {"name": "torchhub-docs", "topK": 3}
    assert wire["adapters"][0]["fineTuneJobRef"] == {"name": "torchhub-lora"}
    assert type(spec).model_validate(wire) == spec


def test_no_field_is_named_like_a_yaml_boolean() -> None:
    """A field named ``n`` (or y, on, off, ...) is a boolean to YAML 1.1, which the API
    server's CRD decoder reads: ``required: [n]`` failed to install. Found when a status
    field was named ``n``."""
    booleans = {"y", "n", "yes", "no", "on", "off", "true", "false"}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for line in path.read_text().splitlines():
            word = line.strip().removeprefix("- ").removesuffix(":")
            assert word.lower() not in booleans, f"{path.name}: {line.strip()}"
