"""Building blocks every child manifest shares: names, labels, owner references, the
workload pod (security context, volumes for sources, models and secrets, resources),
the spec ConfigMap and the per-run progress-reporting RBAC.

Everything is a pure function of the parent object and :class:`OperatorSettings`; the
same inputs always give the same manifests, so a restarted operator re-applies identical
children instead of creating duplicates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tailor.api import API_VERSION
from tailor.api.common import (
    DataSource,
    EmbeddingModelSource,
    ModelSource,
    PvcPath,
    Resources,
    SecretKeyRef,
)
from tailor.api.settings import OperatorSettings, PodPolicy
from tailor.api.workloads import ObjectStore, OwnerRef, Paths, Reporter

Manifest = dict[str, Any]

MANAGED_BY = {"app.kubernetes.io/managed-by": "tailor"}
SPEC_DIR = "/etc/tailor/spec"
SPEC_FILE = "spec.json"
CONFIG_MAPS_DIR = "/etc/tailor/configmaps"
SECRETS_DIR = "/etc/tailor/secrets"
PVCS_DIR = "/mnt/pvc"


@dataclass(frozen=True)
class Parent:
    """The resource whose children are built: enough of its metadata to own them."""

    kind: str
    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Parent:
        meta = body["metadata"]
        return cls(
            kind=body["kind"],
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 1),
        )

    @property
    def label_key(self) -> str:
        return f"tailor.dev/{self.kind.lower()}"

    def owner(self) -> OwnerRef:
        return OwnerRef(kind=self.kind, namespace=self.namespace, name=self.name, uid=self.uid)


def child_name(parent: Parent, suffix: str, limit: int = 63) -> str:
    """``<parent>-<suffix>``, shortened with a stable hash when longer than ``limit``."""
    name = f"{parent.name}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - len(suffix) - 10].rstrip('-')}-{digest}-{suffix}"


def labels(parent: Parent, component: str) -> dict[str, str]:
    """Labels of every child: managed-by, the parent's kind and name, the component."""
    return {
        **MANAGED_BY,
        "app.kubernetes.io/part-of": "tailor",
        "app.kubernetes.io/component": component,
        parent.label_key: parent.name,
    }


def owner_reference(parent: Parent) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": parent.kind,
        "name": parent.name,
        "uid": parent.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(parent: Parent, name: str, component: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": parent.namespace,
        "labels": labels(parent, component),
        "ownerReferences": [owner_reference(parent)],
        **extra,
    }


def artifact_dir(parent: Parent) -> str:
    """Path of a resource's artifacts, relative to the artifacts volume root."""
    return f"{parent.kind.lower()}/{parent.name}/{parent.uid}"


def store_uri(settings: OperatorSettings, namespace: str, path: str) -> str:
    """The URI of a path under a namespace's artifacts root:
    ``s3://<bucket>/<prefix>/<namespace>/<path>`` with the s3 store (one bucket, each
    namespace under its own prefix), ``pvc://<claim>/<path>`` with the pvc store (the claim
    is the namespace's own)."""
    store = object_store(settings, namespace)
    if store:
        return store.uri(path)
    return f"pvc://{settings.artifacts_pvc}/{path}"


def namespace_prefix(settings: OperatorSettings, namespace: str) -> str:
    """``s3://<bucket>/<prefix>/<namespace>/``: where a namespace's artifacts live in the
    cluster's bucket, and what its specs may read from S3 (besides the admin's shared
    prefixes, :attr:`OperatorSettings.s3_shared_readable`)."""
    connection = s3_connection(settings, namespace)
    return connection.uri("").rstrip("/") + "/" if connection else ""


def artifact_uri(settings: OperatorSettings, parent: Parent, sub: str = "") -> str:
    return store_uri(settings, parent.namespace, artifact_dir(parent) + (f"/{sub}" if sub else ""))


