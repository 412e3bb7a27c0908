"""Tailor's generated CRDs, installed on the real API server, are served and documented.

The five kinds become Established under their short names and the ``tailor``
category (``kubectl get tailor``), and ``kubectl explain`` shows the field
documentation that the pydantic models carry.
"""

from __future__ import annotations

import re

import pytest

from tailor.devcluster.kube import Kube

pytestmark = pytest.mark.cluster

GROUP = "tailor.dev"
SHORT_NAMES = {
    "PromptProfile": "pp",
    "KnowledgeBase": "kb",
    "FineTuneJob": "ftj",
    "RAFTJob": "raft",
    "ModelDeployment": "md",
    "Evaluation": "eval",
    "AdaptationLoop": "loop",
}


def test_every_crd_is_established(kube: Kube, crd_names: list[str]) -> None:
    crds = {
        c["spec"]["names"]["kind"]: c
        for c in kube.get_json("customresourcedefinitions")["items"]
        if c["spec"]["group"] == GROUP
    }
    assert set(crds) == set(SHORT_NAMES)
    assert sorted(crd_names) == sorted(c["metadata"]["name"] for c in crds.values())
    for kind, crd in crds.items():
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", kind
        assert conditions.get("NamesAccepted") == "True", kind
        assert SHORT_NAMES[kind] in crd["spec"]["names"]["shortNames"]
        assert "tailor" in crd["spec"]["names"]["categories"]


def test_get_tailor_covers_every_kind(kube: Kube, namespace: str) -> None:
    resources = kube.kubectl("api-resources", "--categories=tailor", "-o", "name").stdout.split()
    assert sorted(r.split(".")[0] for r in resources) == sorted(
        f"{kind.lower()}s" for kind in SHORT_NAMES
    )
    result = kube.kubectl("get", "tailor", "-n", namespace)
    assert "No resources found" in result.stderr


def test_explain_shows_the_documentation_of_every_spec_field(kube: Kube) -> None:
    output = kube.kubectl("explain", "ftj.spec").stdout
    assert re.search(r"^KIND:\s+FineTuneJob$", output, re.MULTILINE)
    assert re.search(r"^GROUP:\s+tailor\.dev$", output, re.MULTILINE)
    description = output.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0].strip()
    assert description, "spec has no description"
    # Each field is "  name\t<type>", then optional "  enum: ..." lines, then its
    # description indented by four spaces.
    blocks = re.split(r"^  (\S+)\s+<.*$", output.split("FIELDS:", 1)[1], flags=re.MULTILINE)
    documented = {
        name: any(line.startswith("    ") and line.strip() for line in body.splitlines())
        for name, body in zip(blocks[1::2], blocks[2::2], strict=True)
    }
    assert len(documented) >= 3
    assert [name for name, has_doc in documented.items() if not has_doc] == []
