"""The object store on a real S3 server (the dev cluster's SeaweedFS): folders go up with
their completion marker last and come down checked; an upload killed half-way is never an
artifact; a corrupted object, wrong keys and a missing bucket fail with the fix named. Then
the trainer through the store: checkpoints and the adapter in the bucket, and a pod killed
after a checkpoint resumes, on an empty scratch folder, from the bucket's checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailor.api.workloads import ObjectStore, Paths, TrainRun
from tailor.devcluster.s3 import S3Server
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.storage import MARKER, Store
from tailor.workloads.training.trainer import train
from tests.workloads.helpers import make_run, run_workload, store_config, tiny_model_volume

pytestmark = pytest.mark.workloads


def a_folder(root: Path, rel: str, size: int = 3 << 20) -> Path:
    folder = root / rel
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(size))
    (folder / "sub" / "config.json").write_text('{"r": 8}')
    return folder


def test_a_folder_goes_up_with_its_marker_last_and_comes_down_checked(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    store = Store(store_config(tmp_path, s3_server, bucket), tmp_path / "a")
    folder = a_folder(tmp_path / "a", "finetunejob/x/u1/model")
    marker = store.push(folder)
    assert {e["path"] for e in marker["files"]} == {"weights.bin", "sub/config.json"}
    assert store.uri("finetunejob/x/u1/model") == f"s3://{bucket}/tailor/finetunejob/x/u1/model/"
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"tailor/finetunejob/x/u1/model/{MARKER}" in keys

    other = Store(store_config(tmp_path, s3_server, bucket), tmp_path / "b")  # another pod
    pulled = other.pull("finetunejob/x/u1/model")
    assert pulled == tmp_path / "b" / "finetunejob/x/u1/model"
    assert (pulled / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()
    assert (pulled / "sub" / "config.json").read_text() == '{"r": 8}'
    stamp = (pulled / "weights.bin").stat().st_mtime_ns
    other.pull("finetunejob/x/u1/model")  # already there with the same marker: kept
    assert (pulled / "weights.bin").stat().st_mtime_ns == stamp
    assert other.complete_children("finetunejob/x/u1") == ["model"]


UPLOAD_AND_DIE = """
import sys, time
from pathlib import Path
from tailor.api.workloads import ObjectStore
from tailor.workloads.io import storage

config = ObjectStore.model_validate_json(sys.argv[1])
store = storage.Store(config, sys.argv[2])
real = store.client.upload_file
def slow(*args, **kwargs):  # each file lands, then the process dawdles before the next
    real(*args, **kwargs)
    print("uploaded", args[2], flush=True)
    time.sleep(30)
