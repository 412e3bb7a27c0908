"""KnowledgeBase children: the index Job (one per build), its spec ConfigMap and reporting
RBAC; plus :func:`retriever_config`, what any reader of the index needs."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

from tailor.api.knowledgebase import KnowledgeBaseSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import IndexRun, RetrieverConfig
from tailor.builders.common import (
    Mounts,
    Parent,
    Program,
    Workload,
    artifact_dir,
    batch_job,
    child_name,
    pod_placement,
    pod_security_context,
    reporter,
    reporter_rbac,
    spec_config_map,
    volumes_and_mounts,
    workload_container,
    workload_paths,
)


def alias_name(spec: KnowledgeBaseSpec, parent: Parent) -> str:
    """The alias clients query: ``<namespace>_<collection or name>``. A namespace cannot
    contain '_', so two namespaces never share an alias (``team-a``/``docs`` and
    ``team``/``a-docs`` did under the earlier ``<namespace>-<name>``), and
    spec.store.qdrant.collection names an alias inside its namespace, never another
    tenant's: a build writes, moves and prunes only collections under it."""
    alias = f"{parent.namespace}_{spec.store.qdrant.collection or parent.name}"
    if len(alias) > 200:  # Qdrant names end at 255 characters, with "-v<N>" after
        alias = f"{alias[:183]}-{hashlib.sha256(alias.encode()).hexdigest()[:16]}"
    return alias


def legacy_alias_name(spec: KnowledgeBaseSpec, parent: Parent) -> str:
    """The alias before namespaces qualified it (Tailor <= 0.9): still served until the
    knowledge base's next build moves it to :func:`alias_name`."""
    return spec.store.qdrant.collection or f"{parent.namespace}-{parent.name}".replace(".", "-")


def serving_alias(spec: KnowledgeBaseSpec, parent: Parent, status: dict[str, Any]) -> str:
    """The alias readers query now: the legacy one while the ready collection is still
    one of its versions (``status.collection``), else :func:`alias_name`."""
    legacy, collection = legacy_alias_name(spec, parent), str(status.get("collection") or "")
    if re.fullmatch(re.escape(legacy) + r"-v\d+", collection):
        return legacy
    return alias_name(spec, parent)


def retriever_config(
    spec: KnowledgeBaseSpec,
    parent: Parent,
    settings: OperatorSettings,
    status: dict[str, Any] | None = None,
) -> RetrieverConfig:
    """How to reach this knowledge base's index (server Qdrant or embedded on the volume).
    ``status`` (the KnowledgeBase's): for readers, who query the alias serving now."""
    root = f"{settings.artifacts_mount}/{artifact_dir(parent)}"
    return RetrieverConfig(
        alias=alias_name(spec, parent) if status is None else serving_alias(spec, parent, status),
        qdrant=spec.store.qdrant,
        path=f"{root}/qdrant" if spec.store.qdrant.url is None else None,
        embedding=spec.embedding,
        retrieval=spec.retrieval,
        # tuned models live on the claim beside the index, whichever store holds the vectors
        embedders=f"{root}/embedders" if spec.adaptation else None,
    )


def index_job_name(parent: Parent, build: int) -> str:
    return child_name(parent, f"index-{build}")


def build_index(
    spec: KnowledgeBaseSpec,
    parent: Parent,
    settings: OperatorSettings,
    build: int,
    mode: Literal["incremental", "full"] = "incremental",
    status: dict[str, Any] | None = None,
) -> Workload:
    """Index build number ``build`` of a KnowledgeBase; ``status``: the removal of the
    collections serving now (``--delete``)."""
    name = index_job_name(parent, build)
    rbac_name = child_name(parent, "index")
    run = IndexRun(
        owner=parent.owner(),
        paths=workload_paths(settings, parent.namespace),
        reporter=reporter(settings),
        metrics_port=settings.metrics_port,
        spec=spec,
        target=retriever_config(spec, parent, settings, status),
        mode=mode,
    )
    mounts = (
        Mounts()
        .add_sources(spec.sources)
        .add_model(spec.embedding.model)
        .add_secret(spec.store.qdrant.api_key_secret_ref)
    )
    if spec.adaptation:
        mounts.add_sources([spec.adaptation.questions])
    volumes, volume_mounts = volumes_and_mounts(
        settings, mounts, name, artifacts_volume=run.target.on_claim
    )
    pod = {
        "serviceAccountName": rbac_name,
        "securityContext": pod_security_context(settings),
        "containers": [
            workload_container(settings, "indexer", Program.INDEXER, spec.resources, volume_mounts)
        ],
        "volumes": volumes,
        **pod_placement(spec.resources),
    }
    job = batch_job(parent, name, "indexer", pod, backoff_limit=2)
    manifests = [
        spec_config_map(parent, name, "indexer", run),
        *reporter_rbac(parent, rbac_name, "indexer", "knowledgebases"),
        job,
    ]
    return Workload(
        name=name, module=Program.INDEXER, run=run, manifests=manifests, backoff_limit=2
    )
