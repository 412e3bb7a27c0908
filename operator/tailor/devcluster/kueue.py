"""Kueue (kubernetes-sigs/kueue, Apache-2.0) for the dev cluster: GPU quotas and queues.

Built from the Go module proxy like the control plane (``build.KUEUE``) and run as a local
process against the dev cluster's API server. In a real cluster Kueue runs as a pod behind
Services; here the same objects point at this machine:

- its webhooks (Job and Kueue's own kinds) and CRD conversion are Service references to
  ``kueue-webhook-service`` in ``kueue-system``; that Service has no selector, and an
  EndpointSlice names this host's address and the process's port. The API server runs with
  ``--enable-aggregator-routing``, so it dials endpoints, not a cluster IP (there is no
  kube-proxy).
- the visibility API (``visibility.kueue.x-k8s.io``: a pending workload's position in its
  queue) is an APIService on the same kind of Service, served by the process.
- Kueue's internal certificate management creates the webhook CA and certificate in a
  Secret and injects the CA bundle; this module copies the Secret's files into the folder
  Kueue reads them from (in a pod, a mounted Secret).

``Kueue(cluster).up()`` starts it (or finds it running) and ``gpu_queue`` creates a
ResourceFlavor for the fake GPU nodes, a ClusterQueue with a GPU quota and LocalQueues.
``down()`` stops it and deletes its webhook configurations and APIServices, so Jobs are not
refused by a webhook nobody serves and namespaces still delete.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tailor.devcluster import build
from tailor.devcluster.cluster import (
    ClusterError,
    DevCluster,
    _alive,
    _free_port,
    _terminate,
)
from tailor.devcluster.tools import kubectl_path

NAMESPACE = "kueue-system"
WEBHOOK_SERVICE = "kueue-webhook-service"
VISIBILITY_SERVICE = "kueue-visibility-server"
SECRET = "kueue-webhook-server-cert"
CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")
"""The CRDs whose conversion webhook Kueue's certificate management injects a CA into (its
own list; the module also has a patch for resourceflavors that upstream leaves unused)."""
VISIBILITY_VERSIONS = ("v1beta1", "v1beta2")
FRAMEWORKS = ("batch/job",)
"""The integrations Tailor uses: its training Jobs (Indexed Jobs for several nodes)."""


class Kueue:
    """The Kueue process of one dev cluster; its state lives in ``<cluster>/kueue``."""

    def __init__(self, cluster: DevCluster) -> None:
        self.cluster = cluster
        self.dir = cluster.dir / "kueue"
        self.pid_file = self.dir / "kueue.pid"
        self.log_file = self.dir / "kueue.log"
        self.state_file = self.dir / "state.json"

    # ----- public API -------------------------------------------------------

    def up(self, timeout: float = 120.0) -> None:
        """Build if needed, install the CRDs and webhooks, start, wait until it admits."""
        binary = build.ensure_binaries(components=(build.KUEUE,))["kueue"]
        manifests = binary.parent / "config"
        if self.running() and self._ready():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        ports = self._ports()
        address = host_address()
        config = self.dir / "config.yaml"
        config.write_text(yaml.safe_dump(self._configuration(ports)))
        self._apply(self._objects(manifests, ports, address))
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                [
                    str(binary),
                    f"--config={config}",
                    f"--kubeconfig={self.cluster.kubeconfig}",
                ],
                cwd=self.dir,  # the visibility server's certificate folder is relative
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout
        self._mount_certificates(deadline)
        while not self._ready():
            if process.poll() is not None:
                raise ClusterError(f"kueue exited ({process.returncode}); see {self.log_file}")
            if time.monotonic() > deadline:
                raise ClusterError(f"kueue not ready after {timeout:.0f}s; see {self.log_file}")
            time.sleep(0.5)

    def down(self, grace: float = 10.0) -> None:
        """Stop the process and remove the webhooks that would refuse Jobs without it."""
        pid = self._pid()
        if pid is not None:
            _terminate(pid, grace)
        self.pid_file.unlink(missing_ok=True)
        if not self.cluster.is_healthy():
            return
        # what the API server would call on a stopped process: Job webhooks refuse Jobs,
        # and an unavailable APIService keeps namespaces from being deleted
        paths = [
            f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/"
            f"kueue-{kind}-webhook-configuration"
            for kind in ("mutating", "validating")
        ] + [
            f"/apis/apiregistration.k8s.io/v1/apiservices/{version}.visibility.kueue.x-k8s.io"
            for version in VISIBILITY_VERSIONS
        ]
        for path in paths:
            try:
                self.cluster.api(path, "DELETE")
            except urllib.error.HTTPError as error:
                if error.code != 404:
                    raise

    def running(self) -> bool:
        return self._pid() is not None

    def gpu_queue(
        self,
        cluster_queue: str,
        gpus: int,
        namespaces: list[str],
        local_queue: str = "gpus",
        preempt_lower_priority: bool = False,
    ) -> None:
        """A ResourceFlavor ``gpu``, ClusterQueue ``cluster_queue`` with ``gpus`` GPUs (and
        ample CPU and memory), and a LocalQueue ``local_queue`` in each namespace. With
        ``preempt_lower_priority`` a waiting workload preempts lower-priority ones of the
        ClusterQueue."""
        objects: list[dict[str, Any]] = [
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
             "metadata": {"name": "gpu"}},
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ClusterQueue",
                "metadata": {"name": cluster_queue},
                "spec": {
                    "namespaceSelector": {},
                    **({"preemption": {"withinClusterQueue": "LowerPriority"}}
                       if preempt_lower_priority else {}),
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                            "flavors": [
                                {
                                    "name": "gpu",
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": 1000},
                                        {"name": "memory", "nominalQuota": "4Ti"},
                                        {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
        ]  # fmt: skip
        for namespace in namespaces:
            objects.append(
                {
                    "apiVersion": "kueue.x-k8s.io/v1beta2",
                    "kind": "LocalQueue",
                    "metadata": {"name": local_queue, "namespace": namespace},
                    "spec": {"clusterQueue": cluster_queue},
                }
            )
        self._apply(objects)

    # ----- internals --------------------------------------------------------

    def _configuration(self, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
            "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
            "webhook": {"port": ports["webhook"], "certDir": str(self.dir / "webhook-certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {
                "enable": True,
                "webhookServiceName": WEBHOOK_SERVICE,
                "webhookSecretName": SECRET,
            },
            "visibilityServer": {"bindPort": ports["visibility"]},
            "integrations": {"frameworks": list(FRAMEWORKS)},
        }

    def _objects(
        self, manifests: Path, ports: dict[str, int], address: str
    ) -> list[dict[str, Any]]:
        """Kueue's CRDs, webhooks and APIService, pointed at this host's process."""
        webhook = {"namespace": NAMESPACE, "name": WEBHOOK_SERVICE, "port": ports["webhook"]}
        objects: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": SECRET, "namespace": NAMESPACE}},
            *_service(WEBHOOK_SERVICE, ports["webhook"], address),
            *_service(VISIBILITY_SERVICE, ports["visibility"], address),
        ]  # fmt: skip
        converted = {f"{plural}.kueue.x-k8s.io" for plural in CONVERTED}
        for path in sorted((manifests / "crd" / "bases").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            if crd["metadata"]["name"] in converted:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": {"service": webhook | {"path": "/convert"}},
                        "conversionReviewVersions": ["v1"],
                    },
                }
            objects.append(crd)
        for doc in yaml.safe_load_all((manifests / "webhooks.yaml").read_text()):
            if not doc:
                continue
            hooks = []
            for hook in doc["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                # Kueue's own kinds and batch/v1 Jobs; the other frameworks are not enabled
                if (
                    "-kueue-x-k8s-io-" in path
                    or path.startswith("/mutate-batch-v1-job")
                    or (path.startswith("/validate-batch-v1-job"))
                ):
                    hook["clientConfig"] = {"service": webhook | {"path": path}}
                    hooks.append(hook)
            doc["webhooks"] = hooks
            doc["metadata"] = {"name": "kueue-" + doc["metadata"]["name"]}
            objects.append(doc)
        for version in VISIBILITY_VERSIONS:
            objects.append(
                {
                    "apiVersion": "apiregistration.k8s.io/v1",
                    "kind": "APIService",
                    "metadata": {"name": f"{version}.visibility.kueue.x-k8s.io"},
                    "spec": {
                        "group": "visibility.kueue.x-k8s.io",
                        "version": version,
                        "groupPriorityMinimum": 100,
                        "versionPriority": 100,
                        # Kueue serves it with a self-signed certificate, as upstream does
                        "insecureSkipTLSVerify": True,
                        "service": {
                            "namespace": NAMESPACE,
                            "name": VISIBILITY_SERVICE,
                            "port": ports["visibility"],
                        },
                    },
                }
            )
        return objects

    def _apply(self, objects: list[dict[str, Any]]) -> None:
        result = subprocess.run(
            [
                str(kubectl_path()),
                f"--kubeconfig={self.cluster.kubeconfig}",
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=tailor-devcluster",
                "-f",
                "-",
            ],
            input=yaml.safe_dump_all(objects),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"applying Kueue's objects: {result.stderr.strip()}")

    def _mount_certificates(self, deadline: float) -> None:
        """Copy the Secret Kueue fills into its certificate folder (a pod mounts it)."""
        path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}"
        folder = self.dir / "webhook-certs"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        while True:
            data = (self.cluster.api(path) or {}).get("data") or {}
            if all(data.get(k) for k in ("tls.crt", "tls.key", "ca.crt")):
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"kueue did not create its certificates; see {self.log_file}")
            time.sleep(0.5)
        for key in ("tls.crt", "tls.key", "ca.crt"):
            target = folder / key
            target.write_bytes(base64.b64decode(data[key]))
            target.chmod(0o600)

    def _ready(self) -> bool:
        """Healthy, and the API server reaches its webhooks and its visibility API."""
        state = self._state()
        if not state or not self.running():
            return False
        try:
            url = f"http://127.0.0.1:{state['ports']['health']}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status != 200:
                    return False
            self.cluster.api("/apis/visibility.kueue.x-k8s.io/v1beta2")
        except (OSError, urllib.error.URLError, ssl.SSLError):
            return False
        return True

    def _ports(self) -> dict[str, int]:
        state = self._state()
        if state:
            return dict(state["ports"])
        taken: set[int] = set()
        ports = {}
        for name in ("webhook", "visibility", "health", "metrics"):
            ports[name] = _free_port(taken)
            taken.add(ports[name])
        self.state_file.write_text(json.dumps({"ports": ports}))
        return ports

    def _state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return None

    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None


def _service(name: str, port: int, address: str) -> list[dict[str, Any]]:
    """A Service without selector and the EndpointSlice that points it at ``address``."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"ports": [{"name": "https", "port": port, "targetPort": port}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        },
    ]


def host_address() -> str:
    """This host's IPv4 address other than loopback (an EndpointSlice refuses 127.0.0.1)."""
    candidates: list[str] = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a route
            candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    for address in candidates:
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    raise ClusterError(
        "Kueue needs an IPv4 address of this host other than loopback for its webhook "
        "endpoints (EndpointSlices refuse 127.0.0.1); none was found"
    )