store.client.upload_file = slow
store.push(Path(sys.argv[2]) / "raftjob/r/u/data")
"""


def test_an_upload_killed_half_way_is_never_taken_as_complete(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    config = store_config(tmp_path, s3_server, bucket)
    folder = a_folder(tmp_path, "raftjob/r/u/data", size=1 << 20)
    (folder / "more.bin").write_bytes(os.urandom(1 << 20))
    process = subprocess.Popen(
        [sys.executable, "-c", UPLOAD_AND_DIE, config.model_dump_json(), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()  # the first file is in the bucket
    assert line.startswith("uploaded"), line + process.stdout.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith(line.split()[-1].rsplit("/", 1)[-1]) for k in keys)  # part is there
    store = Store(config, tmp_path / "reader")
    assert store.marker("raftjob/r/u/data") is None
    assert store.complete_children("raftjob/r/u") == []
    with pytest.raises(WorkloadError) as missing:
        store.pull("raftjob/r/u/data")
    assert missing.value.reason == "ArtifactMissing"
    assert MARKER in missing.value.message and "did not finish" in missing.value.message
    assert not (tmp_path / "reader" / "raftjob/r/u/data").exists()


def test_a_corrupted_object_fails_the_download_and_leaves_nothing(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    store = Store(store_config(tmp_path, s3_server, bucket), tmp_path / "a")
    store.push(a_folder(tmp_path / "a", "m"))
    s3_server.client().put_object(Bucket=bucket, Key="tailor/m/weights.bin", Body=b"tampered")
    reader = Store(store_config(tmp_path, s3_server, bucket), tmp_path / "b")
    with pytest.raises(WorkloadError) as corrupt:
        reader.pull("m")
    assert corrupt.value.reason == "ArtifactCorrupt" and "weights.bin" in corrupt.value.message
    assert not (tmp_path / "b" / "m").exists()
    assert list((tmp_path / "b").iterdir()) == []  # no temporary folder left either


def test_wrong_keys_and_a_missing_bucket_name_the_fix(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    wrong = Store(store_config(tmp_path, s3_server, bucket, secret="not-the-key"), tmp_path)
    with pytest.raises(WorkloadError) as refused:
        wrong.push(a_folder(tmp_path, "x"))
    assert refused.value.reason == "StoreCredentialsInvalid"
    assert "Secret s3-keys" in refused.value.message
    assert "AWS_SECRET_ACCESS_KEY" in refused.value.message
    assert "not-the-key" not in refused.value.message  # never the value

    absent = Store(store_config(tmp_path, s3_server, "no-such-bucket-here"), tmp_path)
    with pytest.raises(WorkloadError) as no_bucket:
        absent.marker("x")
    assert no_bucket.value.reason == "StoreBucketMissing"
    assert "no-such-bucket-here" in no_bucket.value.message

    (tmp_path / "secrets" / "s3-keys" / "AWS_ACCESS_KEY_ID").unlink()  # a key not in the Secret
    config = ObjectStore(
        bucket=bucket,
        endpoint=s3_server.endpoint,
        secret_name="s3-keys",
        credentials_dir=str(tmp_path / "secrets" / "s3-keys"),
    )
    with pytest.raises(WorkloadError) as missing_key:
        Store(config, tmp_path)
    assert missing_key.value.reason == "StoreCredentialsMissing"
    assert "AWS_ACCESS_KEY_ID" in missing_key.value.message


# ------------------------------------------------------------------------------ trainer


def s3_run(scratch: Path, pvcs: Path, config: ObjectStore, **training: int) -> TrainRun:
    """The tiny-Llama LoRA run of test_train.py, with its artifacts in the bucket."""

    run = make_run(scratch, pvcs, training=training, checkpoint={"everySteps": 5, "keep": 2})
    rel = "finetunejob/ftj1/u1"
    return run.model_copy(
        update={
            "output_dir": str(scratch / rel / "model"),
            "checkpoint_dir": str(scratch / rel / "checkpoints"),
            "paths": Paths(artifacts=str(scratch), pvcs=str(pvcs), store=config),
        }
    )


def test_training_publishes_to_the_bucket_and_a_killed_pod_resumes_from_it(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:

    pvcs = tiny_model_volume(tmp_path / "pvcs")
    config = store_config(tmp_path, s3_server, bucket)
    first = s3_run(tmp_path / "pod-1", pvcs, config, maxSteps=60, epochs=1)
    process = run_workload(first, tmp_path)
    store = Store(config, tmp_path / "reader")
    deadline = time.monotonic() + 300
    while not store.complete_children("finetunejob/ftj1/u1/checkpoints"):
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in the bucket within 5 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the node goes away with its scratch folder
    process.communicate(timeout=60)
    uploaded = store.complete_children("finetunejob/ftj1/u1/checkpoints")
    newest = max(int(n.removeprefix("step-")) for n in uploaded)
    assert store.marker("finetunejob/ftj1/u1/model") is None  # not published yet

    second = s3_run(tmp_path / "pod-2", pvcs, config, maxSteps=60, epochs=1)  # empty scratch
    artifact = train(second)
    assert artifact.uri == f"s3://{bucket}/tailor/finetunejob/ftj1/u1/model/"
    model = store.pull("finetunejob/ftj1/u1/model")
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["metrics"]["resumedFromStep"] >= newest
    assert manifest["metrics"]["steps"] == 60
    assert (model / "adapter_config.json").is_file()
    # the bucket keeps the newest `keep` checkpoints, as the volume does
    assert len(store.complete_children("finetunejob/ftj1/u1/checkpoints")) <= 2

    from tailor.workloads.training.artifact import verify_artifact

    verified = verify_artifact(Path(second.output_dir), Store(config, tmp_path / "pod-2"))
    assert verified["files"] == len(manifest["files"])


def test_a_restarted_dev_server_keeps_its_objects_and_still_takes_new_ones(tmp_path: Path) -> None:
    server = S3Server(tmp_path / "s3")
    try:
        server.up(buckets=("keep",))
        store = Store(store_config(tmp_path, server, "keep"), tmp_path / "a")
        store.push(a_folder(tmp_path / "a", "before", size=1 << 16))
        server.down()
        server.up()  # same ports again: SeaweedFS's master state still matches its volumes
        again = Store(store_config(tmp_path, server, "keep"), tmp_path / "b")
        assert (again.pull("before") / "sub" / "config.json").read_text() == '{"r": 8}'
        server.create_bucket("new-bucket")  # growing volumes for a new collection works
        fresh = Store(store_config(tmp_path, server, "new-bucket"), tmp_path / "a")
        fresh.push(tmp_path / "a" / "before")
        assert fresh.complete_children("") == ["before"]
    finally:
        server.down()


def test_an_s3_model_source_is_fetched_once_into_the_cache_and_loads(
    tmp_path: Path, s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tailor.api.common import ModelSource
    from tailor.workloads.io.model_loading import load_causal_lm

    model = tiny_model_volume(tmp_path / "src") / "models" / "tiny"
    creds = s3_server.credentials
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
    }
    uri = f"s3://{bucket}/models/tiny/"
    push = subprocess.run(
        [sys.executable, "-m", "tailor.cli", "store", "push", str(model), uri,
         "--endpoint", s3_server.endpoint],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert push.returncode == 0, push.stderr
    assert f"to {uri}" in push.stdout

    monkeypatch.setenv("TAILOR_MODEL_CACHE", str(tmp_path / "cache"))
    paths = Paths(
        artifacts=str(tmp_path / "scratch"), store=store_config(tmp_path, s3_server, bucket)
    )
    source = ModelSource(uri=uri)
    loaded = load_causal_lm(source, paths)
    assert loaded.config.num_hidden_layers == 2
    cached = tmp_path / "cache" / "s3" / bucket / "models" / "tiny"
    weights = cached / "model.safetensors"
    assert weights.read_bytes() == (model / "model.safetensors").read_bytes()
    stamp = weights.stat().st_ino, weights.stat().st_mtime_ns
    load_causal_lm(source, paths)  # a second pod on the same cache: nothing downloaded
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp

    with pytest.raises(WorkloadError) as missing:
        load_causal_lm(ModelSource(uri=f"s3://{bucket}/models/none/"), paths)
    assert missing.value.reason == "ModelNotFound"
    assert "tailor store push" in missing.value.message
    with pytest.raises(WorkloadError) as no_store:
        load_causal_lm(source, Paths(artifacts=str(tmp_path / "scratch")))
    assert no_store.value.reason == "ModelStoreMissing"
    assert "artifacts.s3.bucket" in no_store.value.message
    # the connection alone (a pvc store) reads s3:// models too
    connected = Paths(artifacts=str(tmp_path / "claim"), s3=paths.store)
    assert load_causal_lm(source, connected).config.num_hidden_layers == 2


def test_a_gguf_conversion_is_found_by_content_not_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh virtual environment holds the builtin GGUF at a new path: the conversion made
    for the old one is reused; a file rewritten in place (same size and time) is not."""
    from tailor.workloads.io.model_loading import materialize_gguf

    monkeypatch.setenv("TAILOR_MODEL_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "venv-a" / "m.gguf"
    second = tmp_path / "venv-b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(1024))
    converted = tmp_path / "cache" / "m-done"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    from tailor.workloads.io import model_loading

    target = model_loading._gguf_cache_dir(first)
    converted.rename(target)
    assert materialize_gguf(second) == target  # no conversion: the garbage file would fail one
    stamp = second.stat()
    second.write_bytes(b"GGUF" + bytes(1023) + b"x")
    os.utime(second, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert model_loading._gguf_cache_dir(second) != target


def test_data_by_s3_uri_one_object_a_folder_and_a_checked_tailor_dataset(
    tmp_path: Path, s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Datasets by URI: an object another tool put there, a folder of them, and one file of
    a folder Tailor uploaded (a RAFTJob's dataset), checked against its marker; a FineTuneJob
    and a KnowledgeBase read them like files of a claim."""
    from tailor.api.common import DataSource
    from tailor.api.knowledgebase import DocumentFormat
    from tailor.workloads.io.records import read_raw
    from tailor.workloads.knowledge.documents import read_documents

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    raw = s3_server.client()
    lines = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    raw.put_object(
        Bucket=bucket, Key="in/train.jsonl", Body="\n".join(json.dumps(x) for x in lines)
    )
    raw.put_object(Bucket=bucket, Key="docs/a.md", Body=b"# Alpha\n\nThe alpha document.")
    raw.put_object(Bucket=bucket, Key="docs/sub/b.txt", Body=b"The beta document.")
    raw.put_object(Bucket=bucket, Key="docs/", Body=b"")  # a console's folder placeholder
    # with a pvc store: only the connection, no artifact store
    paths = Paths(artifacts=str(tmp_path / "claim"), s3=store_config(tmp_path, s3_server, bucket))

    records = read_raw(DataSource(uri=f"s3://{bucket}/in/train.jsonl"), paths)
    assert [r for _, r in records] == lines
    docs = list(read_documents([DataSource(uri=f"s3://{bucket}/docs/")], DocumentFormat(), paths))
    assert sorted(d.source for d in docs) == [
        f"s3://{bucket}/docs/a.md",
        f"s3://{bucket}/docs/sub/b.txt",
    ]
    assert any("beta" in d.text for d in docs)
    same = list(read_documents([DataSource(uri=f"s3://{bucket}/docs")], DocumentFormat(), paths))
    assert len(same) == len(docs)  # a key with no object of its own is a folder

    # one file of a folder Tailor uploaded: checked against the marker
    store = Store(store_config(tmp_path, s3_server, bucket), tmp_path / "writer")
    data = tmp_path / "writer" / "raftjob" / "r" / "u" / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (data / "validation.jsonl").write_text(json.dumps(lines[1]) + "\n")
    store.push(data)
    uri = f"s3://{bucket}/tailor/raftjob/r/u/data/train.jsonl"
    assert [r for _, r in read_raw(DataSource(uri=uri), paths)] == [lines[0]]
    whole = DataSource(uri=f"s3://{bucket}/tailor/raftjob/r/u/data/")  # the folder, checked
    assert sorted(r["prompt"] for _, r in read_raw(whole, paths)) == ["q0", "q1"]
    with pytest.raises(WorkloadError) as too_large:  # the marker's size, before a download
        read_raw(whole.model_copy(update={"max_bytes": 10}), paths)
    assert too_large.value.reason == "SourceTooLarge"
    raw.put_object(
        Bucket=bucket, Key="tailor/raftjob/r/u/data/train.jsonl", Body=json.dumps(lines[2])
    )
    with pytest.raises(WorkloadError) as corrupt:
        read_raw(DataSource(uri=uri), paths)
    assert corrupt.value.reason == "ArtifactCorrupt"
    assert "train.jsonl" in corrupt.value.message

    with pytest.raises(WorkloadError) as nothing:
        read_raw(DataSource(uri=f"s3://{bucket}/none/"), paths)
    assert nothing.value.reason == "SourceNotFound"
    assert f"s3://{bucket}/none/" in nothing.value.message
    with pytest.raises(WorkloadError) as large:
        read_raw(DataSource(uri=f"s3://{bucket}/docs/", max_bytes=10), paths)
    assert large.value.reason == "SourceTooLarge"
    assert "maxBytes" in large.value.message
    with pytest.raises(WorkloadError) as unconnected:
        read_raw(DataSource(uri=f"s3://{bucket}/in/train.jsonl"), Paths(artifacts="/x"))
    assert unconnected.value.reason == "DataStoreMissing"
    assert "artifacts.s3.bucket" in unconnected.value.message
