"""Models from the Hub only at a pinned commit, where the cluster admin asks for it (Helm:
workloads.huggingface.requirePinnedRevisions).

A Hugging Face source names a branch by default (``main``): the weights a run trains on, or
a replica serves, are whatever the branch holds when its pod starts, so two replicas, or a
run and its resumed pod, can load different weights, and whoever controls the repository
controls what runs. With the setting on, every Hub source in a spec must name a 40-digit
commit (``revision:`` or ``hf://org/name@<commit>``); anything else is refused before any
pod, naming the field.
"""

from __future__ import annotations

import re

from tailor.api.base import TailorModel, walk

COMMIT = re.compile(r"[0-9a-f]{40}")


def unpinned_revision(spec: TailorModel) -> str | None:
    """Why a Hub source of a spec is not pinned to a commit, or None."""
    for path, part in walk(spec):
        hub = getattr(part, "hub", None)  # a model source (ModelSource, an embedding model)
        if hub is None or COMMIT.fullmatch(hub.revision):
            continue
        field = (
            f"{path}.huggingface.revision" if getattr(part, "huggingface", None) else f"{path}.uri"
        )
        return (
            f"{field}: {hub.repo} at {hub.revision!r} is not a commit, and the cluster admin "
            "requires models pinned to one (workloads.huggingface.requirePinnedRevisions): "
            "name the 40-digit commit sha (the repository's 'History' on the Hub, or "
            f"`huggingface-cli repo-info {hub.repo}`)"
        )
    return None
