"""Knowledge bases of two namespaces on one Qdrant never share an alias, and a build or a
removal touches only its own collections (docs/security.md, "Knowledge bases").

Before, the alias was ``<namespace>-<name>`` or ``spec.store.qdrant.collection`` as given:
``team-a``/``docs`` and ``team``/``a-docs`` were the same alias, and any tenant could name
another's. A build moved that alias to its own documents and pruned the other tenant's
versions. The real index program and Qdrant (one embedded storage through the server code
path, as in tests/workloads/test_index.py); the aliases come from the operator's builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

from tailor.api.knowledgebase import KnowledgeBaseSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import IndexRun
from tailor.builders import knowledgebase as builders
from tailor.builders.common import Parent
from tailor.workloads.knowledge.index import build_index
from tailor.workloads.knowledge.retriever import Retriever
from tailor.workloads.knowledge.vectorstore import AliasStore

pytestmark = pytest.mark.workloads


def index_run(
    tmp_path: Path, namespace: str, name: str, texts: list[str], **qdrant: Any
) -> IndexRun:
    spec = KnowledgeBaseSpec.model_validate(
        {
            "sources": [{"inline": [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]}],
            "chunking": {"strategy": "none"},
            "embedding": {"model": {"builtin": "minilm-l6-v2"}},
            "store": {
                "qdrant": {"url": "http://qdrant.shared:6333", "keepCollections": 0, **qdrant}
            },
        }
    )
    parent = Parent(kind="KnowledgeBase", name=name, namespace=namespace, uid=f"{namespace}-{name}")
    run: IndexRun = builders.build_index(spec, parent, OperatorSettings(), build=1).run
    return run.model_copy(
        update={"paths": run.paths.model_copy(update={"artifacts": str(tmp_path)})}
    )


def test_two_namespaces_never_share_an_alias_and_a_build_prunes_only_its_own(
    tmp_path: Path,
) -> None:
    client = QdrantClient(path=str(tmp_path / "shared-qdrant"))
    store = AliasStore(client, payload_indexes=False)
    theirs = index_run(tmp_path, "team-a", "docs", ["team-a's payroll runbook"])
    ours = index_run(tmp_path, "team", "a-docs", ["team's public recipes"])
    named = index_run(tmp_path, "team", "notes", ["team's notes"], collection="docs")
    assert {theirs.target.alias, ours.target.alias, named.target.alias} == {
        "team-a_docs", "team_a-docs", "team_docs"
    }  # fmt: skip
    build_index(theirs, store=store)
    build_index(ours, store=store)
    build_index(named, store=store)  # collection "docs" stays in namespace team
    changed = index_run(tmp_path, "team", "a-docs", ["team's public recipes", "and more"])
    build_index(changed, store=store)  # a new version prunes (keepCollections 0): its own only
    aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    assert aliases == {
        "team-a_docs": "team-a_docs-v1", "team_a-docs": "team_a-docs-v2", "team_docs": "team_docs-v1"
    }  # fmt: skip
    answers = Retriever(theirs.target, theirs.paths, store=store).search("runbook", top_k=5)
    assert [a.text for a in answers] == ["team-a's payroll runbook"]
    store.remove(ours.target.alias)  # what the KnowledgeBase's deletion runs
    assert {a.alias_name for a in client.get_aliases().aliases} == {"team-a_docs", "team_docs"}
    client.close()


def test_a_knowledge_base_built_before_the_upgrade_keeps_serving_its_alias() -> None:
    spec = KnowledgeBaseSpec.model_validate(
        {"sources": [{"inline": [{"id": "a", "text": "x"}]}], "embedding": {"model": {"builtin": "minilm-l6-v2"}}}
    )  # fmt: skip
    parent = Parent(kind="KnowledgeBase", name="docs.v2", namespace="team", uid="u")
    legacy = {"collection": "team-docs-v2-v7", "readyBuild": 7}
    assert builders.serving_alias(spec, parent, legacy) == "team-docs-v2"  # until rebuilt
    assert builders.serving_alias(spec, parent, {"collection": "team_docs.v2-v8"}) == "team_docs.v2"
    assert (
        builders.build_index(spec, parent, OperatorSettings(), 8).run.target.alias == "team_docs.v2"
    )