def uri_to_path(uri: str, settings: OperatorSettings, namespace: str) -> tuple[str, str | None]:
    """(path inside a pod, claim to mount or None) of an artifact URI: a path under the
    artifacts root for the store's own ``s3://<bucket>/<prefix>/<path>`` (downloaded
    there) and the pvc store's claim; ``/mnt/pvc/<claim>/<path>`` for any other claim
    (the artifacts claim too when this cluster's store is s3: a run that chose the pvc
    store wrote it); "" for any other ``s3://`` folder (a run that chose the s3 store on a
    pvc cluster), which the pod fetches into its model cache with the S3 connection."""
    if uri.startswith("s3://"):
        base = namespace_prefix(settings, namespace) if settings.artifacts_store == "s3" else ""
        if base and uri.startswith(base):
            return f"{settings.artifacts_mount}/{uri[len(base) :]}".rstrip("/"), None
        if s3_connection(settings, namespace) is None:
            raise ValueError(f"{uri} is in S3 but the operator has no S3 connection")
        return "", None
    if not uri.startswith("pvc://"):
        raise ValueError(f"unsupported artifact uri {uri}")
    claim, _, path = uri[len("pvc://") :].partition("/")
    if claim == settings.artifacts_pvc and settings.artifacts_store == "pvc":
        return f"{settings.artifacts_mount}/{path}".rstrip("/"), claim
    return f"{PVCS_DIR}/{claim}/{path}".rstrip("/"), claim


def object_store(settings: OperatorSettings, namespace: str) -> ObjectStore | None:
    """What a workload of ``namespace`` needs to reach the s3 store (credentials by Secret
    mount only): every key it writes is under ``<prefix>/<namespace>/``."""
    if settings.artifacts_store != "s3":
        return None
    return s3_connection(settings, namespace)


def s3_connection(settings: OperatorSettings, namespace: str) -> ObjectStore | None:
    """The operator's S3 connection (endpoint, region, credentials Secret) for a workload
    of ``namespace``, whether or not it holds the artifacts: s3:// models, data and
    adapters are read with it (the bucket and key come from each URI, checked by the
    operator against the namespace's prefix first: ``controllers/storage.py``)."""
    if not settings.s3_bucket:
        return None
    secret = settings.s3_secret
    return ObjectStore(
        bucket=settings.s3_bucket,
        prefix="/".join(p for p in (settings.s3_prefix.strip("/"), namespace) if p),
        endpoint=settings.s3_endpoint,
        region=settings.s3_region,
        addressing_style=settings.s3_addressing_style,
        secret_name=secret,
        credentials_dir=f"{SECRETS_DIR}/{secret}" if secret else None,
    )


def workload_paths(settings: OperatorSettings, namespace: str) -> Paths:
    return Paths(
        artifacts=settings.artifacts_mount,
        config_maps=CONFIG_MAPS_DIR,
        pvcs=PVCS_DIR,
        secrets=SECRETS_DIR,
        store=object_store(settings, namespace),
        s3=s3_connection(settings, namespace),
    )


def reporter(settings: OperatorSettings) -> Reporter:
    return Reporter(kind="kubernetes", min_interval_seconds=settings.progress_interval_seconds)


def spec_config_map(parent: Parent, name: str, component: str, run: Any) -> Manifest:
    """The ConfigMap holding a workload's spec file (JSON of a run model)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(parent, name, component),
        "data": {SPEC_FILE: json.dumps(run.wire(), indent=1, sort_keys=True)},
    }


def content_hash(obj: Any) -> str:
    """Short sha256 of a JSON-serialisable value (pod template annotations, revisions)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Mounts:
    """Volumes a workload needs, collected from its sources, models and secrets."""

    config_maps: set[str] = field(default_factory=set)
    pvcs: set[str] = field(default_factory=set)
    secrets: set[str] = field(default_factory=set)
    s3: bool = False
    """Something is read from s3:// (the S3 connection's Secret is mounted)."""

    def add_sources(self, sources: Iterable[DataSource | None]) -> Mounts:
        for source in sources:
            if source is None:
                continue
            if source.config_map:
                self.config_maps.add(source.config_map.name)
            if source.feedback and source.feedback.exclude_questions:
                self.config_maps.add(source.feedback.exclude_questions.name)
            if source.files:
                self.pvcs.add(source.files.claim_name)
            self.s3 = self.s3 or source.s3 is not None
        return self

    def add_model(self, model: ModelSource | EmbeddingModelSource | None) -> Mounts:
        claim, hub = (model.claim, model.hub) if model else (None, None)
        if claim:
            self.pvcs.add(claim.claim_name)
        if hub and hub.token_secret_ref:
            self.secrets.add(hub.token_secret_ref.name)
        self.s3 = self.s3 or bool(model and model.s3)
        return self

    def add_pvc(self, pvc: PvcPath | None) -> Mounts:
        if pvc:
            self.pvcs.add(pvc.claim_name)
        return self

    def add_secret(self, ref: SecretKeyRef | None) -> Mounts:
        if ref:
            self.secrets.add(ref.name)
        return self


