"""The Kubernetes runtime: workloads run as Jobs and Deployments.

Children are written with server-side apply under the field manager ``tailor`` and
deterministic names, so applying the same workload twice (a restarted operator, a resumed
handler) changes nothing. A Job's pod template is immutable once created; re-applying a
Job therefore only updates what Kubernetes lets change (``suspend``).
"""

from __future__ import annotations

import copy
import json
import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from tailor.api.settings import OperatorSettings
from tailor.builders.common import Manifest, Workload, artifacts_pvc, egress_policy
from tailor.runtime import rest
from tailor.runtime.base import (
    ReplicaReport,
    RunState,
    ServerState,
    _result,
    _termination_reason,
    run_state_from_job,
)
from tailor.runtime.cache import WatchCache

log = logging.getLogger("tailor.runtime.kubernetes")
FIELD_MANAGER = "tailor"
WORKLOAD_KINDS = {"Job": "batch/v1", "Deployment": "apps/v1"}
"""The kinds that start a workload's pods (applied after their prerequisites), by apiVersion."""
# Applies of a workload's prerequisites, shared by every sync thread (bounded).
_APPLY_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tailor-apply")


def load_api_client(pool_size: int | None = None) -> client.ApiClient:
    """An API client from the in-cluster service account or the local kubeconfig, with
    ``pool_size`` kept-alive connections (at least as many as the threads that use it:
    urllib3 closes a connection it has no room for, and the next request pays a new TLS
    handshake)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    if pool_size:
        configuration.connection_pool_maxsize = max(
            pool_size, configuration.connection_pool_maxsize or 0
        )
    return client.ApiClient(configuration)


class KubernetesRuntime:
    """Runs workloads as Kubernetes objects."""

    def __init__(self, settings: OperatorSettings, api_client: client.ApiClient | None = None):
        self.settings = settings
        self.api_client = api_client or load_api_client()
        self.dynamic = DynamicClient(self.api_client)
        self._prepared: set[str] = set()
        self.cache: WatchCache | None = None
        """The operator's watch cache (set by the operator): Jobs, pods and Deployments are
        read from it, and what this runtime applies is written through to it."""

    def _cached(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """``kind``/``name`` from the watch cache, else from the API server (then cached)."""
        api_version = WORKLOAD_KINDS[kind]
        if self.cache is None:
            return self.get(api_version, kind, namespace, name)
        return self.cache.get_or_fetch(
            kind, namespace, name, lambda: self.get(api_version, kind, namespace, name)
        )

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def prepare_namespace(self, namespace: str) -> None:
        if namespace in self._prepared or not self.settings.create_artifacts_pvc:
            return
        try:
            rest.request(
                self.api_client,
                "POST",
                rest.path("v1", "persistentvolumeclaims", namespace),
                artifacts_pvc(self.settings, namespace),
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._prepared.add(namespace)

    def apply(self, manifest: Manifest) -> dict[str, Any]:
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        result = resource.server_side_apply(
            body=manifest,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
            # the decoded JSON as it is: the default wraps it in ResourceInstance objects
            # first, which a burst pays for on every child of every object
            serializer=lambda _client, data: data,
        )
        body = cast(dict[str, Any], result)
        if self.cache is not None and manifest["kind"] in WORKLOAD_KINDS:
            self.cache.put(manifest["kind"], body)
        return body

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self._resource(api_version, kind).get(name=name, namespace=namespace or None)
        except NotFoundError:
            return None
        return cast(dict[str, Any], obj.to_dict())

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self._resource(api_version, kind).delete(
                name=name, namespace=namespace, propagation_policy="Background"
            )
        except NotFoundError:
            pass

    def start(self, workload: Workload) -> None:
        """Apply a workload's objects: what its pods need (ServiceAccount, Role,
        RoleBinding, ConfigMap, Service) side by side, then the Job or Deployment that
        starts the pods (a pod created before its ServiceAccount exists is refused, and
        the Job controller backs off). Side by side, a new FineTuneJob's Job exists after
        two round trips to the API server instead of five."""
        needed = [m for m in workload.manifests if m["kind"] not in WORKLOAD_KINDS]
        if self.settings.network_policy.egress.enabled:  # before the pods that it governs
            needed += [
                egress_policy(m, self.settings)
                for m in workload.manifests
                if m["kind"] in WORKLOAD_KINDS
            ]
        if len(needed) > 1:
            list(_APPLY_POOL.map(self.apply, needed))  # raises the first error
        elif needed:
            self.apply(needed[0])
        for manifest in workload.manifests:
            if manifest["kind"] in WORKLOAD_KINDS:
                manifest = with_pod_annotations(manifest, self.settings.pod_annotations)
            if manifest["kind"] == "Job":
                self._apply_job(manifest)
            elif manifest["kind"] in WORKLOAD_KINDS:
                self.apply(manifest)

    def _apply_job(self, job: Manifest) -> None:
        meta = job["metadata"]
        try:
            self.apply(job)
            return
        except ApiException as exc:
            if exc.status != 422:  # 422: the existing Job's template is immutable
                raise
        existing = self.get("batch/v1", "Job", meta["namespace"], meta["name"]) or {}
        suspend = bool(job["spec"].get("suspend"))
        if bool((existing.get("spec") or {}).get("suspend")) != suspend:
            self._resource("batch/v1", "Job").patch(
                body={"spec": {"suspend": suspend}},
                name=meta["name"],
                namespace=meta["namespace"],
                content_type="application/merge-patch+json",
            )

    def pods_of_job(self, namespace: str, name: str) -> list[dict[str, Any]]:
        pods = rest.request(
            self.api_client,
            "GET",
            rest.path("v1", "pods", namespace),
            query={"labelSelector": f"job-name={name}"},
        )
        return cast(list[dict[str, Any]], pods.get("items") or [])

    def run_state(self, namespace: str, name: str) -> RunState | None:
        job = self._cached("Job", namespace, name)
        if job is None:
            return None
        status = job.get("status") or {}
        finished = any(
            c.get("type") in ("Complete", "Failed", "FailureTarget") and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        failed_by_policy = any(
            c.get("reason") == "PodFailurePolicy" for c in status.get("conditions") or []
        )
        complete = any(
            c.get("type") == "Complete" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        # pods say why a run is queued, which user error failed it, and what a succeeded
        # workload reported (the trainer's verified artifact)
        needs_pods = (not finished and status.get("active")) or failed_by_policy or complete
        if not needs_pods:
            return run_state_from_job(job, [])
        # Pods come from the watch cache: for a running Job a late pod event only delays a
        # Queued message. A finished Job's verdict reads its pods' termination messages
        # (the trainer's artifact report, a user error's reason), and the pod and Job
        # watches are separate streams: the Job's Complete may arrive before the pod's
        # terminated state, so without the message in the cache the pods are listed.
        if self.cache is not None:
            pods = self.cache.pods_of_job(namespace, name)
            if not (failed_by_policy or complete):
                return run_state_from_job(job, pods)
            if (complete and _result(pods)) or (failed_by_policy and _termination_reason(pods)):
                return run_state_from_job(job, pods)
        return run_state_from_job(job, self.pods_of_job(namespace, name))

    def server_state(self, namespace: str, name: str) -> ServerState | None:
        deployment = self._cached("Deployment", namespace, name)
        if deployment is None:
            return None
        status = deployment.get("status") or {}
        template = deployment["spec"]["template"]["metadata"]
        return ServerState(
            replicas=int(deployment["spec"].get("replicas") or status.get("replicas") or 0),
            ready_replicas=int(status.get("readyReplicas") or 0),
            updated_replicas=int(status.get("updatedReplicas") or 0),
            endpoint=f"http://{name}.{namespace}.svc:{self.settings.serve_port}/v1",
            revision=(template.get("annotations") or {}).get("tailor.dev/revision", ""),
        )

    def stop(self, namespace: str, name: str) -> None:
        self.delete("batch/v1", "Job", namespace, name)

    def update_config(self, workload: Workload) -> None:
        """Apply the workload's ConfigMaps only: the kubelet refreshes them in the running
        pods (within its sync period, about a minute), nothing restarts."""
        for manifest in workload.manifests:
            if manifest["kind"] == "ConfigMap":
                self.apply(manifest)

    def replica_reports(self, namespace: str, name: str) -> list[ReplicaReport]:
        """Ask each ready pod of the Deployment (its metrics port, ``/adapters``), side by
        side with a short timeout: a pod that does not answer is reported as such."""
        deployment = self._cached("Deployment", namespace, name)
        if deployment is None:
            return []
        match = deployment["spec"]["selector"].get("matchLabels") or {}
        pods = (
            rest.request(
                self.api_client,
                "GET",
                rest.path("v1", "pods", namespace),
                query={"labelSelector": ",".join(f"{k}={v}" for k, v in sorted(match.items()))},
            ).get("items")
            or []
        )
        ready = [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("podIP")
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        ]
        urls = [
            (p["metadata"]["name"], f"http://{p['status']['podIP']}:{self.settings.metrics_port}")
            for p in sorted(ready, key=lambda p: p["metadata"]["name"])
        ]
        return list(_APPLY_POOL.map(lambda pair: ask_replica(*pair), urls))


def ask_replica(replica: str, base_url: str, timeout: float = 2.0) -> ReplicaReport:
    """``GET <base_url>/adapters`` of one replica."""
    try:
        with urllib.request.urlopen(f"{base_url}/adapters", timeout=timeout) as response:
            return ReplicaReport(replica, report=json.loads(response.read()))
    except (OSError, ValueError) as exc:
        return ReplicaReport(replica, error=f"not answering on its metrics port: {exc}")


def with_pod_annotations(manifest: Manifest, annotations: dict[str, str]) -> Manifest:
    """A Job or Deployment whose pod template also carries the operator's
    ``podAnnotations`` (Helm: workloads.podAnnotations); the builder's own win."""
    if not annotations or "template" not in manifest.get("spec", {}):
        return manifest
    out = copy.deepcopy(manifest)
    meta = out["spec"]["template"].setdefault("metadata", {})
    meta["annotations"] = {**annotations, **(meta.get("annotations") or {})}
    return out
