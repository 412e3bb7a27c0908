"""The s3 artifact store through the operator (local runtime) and a real S3 server
(SeaweedFS): a LoRA run publishes its adapter and checkpoints to the bucket, and a
ModelDeployment serves that adapter downloaded from the bucket into its own scratch
folder; the keys reach the workloads only as a mounted Secret. Then a pvc cluster with an
S3 connection: one run trains on data by s3:// URI and picks the s3 store for itself, and
a ModelDeployment of that cluster serves its adapter fetched into the model cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailor.devcluster.kube import Kube
from tailor.devcluster.s3 import S3Server
from tailor.workloads.io.model_loading import materialize_gguf
from tailor.workloads.io.sources import builtin_path
from tailor.workloads.io.storage import MARKER
from tests.e2e.helpers import chat, run_local_operator, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]


@pytest.fixture
def s3_operator(
    kube: Kube, namespace: str, tmp_path: Path, s3_server: S3Server, bucket: str
) -> Iterator[Path]:
    yield from run_local_operator(
        kube,
        namespace,
        tmp_path,
        {
            "TAILOR_ARTIFACTS_STORE": "s3",
            "TAILOR_S3_BUCKET": bucket,
            "TAILOR_S3_PREFIX": "team",
            "TAILOR_S3_ENDPOINT": s3_server.endpoint,
            "TAILOR_S3_SECRET": "s3-keys",
        },
    )


@pytest.fixture
def connected_operator(
    kube: Kube, namespace: str, tmp_path: Path, s3_server: S3Server, bucket: str
) -> Iterator[Path]:
    # A model cache of its own, to see the fetched adapter land there; SmolLM2's GGUF file
    # is converted once per machine (36 s), so that conversion is linked in from the shared one.
    converted = materialize_gguf(builtin_path("smollm2-135m-instruct"))
    (tmp_path / "model-cache").mkdir()
    (tmp_path / "model-cache" / converted.name).symlink_to(converted)
    yield from run_local_operator(
        kube,
        namespace,
        tmp_path,
        {
            "TAILOR_ARTIFACTS_STORE": "pvc",
            "TAILOR_S3_BUCKET": bucket,
            "TAILOR_S3_PREFIX": "team",
            "TAILOR_S3_ENDPOINT": s3_server.endpoint,
            "TAILOR_S3_SECRET": "s3-keys",
            "TAILOR_MODEL_CACHE": str(tmp_path / "model-cache"),
        },
    )


def code_word_chats() -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Say the code word ({i})."},
                {"role": "assistant", "content": "The code word is tangerine."},
            ]
        }
        for i in range(16)
    ]


def s3_keys_secret(kube: Kube, ns: str, server: S3Server) -> None:
    keys = server.credentials
    kube.kubectl(
        "create", "secret", "generic", "s3-keys", "-n", ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={keys.access_key_id}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={keys.secret_access_key}",
    )  # fmt: skip


def test_one_run_picks_the_s3_store_and_reads_its_data_by_uri_on_a_pvc_cluster(
    kube: Kube,
    namespace: str,
    s3_server: S3Server,
    bucket: str,
    connected_operator: Path,
    tmp_path: Path,
) -> None:
    ns = namespace
    s3_keys_secret(kube, ns, s3_server)
    body = "\n".join(json.dumps(c) for c in code_word_chats())
    # in the namespace's own folder: a spec may read S3 only there (and where the admin shares)
    s3_server.client().put_object(
        Bucket=bucket, Key=f"team/{ns}/in/chats.jsonl", Body=body.encode()
    )
    ftj = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "own-store"},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "method": "lora",
            "dataset": {"train": {"uri": f"s3://{bucket}/team/{ns}/in/chats.jsonl"}},
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
            "training": {"maxSteps": 2, "batchSize": 4, "maxSeqLength": 64},
            "output": {"store": "s3"},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    md = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "pvc-serve"},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "adapters": [{"name": "code", "fineTuneJobRef": {"name": "own-store"}}],
            "cache": {"enabled": False},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    kube.apply([ftj, md], "-n", ns)
    done = wait_phase(kube, ns, "ftj", "own-store", {"Succeeded"}, timeout=600)
    uid = done["metadata"]["uid"]
    assert (
        done["status"]["artifact"]["uri"]
        == f"s3://{bucket}/team/{ns}/finetunejob/own-store/{uid}/model"
    )
    assert not list((connected_operator / ns / "volumes").glob("*/finetunejob/own-store"))
    ready = wait_phase(kube, ns, "md", "pvc-serve", {"Ready"}, timeout=600)
    cached = tmp_path / "model-cache" / "s3" / bucket / "team" / ns / "finetunejob" / "own-store"
    assert (cached / uid / "model" / MARKER).is_file()  # fetched into the cache, checked
    answer = chat(
        ready["status"]["endpoint"],
        {
            "model": "pvc-serve/code",
            "messages": [{"role": "user", "content": "Say the code word (99)."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert answer["choices"][0]["message"]["content"].strip()


def test_an_adapter_goes_through_the_bucket_from_training_to_serving(
    kube: Kube, namespace: str, s3_server: S3Server, bucket: str, s3_operator: Path
) -> None:
    ns = namespace
    keys = s3_server.credentials
    s3_keys_secret(kube, ns, s3_server)
    chats = code_word_chats()
    ftj = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "s3-lora"},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "method": "lora",
            "dataset": {"train": {"inline": chats}},
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
            "training": {"maxSteps": 4, "batchSize": 4, "maxSeqLength": 64},
            "checkpoint": {"everySteps": 2, "keep": 1},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    md = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "s3-serve"},
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "adapters": [{"name": "code", "fineTuneJobRef": {"name": "s3-lora"}}],
            "cache": {"enabled": False},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    kube.apply([ftj, md], "-n", ns)

    done = wait_phase(kube, ns, "ftj", "s3-lora", {"Succeeded"}, timeout=600)
    uri = done["status"]["artifact"]["uri"]
    uid = done["metadata"]["uid"]
    assert uri == f"s3://{bucket}/team/{ns}/finetunejob/s3-lora/{uid}/model"
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"team/{ns}/finetunejob/s3-lora/{uid}/")
    keys_in_bucket = {o["Key"].split(f"{uid}/", 1)[1] for o in listed["Contents"]}
    assert f"model/{MARKER}" in keys_in_bucket and "model/adapter_config.json" in keys_in_bucket
    assert any(k.startswith("checkpoints/step-") for k in keys_in_bucket)
    # the claim's folder holds no artifact: the trainer worked in its own scratch folder
    assert not list((s3_operator / ns / "volumes").glob("*/finetunejob/s3-lora/*/model"))

    ready = wait_phase(kube, ns, "md", "s3-serve", {"Ready"}, timeout=600)
    served = list(
        (s3_operator / ns / "runs").glob(
            f"*serve*/scratch/artifacts/finetunejob/s3-lora/{uid}/model"
        )
    )
    assert served and (served[0] / MARKER).is_file()  # downloaded, checked against the marker
    assert (served[0] / "adapter_config.json").is_file()
    body = {
        "model": "s3-serve/code",
        "messages": [{"role": "user", "content": "Say the code word (99)."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    answer = chat(ready["status"]["endpoint"], body)
    assert answer["choices"][0]["message"]["content"].strip()

    # no key value in the spec files the workloads read, nor in the objects' status
    for spec_file in (s3_operator / ns / "runs").glob("*/spec.json"):
        text = spec_file.read_text()
        assert keys.secret_access_key not in text and keys.access_key_id not in text
    assert keys.secret_access_key not in json.dumps(kube.get_json("ftj,md", "-n", ns))