def _volume_name(prefix: str, name: str) -> str:
    return f"{prefix}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def volumes_and_mounts(
    settings: OperatorSettings,
    mounts: Mounts,
    spec_config_map_name: str,
    artifacts_read_only: bool = False,
    artifacts_volume: bool = False,
) -> tuple[list[Manifest], list[Manifest]]:
    """Pod volumes and container mounts: spec, artifacts, sources, models, secrets, scratch.

    The artifacts root is the namespace's claim with the pvc store, and a scratch folder
    (emptyDir) mirroring the bucket with the s3 store, unless ``artifacts_volume`` (an
    embedded knowledge base, whose Qdrant files live on the claim with either store)."""
    on_claim = settings.artifacts_store == "pvc" or artifacts_volume
    if (settings.artifacts_store == "s3" or mounts.s3) and settings.s3_secret:
        mounts.secrets.add(settings.s3_secret)
    volumes: list[Manifest] = [
        {"name": "spec", "configMap": {"name": spec_config_map_name}},
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": settings.artifacts_pvc}}
        if on_claim
        else {"name": "artifacts", "emptyDir": {"sizeLimit": str(settings.scratch.artifacts)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": str(settings.scratch.tmp)}},
        {"name": "cache", "persistentVolumeClaim": {"claimName": settings.model_cache_claim}}
        if settings.model_cache_claim
        else {"name": "cache", "emptyDir": {"sizeLimit": str(settings.scratch.cache)}},
    ]
    container_mounts: list[Manifest] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {
            "name": "artifacts",
            "mountPath": settings.artifacts_mount,
            "readOnly": artifacts_read_only and on_claim,
        },
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/home/tailor/.cache"},
    ]
    for cm in sorted(mounts.config_maps):
        vol = _volume_name("cm", cm)
        volumes.append({"name": vol, "configMap": {"name": cm}})
        container_mounts.append(
            {"name": vol, "mountPath": f"{CONFIG_MAPS_DIR}/{cm}", "readOnly": True}
        )
    shared = {settings.artifacts_pvc} if on_claim else set()
    for pvc in sorted(mounts.pvcs - shared):
        vol = _volume_name("pvc", pvc)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": pvc, "readOnly": True}})
        container_mounts.append({"name": vol, "mountPath": f"{PVCS_DIR}/{pvc}", "readOnly": True})
    if settings.artifacts_pvc in mounts.pvcs and on_claim:
        container_mounts.append(
            {
                "name": "artifacts",
                "mountPath": f"{PVCS_DIR}/{settings.artifacts_pvc}",
                "readOnly": True,
            }
        )
    for secret in sorted(mounts.secrets):
        vol = _volume_name("secret", secret)
        volumes.append({"name": vol, "secret": {"secretName": secret, "defaultMode": 0o400}})
        container_mounts.append(
            {"name": vol, "mountPath": f"{SECRETS_DIR}/{secret}", "readOnly": True}
        )
    return volumes, container_mounts


def container_resources(
    resources: Resources, defaults: PodPolicy, gpus_per_pod: int | None = None
) -> Manifest:
    """requests/limits: CPU and memory as given (else the admin's defaults: no container
    runs unbounded), accelerators as an extended resource."""
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    cpu = resources.cpu if resources.cpu is not None else defaults.default_cpu
    memory = resources.memory if resources.memory is not None else defaults.default_memory
    if cpu is not None:
        requests["cpu"] = limits["cpu"] = str(cpu)
    if memory is not None:
        requests["memory"] = limits["memory"] = str(memory)
    gpus = resources.gpus if gpus_per_pod is None else gpus_per_pod
    if gpus:
        requests[resources.gpu_resource] = limits[resources.gpu_resource] = str(gpus)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_security_context(settings: OperatorSettings) -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


CONTAINER_SECURITY_CONTEXT: Manifest = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


class Program(StrEnum):
    """The workload programs, by module under ``tailor.workloads``: every pod and local
    process runs ``python -m tailor.workloads.<program> --spec FILE``."""

    TRAINER = "training.trainer"
    INDEXER = "knowledge.index"
    SERVER = "serving.app"
    PROMPT_TESTS = "evaluation.prompt_tests"
    RAFT_DATA = "raft.data"
    RAFT_EVALUATION = "raft.evaluate"
    EVALUATION = "evaluation.measure"


def workload_container(
    settings: OperatorSettings,
    name: str,
    module: Program,
    resources: Resources,
    volume_mounts: list[Manifest],
    ports: list[Manifest] | None = None,
    command: list[str] | None = None,
) -> Manifest:
    """The container running ``python -m tailor.workloads.<module> --spec <file>``, in the
    CUDA image when it asks for GPUs."""
    return {
        "name": name,
        "image": (settings.gpu_image or settings.image) if resources.gpus else settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command
        or ["python", "-m", f"tailor.workloads.{module}", "--spec", f"{SPEC_DIR}/{SPEC_FILE}"],
        "env": [
            {"name": "HOME", "value": "/home/tailor"},
            {"name": "HF_HOME", "value": "/home/tailor/.cache/huggingface"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "TAILOR_LOG_LEVEL", "value": "INFO"},
        ],
        "resources": container_resources(resources, settings.pods),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": volume_mounts,
        "ports": ports or [{"name": "metrics", "containerPort": settings.metrics_port}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def pod_placement(resources: Resources) -> Manifest:
    """nodeSelector, tolerations and priorityClassName of a pod, where set."""
    out: Manifest = {}
    if resources.node_selector:
        out["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        out["tolerations"] = [t.wire() for t in resources.tolerations]
    if resources.priority_class_name:
        out["priorityClassName"] = resources.priority_class_name
    return out


DNS_PEER: Manifest = {
    "namespaceSelector": {},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}


def egress_policy(pods_of: Manifest, settings: OperatorSettings) -> Manifest:
    """The egress NetworkPolicy of a Job's or Deployment's pods (the admin's
    ``workloads.networkPolicy.egress``): DNS, pods of their own namespace (a serving
    endpoint under evaluation, an in-namespace Qdrant) and the admin's rules; every other
    destination is dropped where the network plugin enforces NetworkPolicies. Owned like
    the Job or Deployment, so it goes with it."""
    meta = pods_of["metadata"]
    template_labels = pods_of["spec"]["template"]["metadata"]["labels"]
    selector = {k: v for k, v in template_labels.items() if k.startswith("tailor.dev/")}
    selector["app.kubernetes.io/component"] = template_labels["app.kubernetes.io/component"]
    dns_ports = [{"protocol": protocol, "port": 53} for protocol in ("UDP", "TCP")]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{meta['name']}-egress",
            "namespace": meta["namespace"],
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": list(meta.get("ownerReferences") or []),
        },
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [DNS_PEER], "ports": dns_ports},
                {"to": [{"podSelector": {}}]},
                *settings.network_policy.egress.allow,
            ],
        },
    }


