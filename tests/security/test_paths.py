"""Paths a tenant names stay under their root (docs/security.md, "Paths").

The CRDs refuse '..' and absolute forms first (the bad-manifest corpus: cases 076-079, run
against the API server by tests/cluster/test_bad_manifests.py). These tests are the second
line, on the pod: they build what the CRD cannot see (a symbolic link on the tenant's own
claim, a marker entry or an object key in the bucket) or skip the CRD (``model_construct``,
as a spec written by hand to the pod would), and check the workload refuses it, naming it,
with nothing read or written outside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.api.common import ConfigMapKey, DataSource, PvcFiles, SecretKeyRef
from tailor.api.workloads import Paths
from tailor.devcluster.s3 import S3Server
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.sources import read_secret, source_listing
from tailor.workloads.io.storage import MARKER, Store
from tests.workloads.helpers import store_config

SECRET = "the-service-account-token"


@pytest.fixture
def pod(tmp_path: Path) -> Paths:
    """A workload pod's mounts: a tenant's claim, a ConfigMap, and a Secret beside them."""
    (tmp_path / "secrets" / "s3-keys").mkdir(parents=True)
    (tmp_path / "secrets" / "s3-keys" / "token").write_text(SECRET)
    (tmp_path / "pvcs" / "docs").mkdir(parents=True)
    (tmp_path / "pvcs" / "docs" / "guide.md").write_text("# Guide")
    (tmp_path / "configmaps" / "kube-root-ca.crt").mkdir(parents=True)
    (tmp_path / "configmaps" / "kube-root-ca.crt" / "ca.crt").write_text("CERT")
    return Paths(
        artifacts=str(tmp_path / "artifacts"),
        pvcs=str(tmp_path / "pvcs"),
        config_maps=str(tmp_path / "configmaps"),
        secrets=str(tmp_path / "secrets"),
    )


def refused(call: object, *args: object) -> WorkloadError:
    with pytest.raises(WorkloadError) as error:
        call(*args)  # type: ignore[operator]
    assert error.value.reason == "PathOutsideRoot", error.value
    assert "leads outside" in error.value.message
    return error.value


def test_a_symbolic_link_on_the_tenants_claim_does_not_reach_a_mounted_secret(
    pod: Paths, tmp_path: Path
) -> None:
    claim = tmp_path / "pvcs" / "docs"
    (claim / "notes.md").symlink_to(tmp_path / "secrets" / "s3-keys" / "token")
    source = DataSource(pvc=PvcFiles(claim_name="docs", glob="*.md"))
    error = refused(source_listing, source, pod)
    assert "notes.md" in error.message and SECRET not in error.message
    (claim / "notes.md").unlink()
    (claim / "up").symlink_to(tmp_path / "secrets")  # a linked folder, entered by path
    refused(source_listing, DataSource(pvc=PvcFiles(claim_name="docs", path="up")), pod)
    (claim / "up").unlink()
    root, _, files = source_listing(source, pod)  # the claim's own files still index
    assert [f.name for f in files] == ["guide.md"] and root == claim


@pytest.mark.parametrize(
    "source",
    [
        DataSource.model_construct(config_map=ConfigMapKey.model_construct(name="kube-root-ca.crt",
                                                           key="../../secrets/s3-keys/token")),
        DataSource.model_construct(pvc=PvcFiles.model_construct(claim_name="docs", path="../../secrets",
                                                glob="**/*")),
        DataSource.model_construct(pvc=PvcFiles.model_construct(claim_name="docs", path="",
                                                glob="../../secrets/*/*")),
    ],
    ids=["configmap-key", "pvc-path", "pvc-glob"],
)  # fmt: skip
def test_a_spec_that_skipped_the_crd_still_cannot_climb_out(source: DataSource, pod: Paths) -> None:
    refused(source_listing, source, pod)


def test_a_secret_key_reads_only_its_own_secret(pod: Paths) -> None:
    assert read_secret(SecretKeyRef(name="s3-keys", key="token"), pod) == SECRET
    refused(read_secret, SecretKeyRef.model_construct(name="x", key="../s3-keys/token"), pod)


def test_a_marker_entry_never_writes_outside_the_target(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """Whoever can write the bucket writes a marker whose entry climbs out: the download
    refuses it before writing a byte. (An object key with '..' is refused the same way,
    ``inside`` in pull_data; SeaweedFS itself refuses such keys, AWS S3 stores them.)"""
    config = store_config(tmp_path, s3_server, bucket)
    store = Store(config, tmp_path / "artifacts")
    folder = tmp_path / "artifacts" / "finetunejob" / "a" / "uid"
    folder.mkdir(parents=True)
    (folder / "adapter.safetensors").write_bytes(b"weights")
    store.push(folder)
    marker = store.marker("finetunejob/a/uid")
    assert marker is not None
    marker["files"].append({"path": "../../../../escaped.txt", "sha256": "0", "sizeBytes": 1})
    store.client.put_object(Bucket=bucket, Key=f"{store.key('finetunejob/a/uid')}/{MARKER}",
                            Body=json.dumps(marker).encode())  # fmt: skip
    target = tmp_path / "elsewhere" / "deep" / "pulled"
    refused(store.pull, "finetunejob/a/uid", target)
    assert not list((tmp_path / "elsewhere").rglob("*.txt"))
