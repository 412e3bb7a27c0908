"""ModelDeployment children: a Deployment running the serve workload, its Service, an
optional HorizontalPodAutoscaler, and the spec ConfigMap. The pod template carries the
revision of what the pods run (the pod itself, prompt revision, index version), so a
change in any of them rolls the Deployment. Adapters are not in it: they live in the spec
ConfigMap, and the replicas load and unload them in place when it changes (the builtin
engine with int8 on CPU loads a second engine with the new list and swaps it in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tailor.api.common import Resources, SecretKeyRef
from tailor.api.modeldeployment import ModelDeploymentSpec, NetworkPeer
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import (
    Reporter,
    RetrieverConfig,
    Routing,
    ServedAdapter,
    ServeRun,
    UpstreamEngineConfig,
    adapters_digest,
    feedback_folder,
)
from tailor.builders.common import (
    CONTAINER_SECURITY_CONTEXT,
    PVCS_DIR,
    Manifest,
    Mounts,
    Parent,
    Program,
    Workload,
    child_name,
    container_resources,
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
VLLM_PORT = 8001
"""vLLM's OpenAI server, on the pod's loopback only: every request goes through the
gateway (auth, prompts, RAG, cache, metrics)."""
GATEWAY_RESOURCES = Resources(cpu="1", memory="3Gi")
VLLM_QUANTIZATION = {"int8": "fp8", "nf4": "bitsandbytes"}
"""vLLM's in-flight method for each ``quantization``: int8 -> fp8 (8-bit weights with
dynamic scales; vLLM has no in-flight int8 for unquantized checkpoints), nf4 ->
bitsandbytes (its 4-bit NF4)."""
VLLM_MAX_LORAS = 8
"""Adapters vLLM keeps on its GPUs at once (``--max-loras``; more are swapped in from
host memory). Fixed, so that adding an adapter never changes the pod."""


def vllm_volumes(settings: OperatorSettings) -> list[Manifest]:
    """vLLM's cache and shared memory, each bounded (workloads.scratch.vllm; 8Gi of RAM)."""
    return [
        {"name": "vllm-cache", "emptyDir": {"sizeLimit": str(settings.scratch.vllm)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]


def vllm_model(spec: ModelDeploymentSpec) -> tuple[str, list[str]]:
    """(what vLLM loads, extra arguments): a Hub repo (with its revision) or a path on a
    mounted claim."""
    hub, claim = spec.base_model.hub, spec.base_model.claim
    if hub:
        return hub.repo, ["--revision", hub.revision]
    assert claim is not None, "engine vllm takes huggingface or pvc models (CRD rule)"
    return f"{PVCS_DIR}/{claim.claim_name}/{claim.path}".rstrip("/"), []


def vllm_container(
    spec: ModelDeploymentSpec,
    parent: Parent,
    settings: OperatorSettings,
    volume_mounts: list[Manifest],
) -> Manifest:
    """The vLLM OpenAI server beside the gateway: tensor parallel over the replica's GPUs,
    prefix caching, LoRA enabled (the gateway loads the adapters through vLLM's runtime
    adapter API once it serves), listening on loopback only."""
    model, extra = vllm_model(spec)
    args = [
        "serve", model, *extra,
        "--served-model-name", parent.name,
        "--host", "127.0.0.1",
        "--port", str(VLLM_PORT),
        "--tensor-parallel-size", str(spec.resources.gpus),
        "--enable-prefix-caching",
        "--max-num-seqs", str(spec.batching.max_batch_size),
        "--disable-log-requests",
    ]  # fmt: skip
    if spec.max_context_tokens:
        args += ["--max-model-len", str(spec.max_context_tokens)]
    if spec.quantization in VLLM_QUANTIZATION:
        args += ["--quantization", VLLM_QUANTIZATION[spec.quantization]]
    if spec.adapters:  # a deployment's first adapter restarts vLLM with LoRA; others do not
        args += ["--enable-lora", "--max-loras", str(VLLM_MAX_LORAS), "--max-lora-rank", "64"]
    env: list[Manifest] = [
        {"name": "HOME", "value": "/home/vllm"},
        {"name": "HF_HOME", "value": "/home/vllm/.cache/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": "/home/vllm/.cache/vllm"},
        {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "HF_HUB_OFFLINE", "value": "0" if spec.base_model.hub else "1"},
    ]
    hub = spec.base_model.hub
    if hub and hub.token_secret_ref:  # by reference: never in the spec or the args
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": hub.token_secret_ref.name, "key": hub.token_secret_ref.key}}})  # fmt: skip
    # the same paths as the gateway's (adapters the gateway pulled from S3 land in "cache")
    mounts = [m for m in volume_mounts if m["name"] != "spec"]
    mounts += [
        {"name": "vllm-cache", "mountPath": "/home/vllm"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    health = {"httpGet": {"path": "/health", "port": VLLM_PORT, "host": "127.0.0.1"}}
    return {
        "name": "vllm",
        "image": settings.vllm_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["vllm"],
        "args": args,
        "env": env,
        "resources": container_resources(spec.resources, settings.pods),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": mounts,
        # loading weights takes minutes: up to 30 before the kubelet gives up
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 180},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


@dataclass
class ResolvedRefs:
    """What the controller found behind a ModelDeployment's references."""

    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, artifact uri)
    adapter_sha256: dict[str, str] = field(default_factory=dict)
    """By adapter name: the sha256 of its manifest.json recorded in its run's status."""
    prompt_config_map: str | None = None
    prompt_profile_revision: str | None = None
    knowledge_base: RetrieverConfig | None = None
    knowledge_base_version: str | None = None
    knowledge_base_kept: tuple[int, int] | None = None
    """(oldest, newest) version number of the index a rollout variant may name: the one
    serving and the store.keepCollections before it."""
    routing: Routing | None = None
    """The rollout's current step (status.rollout), for the spec file: applied in place."""
    gated: dict[str, str] = field(default_factory=dict)
    """Adapters served to Evaluations only (their gate has not passed), and why."""


def served_models(spec: ModelDeploymentSpec, parent: Parent) -> list[str]:
    """Model names clients can request."""
    return [parent.name] + [f"{parent.name}/{a.name}" for a in spec.adapters]


def endpoint(parent: Parent, settings: OperatorSettings) -> str:
    return f"http://{parent.name}.{parent.namespace}.svc:{settings.serve_port}/v1"


def test_key(parent: Parent) -> SecretKeyRef:
    """The ModelDeployment's test key: the credential a PromptProfile's test Job sends to
    bring its own profile (the operator creates the Secret, with a random key, once)."""
    return SecretKeyRef(name=child_name(parent, "test-key"), key="key")


def test_key_secret(parent: Parent, value: str) -> Manifest:
    """The test key's Secret, owned by the ModelDeployment (created once, never updated)."""
    ref = test_key(parent)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(parent, ref.name, "test-key"),
        "type": "Opaque",
        "stringData": {ref.key: value},
    }


def network_policy(
    spec: ModelDeploymentSpec,
    parent: Parent,
    settings: OperatorSettings,
    selector: dict[str, str],
) -> Manifest:
    """Ingress of the server's pods: the API port from ``spec.network.allowFrom`` only, the
    metrics port (which lists adapters) from the admin's namespaces only (Prometheus, the
    operator). The kubelet's probes are not pod traffic and stay allowed."""

    def peer(allowed: NetworkPeer) -> dict[str, Any]:
        pods = {"podSelector": {"matchLabels": dict(allowed.pod_labels)}}
        if allowed.namespace is None:
            return pods  # a podSelector alone: pods of the policy's own namespace
        by_name = {"matchLabels": {"kubernetes.io/metadata.name": allowed.namespace}}
        return {"namespaceSelector": by_name, **pods}

    ingress: list[dict[str, Any]] = []
    if spec.network.allow_from:  # an empty `from` would admit every source: then no rule
        ingress.append(
            {
                "from": [peer(p) for p in spec.network.allow_from],
                "ports": [{"protocol": "TCP", "port": settings.serve_port}],
            }
        )
    if settings.network_policy.metrics_from_namespaces:
        ingress.append(
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                    for ns in settings.network_policy.metrics_from_namespaces
                ],
                "ports": [{"protocol": "TCP", "port": settings.metrics_port}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(parent, parent.name, "server"),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def build_serving(
    spec: ModelDeploymentSpec, parent: Parent, settings: OperatorSettings, refs: ResolvedRefs
) -> Workload:
    """The serving workload of a ModelDeployment."""
    name = parent.name
    spec_name = child_name(parent, "serve")
    mounts = Mounts().add_model(spec.base_model)
    adapters = []
    for adapter_name, uri in refs.adapters:
        path, claim = uri_to_path(uri, settings, parent.namespace)
        if claim and not path.startswith(settings.artifacts_mount + "/"):
            mounts.pvcs.add(claim)
        mounts.s3 = mounts.s3 or not claim
        adapters.append(
            ServedAdapter(
                name=adapter_name,
                path=path,
                uri=None if claim else uri,
                sha256=refs.adapter_sha256.get(adapter_name),
            )
        )
    if spec.auth:  # every key the gateway checks callers against
        mounts.add_secret(spec.auth.api_key_secret_ref)
        for key in spec.auth.keys:
            mounts.add_secret(key.secret_ref)
    mounts.add_secret(test_key(parent))
    if refs.knowledge_base:
        mounts.add_secret(refs.knowledge_base.qdrant.api_key_secret_ref)
    vllm = spec.resolved_engine() == "vllm"
    run = ServeRun(
        owner=parent.owner(),
        paths=workload_paths(settings, parent.namespace),
        reporter=Reporter(kind="none"),
        metrics_port=settings.metrics_port,  # /metrics on its own port, not the API's
        spec=spec,
        served_name=parent.name,
        adapters=adapters,
        adapters_revision=adapters_digest(adapters),
        prompt_profile_file=f"{PROMPT_DIR}/{PROMPT_FILE}" if refs.prompt_config_map else None,
        knowledge_base=refs.knowledge_base,
        limits=settings.serving_limits,
        prompt_profile_revision=refs.prompt_profile_revision,
        knowledge_base_version=refs.knowledge_base_version,
        test_key_secret_ref=test_key(parent),
        routing=refs.routing,
        gated_adapters=refs.gated,
        port=settings.serve_port,
        upstream=UpstreamEngineConfig(
            url=f"http://127.0.0.1:{VLLM_PORT}",
            model=parent.name,
            load_adapters=True,
            max_inflight=spec.batching.max_batch_size + spec.batching.max_queue,
        )
        if vllm
        else None,
    )
    volumes, volume_mounts = volumes_and_mounts(
        settings,
        mounts,
        spec_name,
        artifacts_read_only=True,
        # an embedded knowledge base is read from its files on the claim
        artifacts_volume=bool(refs.knowledge_base and refs.knowledge_base.on_claim),
    )
    claim_root = any(v["name"] == "artifacts" and "persistentVolumeClaim" in v for v in volumes)
    if spec.feedback and claim_root:  # capture writes its own folder, nothing else
        folder = feedback_folder(parent.name)
        volume_mounts.append(
            {
                "name": "artifacts",
                "mountPath": f"{settings.artifacts_mount}/{folder}",
                "subPath": folder,
            }
        )
    if refs.prompt_config_map:
        volumes.append({"name": "prompt", "configMap": {"name": refs.prompt_config_map}})
        volume_mounts.append({"name": "prompt", "mountPath": PROMPT_DIR, "readOnly": True})
    ports = [
        {"name": "http", "containerPort": settings.serve_port},
        {"name": "metrics", "containerPort": settings.metrics_port},
    ]
    # with vLLM the GPUs are its container's; the gateway tokenizes, retrieves and proxies
    gateway = GATEWAY_RESOURCES if vllm else spec.resources
    container = workload_container(
        settings, "server", Program.SERVER, gateway, volume_mounts, ports=ports
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
    pod: Manifest = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(settings),
        "containers": [
            container,
            *([vllm_container(spec, parent, settings, volume_mounts)] if vllm else []),
        ],
        "volumes": volumes + (vllm_volumes(settings) if vllm else []),
        **pod_placement(spec.resources),
    }
    wire = spec.wire()
    wire.pop("adapters", None)  # not the list: what it changes in the pod (a new claim)
    wire.pop("rollout", None)  # steps are applied in place, like adapters
    revision = content_hash(
        {
            "spec": wire,
            "pod": pod,
            "prompt": refs.prompt_config_map,
            "kb": refs.knowledge_base_version,
        }
    )
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
                        "prometheus.io/port": str(settings.metrics_port),
                    },
                },
                "spec": pod,
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
    if settings.network_policy.enabled:
        manifests.append(network_policy(spec, parent, settings, selector))
    if spec.autoscaling:
        manifests.append(build_autoscaler(spec, parent))
    return Workload(
        name=name,
        module=Program.SERVER,
        run=run,
        manifests=manifests,
        server=True,
        revision=revision,
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
