"""The cluster the command line talks to: the current kubeconfig context's."""

from __future__ import annotations

from typing import Any


def client() -> Any:
    """An API client for the current kubeconfig context."""
    from kubernetes import config
    from kubernetes.client import ApiClient

    config.load_kube_config()  # type: ignore[no-untyped-call]
    return ApiClient()
