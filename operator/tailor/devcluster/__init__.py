"""A real local Kubernetes control plane for tests and the quickstart.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are built from
their Go modules (``build``), kwok simulates the nodes, including GPU nodes
(``nodes``), and ``DevCluster`` starts and stops them (``cluster``); ``kube``
holds the kubectl helpers the test suites share and ``tools`` finds the
packaged kubectl and helm. Command line: ``tailor dev cluster`` (``tailor.cli.dev``).
"""

from tailor.devcluster.cluster import ClusterError, DevCluster, default_dir
from tailor.devcluster.kube import Kube, apply_crds, wait_established
from tailor.devcluster.tools import helm_path, kubectl_path

__all__ = [
    "ClusterError",
    "DevCluster",
    "Kube",
    "apply_crds",
    "default_dir",
    "helm_path",
    "kubectl_path",
    "wait_established",
]
