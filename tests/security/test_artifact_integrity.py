"""A server loads an adapter only as its run published it (docs/security.md, "Storage").

Before, serving checked a downloaded adapter only against the upload marker beside it: who
can write the folder (anyone holding the cluster's S3 keys, or a claim shared by mistake)
could replace the weights, write a new marker and manifest, and every replica would load
them. Now the operator hands each replica the sha256 of the manifest the run recorded in
its status, and the replica checks the manifest against it and every file against the
manifest before loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import Paths, ServedAdapter
from tailor.builders.common import Parent
from tailor.builders.modeldeployment import ResolvedRefs, build_serving
from tailor.workloads.errors import WorkloadError
from tailor.workloads.serving.adapters import pull_adapter


def publish(folder: Path, weights: bytes) -> str:
    """An adapter folder as a FineTuneJob publishes it; the manifest's sha256 (what the
    operator records in the run's status)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": weights}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = {
        "files": [
            {"path": n, "sizeBytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in files.items()
        ]
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def test_a_replaced_adapter_is_refused_even_with_a_matching_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "finetunejob/pirate/u1/model"
    recorded = publish(folder, b"weights as trained")
    paths = Paths(artifacts=str(tmp_path))
    pull_adapter(ServedAdapter(name="pirate", path=str(folder), sha256=recorded), paths)

    publish(folder, b"someone else's weights")  # files and manifest rewritten consistently
    with pytest.raises(WorkloadError) as refused:
        pull_adapter(ServedAdapter(name="pirate", path=str(folder), sha256=recorded), paths)
    assert refused.value.reason == "ArtifactCorrupt"
    assert "replaced after it was published" in str(refused.value)

    (folder / "manifest.json").write_text(json.dumps({"files": []}))  # the bytes alone
    recorded = publish(folder, b"weights as trained")
    (folder / "adapter_model.safetensors").write_bytes(b"weights as tampered")
    with pytest.raises(WorkloadError, match=r"wrong size|sha256 differs"):
        pull_adapter(ServedAdapter(name="pirate", path=str(folder), sha256=recorded), paths)


def test_the_operator_hands_each_replica_the_recorded_checksum() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "adapters": [{"name": "pirate", "fineTuneJobRef": {"name": "pirate"}}],
        }
    )
    parent = Parent(kind="ModelDeployment", name="md", namespace="ns", uid="u", generation=1)
    refs = ResolvedRefs(
        adapters=[("pirate", "pvc://tailor-artifacts/finetunejob/pirate/u1/model")],
        adapter_sha256={"pirate": "ab" * 32},
    )
    run = build_serving(spec, parent, OperatorSettings(), refs).run
    assert [(a.name, a.sha256) for a in run.adapters] == [("pirate", "ab" * 32)]