def reporter_rbac(parent: Parent, name: str, component: str, plural: str) -> list[Manifest]:
    """A ServiceAccount allowed to get and patch the status of this one resource, no more."""
    meta = metadata(parent, name, component)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {
                    "apiGroups": ["tailor.dev"],
                    "resources": [f"{plural}/status"],
                    "resourceNames": [parent.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": parent.namespace}],
        },
    ]


def artifacts_pvc(settings: OperatorSettings, namespace: str) -> Manifest:
    """The namespace's artifacts volume claim (not owned: it outlives every resource)."""
    spec: Manifest = {
        "accessModes": [settings.artifacts_access_mode],
        "resources": {"requests": {"storage": settings.artifacts_size}},
    }
    if settings.artifacts_storage_class:
        spec["storageClassName"] = settings.artifacts_storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": settings.artifacts_pvc,
            "namespace": namespace,
            "labels": {**MANAGED_BY, "app.kubernetes.io/part-of": "tailor"},
        },
        "spec": spec,
    }


def batch_job(
    parent: Parent,
    name: str,
    component: str,
    pod_spec: Manifest,
    *,
    backoff_limit: int = 2,
    active_deadline_seconds: int | None = None,
    ttl_seconds_after_finished: int | None = None,
    suspend: bool = False,
    completions: int = 1,
    annotations: dict[str, str] | None = None,
) -> Manifest:
    """A Job whose pod fails the whole Job (no retry) on exit code 2, a user error such as
    an invalid dataset, and retries other failures up to ``backoff_limit``."""
    container = pod_spec["containers"][0]["name"]
    spec: Manifest = {
        "backoffLimit": backoff_limit,
        "suspend": suspend,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": container, "operator": "In", "values": [2]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {
                "labels": labels(parent, component),
                **({"annotations": annotations} if annotations else {}),
            },
            "spec": {"restartPolicy": "Never", **pod_spec},
        },
    }
    if completions > 1:
        spec.update(completionMode="Indexed", completions=completions, parallelism=completions)
    if active_deadline_seconds:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    if ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(parent, name, component),
        "spec": spec,
    }


