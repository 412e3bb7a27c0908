"""Plain JSON requests to the API server over the kubernetes client's connection pool.

The operator reads and writes objects as dicts, so it has no use for the client's
generated API classes: since kubernetes 37 they are pydantic models, and importing
``CoreV1Api`` alone loads about 250 of them and wraps some 400 methods in
``validate_call``, 79 MiB of the operator's resident memory (measured: 71 MiB after the
operator's imports, 150 MiB once ``CoreV1Api`` was touched). These helpers go through the
same ``ApiClient`` (its configuration, authentication, keep-alive pool and request
counter), build only the path, and raise the client's own ``ApiException`` on an error
status, so callers handle failures as before.
"""

from __future__ import annotations

import json
from typing import Any, cast
from urllib.parse import quote

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"


def path(api_version: str, plural: str, namespace: str | None = None, name: str = "") -> str:
    """``/api/v1/...`` for the core group, ``/apis/group/version/...`` for the others."""
    out = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespace:
        out += f"/namespaces/{quote(namespace, safe='')}"
    out += f"/{plural}"
    if name:
        out += f"/{quote(name, safe='')}"
    return out


def request(
    api_client: ApiClient,
    method: str,
    resource_path: str,
    body: Any = None,
    query: dict[str, str] | None = None,
    content_type: str = "application/json",
    accept: str = "application/json",
) -> dict[str, Any]:
    """One request; the decoded JSON response, or ``ApiException`` (with ``status``)."""
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = content_type
    serialized = api_client.param_serialize(
        method,
        resource_path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api_client.call_api(*serialized)
    data = response.read()  # type: ignore[no-untyped-call]
    text = data.decode("utf-8") if data else ""
    if not 200 <= response.status <= 299:
        raise ApiException.from_response(http_resp=response, body=text, data=None)
    return cast(dict[str, Any], json.loads(text)) if text else {}
