"""Where a spec may send its pods: the cluster admin's egress policy (Helm: workloads.egress).

A URL in a spec (a DataSource's ``url``, a RAFT teacher's ``url``, a KnowledgeBase's
``store.qdrant.url``) makes a pod connect there, and RAG can read the answer back to the
user. The workloads' URL guard refuses private, loopback and link-local addresses unless
the spec says ``allowPrivateAddresses`` (and plain http unless ``allowInsecureHttp``); those
two switches are the admin's to grant, not the user's: a spec that sets one the policy does
not allow is refused before any pod, naming the field and the Helm value. With
``allowedHosts`` set, every URL's host must be one of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from tailor.api.base import TailorModel, walk
from tailor.api.settings import EgressPolicy


def url_holders(spec: Any) -> Iterator[tuple[str, BaseModel, str]]:
    """Every part of a spec with a ``url`` set: (its field path, the part, the url)."""
    for path, part in walk(spec):
        url = getattr(part, "url", None)
        if isinstance(url, str):
            yield path, part, url


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(
        host == entry.lower() or (entry.startswith(".") and host.endswith(entry.lower()))
        for entry in allowed
    )


def refused_egress(spec: TailorModel, policy: EgressPolicy) -> str | None:
    """Why a spec's URLs are not allowed (the field, the Helm value), or None."""
    for path, holder, url in url_holders(spec):
        for switch, granted in (
            ("allow_private_addresses", policy.allow_private_addresses),
            ("allow_insecure_http", policy.allow_insecure_http),
        ):
            if getattr(holder, switch, False) and not granted:
                field = type(holder).model_fields[switch].alias or switch
                return (
                    f"{path}.{field}: the cluster admin does not allow it here (Helm: "
                    f"workloads.egress.{field}); remove it and use a public https URL"
                )
        host = urlsplit(url).hostname or ""
        if policy.allowed_hosts and not host_allowed(host, policy.allowed_hosts):
            return (
                f"{path}.url: host {host} is not among the hosts the cluster admin allows "
                f"(workloads.egress.allowedHosts: {', '.join(policy.allowed_hosts)})"
            )
    return None
