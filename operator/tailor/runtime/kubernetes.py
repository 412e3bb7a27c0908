"""The Kubernetes runtime: workloads run as Jobs and Deployments.

Children are written with server-side apply under the field manager ``tailor`` and
deterministic names, so applying the same workload twice (a restarted operator, a resumed
handler) changes nothing. A Job's pod template is immutable once created; re-applying a
Job therefore only updates what Kubernetes lets change (``suspend``).
"""

from __future__ import annotations

import logging
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from tailor.api.settings import OperatorSettings
from tailor.builders.common import Manifest, Workload, artifacts_pvc
from tailor.runtime.base import RunState, ServerState, run_state_from_job

log = logging.getLogger("tailor.runtime.kubernetes")
FIELD_MANAGER = "tailor"


def load_api_client() -> client.ApiClient:
    """An API client from the in-cluster service account or the local kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubernetesRuntime:
    """Runs workloads as Kubernetes objects."""

    def __init__(self, settings: OperatorSettings, api_client: client.ApiClient | None = None):
        self.settings = settings
        self.api_client = api_client or load_api_client()
        self.dynamic = DynamicClient(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self._prepared: set[str] = set()

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def prepare_namespace(self, namespace: str) -> None:
        if namespace in self._prepared or not self.settings.create_artifacts_pvc:
            return
        try:
            self.core.create_namespaced_persistent_volume_claim(
                namespace, artifacts_pvc(self.settings, namespace)
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
        )
        return cast(dict[str, Any], result.to_dict())

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
        for manifest in workload.manifests:
            if manifest["kind"] == "Job":
                self._apply_job(manifest)
            else:
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
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={name}")
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def run_state(self, namespace: str, name: str) -> RunState | None:
        job = self.get("batch/v1", "Job", namespace, name)
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
        pods = self.pods_of_job(namespace, name) if needs_pods else []
        return run_state_from_job(job, pods)

    def server_state(self, namespace: str, name: str) -> ServerState | None:
        deployment = self.get("apps/v1", "Deployment", namespace, name)
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
