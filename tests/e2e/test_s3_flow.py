"""The s3 artifact store through the operator (local runtime) and a real S3 server
(SeaweedFS): a LoRA run publishes its adapter and checkpoints to the bucket, and a
ModelDeployment serves that adapter downloaded from the bucket into its own scratch
folder; the keys reach the workloads only as a mounted Secret."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailor.devcluster.kube import Kube
from tailor.devcluster.s3 import S3Server
from tailor.workloads.storage import MARKER
from tests.e2e.conftest import chat, run_local_operator, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.workloads]


@pytest.fixture
def s3_operator(kube: Kube, tmp_path: Path, s3_server: S3Server, bucket: str) -> Iterator[Path]:
    yield from run_local_operator(
        kube,
        tmp_path,
        {
            "TAILOR_ARTIFACTS_STORE": "s3",
            "TAILOR_S3_BUCKET": bucket,
            "TAILOR_S3_PREFIX": "team",
            "TAILOR_S3_ENDPOINT": s3_server.endpoint,
            "TAILOR_S3_SECRET": "s3-keys",
        },
    )


def test_an_adapter_goes_through_the_bucket_from_training_to_serving(
    kube: Kube, namespace: str, s3_server: S3Server, bucket: str, s3_operator: Path
) -> None:
    ns = namespace
    keys = s3_server.credentials
    kube.kubectl(
        "create", "secret", "generic", "s3-keys", "-n", ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={keys.access_key_id}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={keys.secret_access_key}",
    )  # fmt: skip
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Say the code word ({i})."},
                {"role": "assistant", "content": "The code word is tangerine."},
            ]
        }
        for i in range(16)
    ]
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
    assert uri == f"s3://{bucket}/team/finetunejob/s3-lora/{uid}/model"
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"team/finetunejob/s3-lora/{uid}/")
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
