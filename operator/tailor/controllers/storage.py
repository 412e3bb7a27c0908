"""What a spec may read from S3: its own namespace's prefix and the admin's shared folders.

Every workload of a namespace reads and writes the cluster's bucket under
``<prefix>/<namespace>/`` (:func:`tailor.builders.common.object_store`). A spec can also name
``s3://`` URIs (a base or embedding model, a data source), which pods read with the S3
connection the admin configured: with one identity for the whole cluster, such a URI could
name another namespace's datasets, evaluations or weights. So an ``s3://`` URI in a spec
must lie under the namespace's own prefix or under a folder the admin shares with every
namespace (Helm: ``artifacts.s3.sharedReadable``); anything else is refused before any pod,
naming the field. With credentials per namespace (``artifacts.s3.secretName`` names a Secret
in each namespace), the bucket's policy enforces the same line (docs/security.md).
"""

from __future__ import annotations

from tailor.api.base import TailorModel, walk
from tailor.api.settings import OperatorSettings
from tailor.builders.common import namespace_prefix


def refused_storage(spec: TailorModel, settings: OperatorSettings, namespace: str) -> str | None:
    """Why an ``s3://`` URI of a spec may not be read from ``namespace``, or None."""
    for path, part in walk(spec):
        uri = getattr(part, "uri", None)
        if isinstance(uri, str):
            outside = unreadable(uri, settings, namespace)
            if outside:
                return f"{path}.uri: {outside}"
    return None


def unreadable(uri: str, settings: OperatorSettings, namespace: str) -> str | None:
    """Why ``namespace`` may not read ``uri`` (an ``s3://`` URI outside its folder and the
    admin's shared folders), or None. Also applied to the artifact URIs the operator reads
    from a run's status before serving them: whoever may write that status subresource
    must not be able to point a deployment at another namespace's weights."""
    own = namespace_prefix(settings, namespace)
    if not uri.startswith("s3://") or not own:
        return None  # no S3 connection: the builders refuse any s3:// URI themselves
    if any(uri.startswith(folder) for folder in [own, *settings.s3_shared_readable]):
        return None
    shared = ", ".join(settings.s3_shared_readable) or "none"
    return (
        f"{uri} is outside this namespace's folder {own} and the folders the cluster admin "
        f"shares (artifacts.s3.sharedReadable: {shared}); copy it under {own} (tailor store "
        "push) or ask the admin to share it"
    )
