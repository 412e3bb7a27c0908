"""Benchmark of the s3 artifact store against the S3 client alone (not a test).

On the dev S3 server (SeaweedFS, started here on 127.0.0.1), a SmolLM2-size artifact
(full weights: one 270 MB safetensors file, plus tokenizer and config files) is

- uploaded with ``Store.push`` (sha256 of every file, parallel parts, the completion
  marker last) and, as the baseline, with boto3's ``upload_file`` of each file alone
  (default transfer settings, no checksums, no marker);
- downloaded with ``Store.pull`` (into a temporary folder, every file checked against the
  marker, renamed into place) and with boto3's ``download_file`` of each file.

Passes alternate (baseline, store, baseline, ...) and the median of each is kept. The goal
(issue 17) is a ratio of at least 0.8 both ways.

Then the model cache: the builtin SmolLM2-135M (its safetensors folder) is pushed to the
bucket and loaded as a ``uri: s3://...`` base model by a "first replica" (empty cache: the
folder is downloaded and checked) and a "second replica" sharing that cache (one GET of
the marker), each timed for the fetch alone and for fetch + ``from_pretrained``. Goal:
the second replica's start >= 10x faster.

    .venv/bin/python tests/bench/bench_storage.py [--megabytes 270] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tailor.api.common import ModelSource
from tailor.api.workloads import ObjectStore, Paths
from tailor.devcluster.cluster import state_root
from tailor.devcluster.s3 import S3Server
from tailor.workloads.io.model_loading import load_causal_lm, materialize_gguf
from tailor.workloads.io.storage import Store, pull_model


def make_artifact(folder: Path, megabytes: int) -> int:
    folder.mkdir(parents=True)
    with (folder / "model.safetensors").open("wb") as fh:
        for _ in range(megabytes):
            fh.write(os.urandom(1 << 20))
    (folder / "tokenizer.json").write_bytes(os.urandom(2 << 20))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        (folder / name).write_text('{"model_type": "llama"}')
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=270)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    server = S3Server(state_root() / "s3-bench")
    server.up(buckets=("bench",))
    work = Path(tempfile.mkdtemp(prefix="tailor-bench-storage-"))
    try:
        size = make_artifact(work / "src" / "model", args.megabytes)
        creds_dir = work / "keys"
        creds_dir.mkdir()
        (creds_dir / "AWS_ACCESS_KEY_ID").write_text(server.credentials.access_key_id)
        (creds_dir / "AWS_SECRET_ACCESS_KEY").write_text(server.credentials.secret_access_key)
        config = ObjectStore(
            bucket="bench",
            prefix="bench",
            endpoint=server.endpoint,
            secret_name="keys",
            credentials_dir=str(creds_dir),
        )
        client = server.client()
        files = sorted((work / "src" / "model").iterdir())
        times: dict[str, list[float]] = {
            k: [] for k in ("raw up", "store up", "raw down", "store down")
        }
        for i in range(args.repeat):
            started = time.perf_counter()
            for path in files:
                client.upload_file(str(path), "bench", f"raw/{i}/model/{path.name}")
            times["raw up"].append(time.perf_counter() - started)

            store = Store(config, work / "src")
            started = time.perf_counter()
            store.push(work / "src" / "model", f"run{i}/model")
            times["store up"].append(time.perf_counter() - started)

            target = work / f"raw-down-{i}"
            target.mkdir()
            started = time.perf_counter()
            for path in files:
                client.download_file("bench", f"raw/{i}/model/{path.name}", str(target / path.name))
            times["raw down"].append(time.perf_counter() - started)

            reader = Store(config, work / f"pod-{i}")
            started = time.perf_counter()
            reader.pull(f"run{i}/model")
            times["store down"].append(time.perf_counter() - started)
            shutil.rmtree(target)
            shutil.rmtree(work / f"pod-{i}")

        mb = size / 1e6
        print(
            f"artifact: {mb:.0f} MB in {len(files)} files; SeaweedFS on 127.0.0.1; {args.repeat} passes, medians"
        )
        print(f"{'copy':<12} {'seconds':>8} {'MB/s':>8}")
        median = {k: statistics.median(v) for k, v in times.items()}
        for key, seconds in median.items():
            print(f"{key:<12} {seconds:>8.2f} {mb / seconds:>8.0f}")
        for way in ("up", "down"):
            ratio = median[f"raw {way}"] / median[f"store {way}"]
            print(f"store / raw speed, {way}: {ratio:.2f} (goal >= 0.8)")
        model_cache(config, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.down()


def model_cache(config: ObjectStore, work: Path, repeat: int) -> None:
    from tailor.workloads.io.sources import builtin_path

    folder = materialize_gguf(Path(builtin_path("smollm2-135m-instruct")))
    Store(config.model_copy(update={"prefix": ""}), folder.parent).push(folder, "models/smollm2")
    source = ModelSource(uri="s3://bench/models/smollm2/")
    paths = Paths(artifacts=str(work / "scratch"), store=config)
    times: dict[str, list[float]] = {
        k: [] for k in ("first fetch", "second fetch", "first start", "second start")
    }
    for i in range(repeat):
        os.environ["TAILOR_MODEL_CACHE"] = str(work / f"cache-{i}")
        for replica in ("first", "second"):
            started = time.perf_counter()
            pull_model(("bench", "models/smollm2"), paths)
            times[f"{replica} fetch"].append(time.perf_counter() - started)
        shutil.rmtree(work / f"cache-{i}")
        for replica in ("first", "second"):
            started = time.perf_counter()
            load_causal_lm(source, paths)
            times[f"{replica} start"].append(time.perf_counter() - started)
        shutil.rmtree(work / f"cache-{i}")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
    print(f"model cache: SmolLM2-135M, {size:.0f} MB as s3://bench/models/smollm2/; medians")
    median = {k: statistics.median(v) for k, v in times.items()}
    for key, seconds in median.items():
        print(f"{key:<13} {seconds:>8.3f} s")
    for step in ("fetch", "start"):
        ratio = median[f"first {step}"] / median[f"second {step}"]
        print(f"second replica / first, {step}: {ratio:.1f}x faster (goal >= 10x)")


if __name__ == "__main__":
    main()
