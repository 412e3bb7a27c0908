"""Secrets a user names are used only when the Secret says so.

A user who may create a Tailor object in a namespace may not be allowed to read its Secrets;
without this check they could name any of them (``auth.apiKeySecretRef``, a Qdrant
``apiKeySecretRef``, a teacher's, a Hub token) and have a pod send it to a host they choose.
So every ``SecretKeyRef`` in a spec must name a Secret of the namespace that carries the
annotation ``tailor.dev/usable-by``, a comma-separated list of what may use it:

- ``*``: any Tailor object of the namespace;
- ``<Kind>``: any object of that kind (``ModelDeployment``; a RAFTJob's training runs as the
  FineTuneJob ``<raft>-ft``);
- ``<Kind>/<name>``: that object.

The operator checks before any pod of the object starts (each sync, in
:meth:`Operator.sync <tailor.controllers.context.Operator.sync>`); until the Secret exists
and allows it, the object waits in phase Pending, reason ``SecretNotUsable``, with the field
and the annotation to add. It reads the Secret's metadata only (a PartialObjectMetadata
GET: the values never reach the operator). The Secrets the cluster admin names in the
Helm values (the S3 connection's) are the admin's and need no annotation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tailor.api.base import TailorModel, walk
from tailor.api.common import SecretKeyRef
from tailor.api.settings import OperatorSettings

USABLE_BY = "tailor.dev/usable-by"


def secret_refs(spec: Any) -> Iterator[tuple[str, SecretKeyRef]]:
    """Every SecretKeyRef in a spec, with its field path (``spec.auth.apiKeySecretRef``)."""
    return ((path, ref) for path, ref in walk(spec) if isinstance(ref, SecretKeyRef))


def allows(annotation: str | None, kind: str, name: str) -> bool:
    """Whether a Secret's ``tailor.dev/usable-by`` lets ``kind``/``name`` use it."""
    entries = {entry.strip().lower() for entry in (annotation or "").split(",")}
    return bool(entries & {"*", kind.lower(), f"{kind}/{name}".lower()})


def unusable_secret(
    body: dict[str, Any], spec: TailorModel, settings: OperatorSettings, metadata: Any
) -> str | None:
    """Why the object (``body``, its parsed ``spec``) may not use a Secret it names (the
    field, the fix), or None. ``metadata(namespace, name)`` returns a Secret's metadata,
    None when it does not exist."""
    kind, meta = body["kind"], body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    admin = {settings.s3_secret} - {None}
    for path, ref in secret_refs(spec):
        if ref.name in admin:
            continue
        found = metadata(namespace, ref.name)
        if found is None:
            return (
                f"{path}.name: Secret {ref.name} does not exist in namespace {namespace}; "
                f"create it with the annotation {USABLE_BY}: {kind}/{name}"
            )
        annotation = (found.get("annotations") or {}).get(USABLE_BY)
        if not allows(annotation, kind, name):
            return (
                f"{path}.name: Secret {ref.name} does not allow {kind} {name} to use it; "
                f"Tailor uses only Secrets that opt in: `kubectl annotate secret {ref.name} "
                f"-n {namespace} {USABLE_BY}={kind}/{name}` (or {kind}, or * for any Tailor "
                "object of the namespace)"
            )
    return None
