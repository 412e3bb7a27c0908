"""KnowledgeBase children: the index Job (one per build), its spec ConfigMap and reporting
RBAC; plus :func:`retriever_config`, what any reader of the index needs."""

from __future__ import annotations

from typing import Literal

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
    """The alias clients query: spec.store.qdrant.collection or <namespace>-<name>."""
    return spec.store.qdrant.collection or f"{parent.namespace}-{parent.name}".replace(".", "-")


def retriever_config(
    spec: KnowledgeBaseSpec, parent: Parent, settings: OperatorSettings
) -> RetrieverConfig:
    """How to reach this knowledge base's index (server Qdrant or embedded on the volume)."""
    root = f"{settings.artifacts_mount}/{artifact_dir(parent)}"
    return RetrieverConfig(
        alias=alias_name(spec, parent),
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
) -> Workload:
    """Index build number ``build`` of a KnowledgeBase."""
    name = index_job_name(parent, build)
    rbac_name = child_name(parent, "index")
    run = IndexRun(
        owner=parent.owner(),
        paths=workload_paths(settings),
        reporter=reporter(settings),
        metrics_port=settings.metrics_port,
        spec=spec,
        target=retriever_config(spec, parent, settings),
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