@dataclass
class Workload:
    """One workload of a resource: its program and spec, and the Kubernetes children that
    run it. The Kubernetes runtime applies ``manifests``; the local runtime runs
    ``python -m tailor.workloads.<module>`` on ``run`` with the same semantics
    (``backoff_limit``, ``active_deadline_seconds``, ``suspend``)."""

    name: str
    module: Program
    run: Any
    manifests: list[Manifest]
    server: bool = False
    backoff_limit: int = 0
    active_deadline_seconds: int | None = None
    suspend: bool = False
    revision: str = ""
    extra_args: list[str] = field(default_factory=list)

    def with_args(self, *args: str) -> Workload:
        """The same workload with extra program arguments (in the pod and locally)."""
        for manifest in self.manifests:
            if manifest["kind"] in ("Job", "Deployment"):
                manifest["spec"]["template"]["spec"]["containers"][0]["command"].extend(args)
        self.extra_args.extend(args)
        return self


def batch_workload(
    parent: Parent,
    settings: OperatorSettings,
    *,
    name: str,
    component: str,
    module: Program,
    run: Any,
    resources: Resources,
    mounts: Mounts,
    rbac_name: str,
    plural: str,
    backoff_limit: int,
    artifacts_volume: bool = False,
) -> Workload:
    """A run-once workload: its spec ConfigMap, a ServiceAccount whose Role patches only
    the parent's status (``plural``), and a Job of one pod running ``module``."""
    volumes, volume_mounts = volumes_and_mounts(
        settings, mounts, name, artifacts_volume=artifacts_volume
    )
    pod = {
        "serviceAccountName": rbac_name,
        "securityContext": pod_security_context(settings),
        "containers": [workload_container(settings, component, module, resources, volume_mounts)],
        "volumes": volumes,
        **pod_placement(resources),
    }
    manifests = [
        spec_config_map(parent, name, component, run),
        *reporter_rbac(parent, rbac_name, component, plural),
        batch_job(parent, name, component, pod, backoff_limit=backoff_limit),
    ]
    return Workload(
        name=name, module=module, run=run, manifests=manifests, backoff_limit=backoff_limit
    )
