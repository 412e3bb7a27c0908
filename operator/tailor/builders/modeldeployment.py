"""ModelDeployment children: a Deployment running the serve workload, its Service, an
optional HorizontalPodAutoscaler, and the spec ConfigMap. The pod template carries the
revision of everything served (adapters, prompt revision, index version), so a change
in any of them rolls the Deployment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import Reporter, RetrieverConfig, ServedAdapter, ServeRun
from tailor.builders.common import (
    Manifest,
    Mounts,
    Parent,
    Workload,
    child_name,
    content_hash,
    labels,
    metadata,
    pod_placement,
    pod_security_context,
    spec_config_map,
    uri_to_path,
    volumes_and_mounts,
    workload_container,
    workload_paths,
)

PROMPT_DIR = "/etc/tailor/prompt"
PROMPT_FILE = "profile.json"


@dataclass
class ResolvedRefs:
    """What the controller found behind a ModelDeployment's references."""

    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, artifact uri)
    prompt_config_map: str | None = None
    knowledge_base: RetrieverConfig | None = None
    knowledge_base_version: str | None = None


def served_models(spec: ModelDeploymentSpec, parent: Parent) -> list[str]:
    """Model names clients can request."""
    return [parent.name] + [f"{parent.name}/{a.name}" for a in spec.adapters]


def endpoint(parent: Parent, settings: OperatorSettings) -> str:
    return f"http://{parent.name}.{parent.namespace}.svc:{settings.serve_port}/v1"


def build_serving(
    spec: ModelDeploymentSpec, parent: Parent, settings: OperatorSettings, refs: ResolvedRefs
) -> Workload:
    """The serving workload of a ModelDeployment."""
    name = parent.name
    spec_name = child_name(parent, "serve")
    mounts = Mounts().add_model(spec.base_model)
    adapters = []
    for adapter_name, uri in refs.adapters:
        path, claim = uri_to_path(uri, settings)
        if claim and not path.startswith(settings.artifacts_mount + "/"):
            mounts.pvcs.add(claim)
        mounts.s3 = mounts.s3 or not claim
        adapters.append(ServedAdapter(name=adapter_name, path=path, uri=None if claim else uri))
    if spec.auth:
        mounts.add_secret(spec.auth.api_key_secret_ref)
    if refs.knowledge_base:
        mounts.add_secret(refs.knowledge_base.qdrant.api_key_secret_ref)
    run = ServeRun(
        owner=parent.owner(),
        paths=workload_paths(settings),
        reporter=Reporter(kind="none"),
        metrics_port=None,  # metrics share the API port: /metrics
        spec=spec,
        served_name=parent.name,
        adapters=adapters,
        prompt_profile_file=f"{PROMPT_DIR}/{PROMPT_FILE}" if refs.prompt_config_map else None,
        knowledge_base=refs.knowledge_base,
        port=settings.serve_port,
    )
    volumes, volume_mounts = volumes_and_mounts(
        settings,
        mounts,
        spec_name,
        artifacts_read_only=True,
        # an embedded knowledge base is read from its files on the claim
        artifacts_volume=bool(refs.knowledge_base and refs.knowledge_base.on_claim),
    )
    if refs.prompt_config_map:
        volumes.append({"name": "prompt", "configMap": {"name": refs.prompt_config_map}})
        volume_mounts.append({"name": "prompt", "mountPath": PROMPT_DIR, "readOnly": True})
    revision = content_hash(
        {
            "spec": spec.wire(),
            "adapters": refs.adapters,
            "prompt": refs.prompt_config_map,
            "kb": refs.knowledge_base_version,
        }
    )
    port = {"name": "http", "containerPort": settings.serve_port}
    container = workload_container(
        settings, "server", "serve", spec.resources, volume_mounts, ports=[port]
    )
    container["readinessProbe"] = {
        "httpGet": {"path": "/readyz", "port": "http"},
        "periodSeconds": 5,
        "failureThreshold": 3,
    }
    container["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": 10,
        "failureThreshold": 6,
    }
    container["startupProbe"] = {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": 5,
        "failureThreshold": 120,
    }
    selector = {"tailor.dev/modeldeployment": parent.name, "app.kubernetes.io/component": "server"}
    pod_labels = labels(parent, "server")
    deployment: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(parent, name, "server"),
        "spec": {
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "tailor.dev/revision": revision,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(settings.serve_port),
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(settings),
                    "containers": [container],
                    "volumes": volumes,
                    **pod_placement(spec.resources),
                },
            },
        },
    }
    if spec.autoscaling is None:
        deployment["spec"]["replicas"] = spec.replicas
    service: Manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(parent, name, "server"),
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": settings.serve_port, "targetPort": "http"}],
        },
    }
    manifests: list[Manifest] = [spec_config_map(parent, spec_name, "server", run), deployment]
    manifests.append(service)
    if spec.autoscaling:
        manifests.append(build_autoscaler(spec, parent))
    return Workload(
        name=name, module="serve", run=run, manifests=manifests, server=True, revision=revision
    )


def build_autoscaler(spec: ModelDeploymentSpec, parent: Parent) -> Manifest:
    """An autoscaling/v2 HPA on the in-flight requests per pod (via a metrics adapter)."""
    assert spec.autoscaling is not None
    target: dict[str, Any] = {
        "type": "AverageValue",
        "averageValue": str(spec.autoscaling.target_inflight_requests),
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(parent, parent.name, "server"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": parent.name},
            "minReplicas": spec.autoscaling.min_replicas,
            "maxReplicas": spec.autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": "tailor_serve_inflight_requests"},
                        "target": target,
                    },
                }
            ],
        },
    }
