"""Distributed fine-tuning with real processes: torchrun launches the trainer as the
training Job's pods do (one node with two processes, or two launchers on 127.0.0.1 that
rendezvous like the Indexed Job's pods), over gloo on this CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tailor.api.workloads import TrainRun
from tailor.workloads.training.checkpoints import list_checkpoints
from tailor.workloads.training.trainer import train
from tests.workloads.helpers import free_port, make_run

pytestmark = [pytest.mark.workloads, pytest.mark.usefixtures("one_thread")]

# dropout off and fp32, so one process and two give the same sums up to float order
RECIPE: dict[str, Any] = {
    "lora": {"dropout": 0.0},
    "training": {"precision": "fp32", "epochs": 2, "batchSize": 4},
}


def write_spec(run: TrainRun, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / f"spec-{time.monotonic_ns()}.json"
    spec.write_text(run.model_dump_json(by_alias=True))
    return spec


def launch(
    run: TrainRun, folder: Path, nnodes: int, nproc: int, port: int | None = None
) -> list[subprocess.Popen[bytes]]:
    """torchrun as the builder writes it: one launcher per node, static rendezvous on
    node 0's address (here 127.0.0.1), ``--node-rank`` from the completion index."""
    spec = write_spec(run, folder)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TAILOR_LOG_LEVEL": "DEBUG",
        "TAILOR_TERMINATION_LOG": str(folder / "termination-log"),
    }
    port = port or free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
                f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
    program = ["-m", "tailor.workloads.training.trainer", "--spec", str(spec)]
    return [
        subprocess.Popen(
            [*launcher, f"--node-rank={node}", *program],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for node in range(nnodes)
    ]


def finish(processes: list[subprocess.Popen[bytes]], timeout: float = 600) -> str:
    outputs = [p.communicate(timeout=timeout)[0].decode() for p in processes]
    text = "\n".join(outputs)
    assert [p.returncode for p in processes] == [0] * len(processes), text[-4000:]
    return text


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "out" / "manifest.json").read_text())


def shards(log: str) -> dict[tuple[int, int], list[int]]:
    """(step, rank) -> example indices, from the trainers' debug lines."""
    found: dict[tuple[int, int], list[int]] = {}
    for m in re.finditer(r"step (\d+) loss .*?; rank (\d+) trained on examples \[([\d, ]*)\]", log):
        found[int(m[1]), int(m[2])] = [int(i) for i in m[3].split(",") if i.strip()]
    return found


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, pvcs: Path) -> dict[str, Any]:
    """The one-process run with the same global batch (4 x 1 x 1)."""
    folder = tmp_path_factory.mktemp("single")
    train(make_run(folder, pvcs, **RECIPE))
    return manifest(folder)


@pytest.mark.parametrize(("nnodes", "nproc"), [(1, 2), (2, 1)], ids=["1x2", "2x1"])
def test_two_processes_train_one_artifact_like_one_process(
    tmp_path: Path,
    pvcs: Path,
    single: dict[str, Any],
    nnodes: int,
    nproc: int,
) -> None:
    # batch 2 per process x 2 processes: the one-process run's global batch of 4
    run = make_run(tmp_path, pvcs, **{**RECIPE, "training": {**RECIPE["training"], "batchSize": 2}})
    run = run.model_copy(update={"metrics_port": free_port()})  # one server, rank 0's
    log = finish(launch(run, tmp_path, nnodes, nproc))

    got = manifest(tmp_path)
    assert got["distributed"] == {"worldSize": 2, "strategy": "ddp", "globalBatch": 4}
    assert single["distributed"]["worldSize"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    assert got["metrics"]["steps"] == single["metrics"]["steps"]
    assert got["metrics"]["losses"] == pytest.approx(single["metrics"]["losses"], rel=2e-3)
    assert got["metrics"]["evalLoss"] == pytest.approx(single["metrics"]["evalLoss"], rel=0.02)
    assert got["metrics"]["tokens"] == single["metrics"]["tokens"]

    seen = shards(log)
    steps = got["metrics"]["steps"]
    assert {s for s, _ in seen} == set(range(1, steps + 1))
    for step in range(1, steps + 1):
        first, second = seen[step, 0], seen[step, 1]
        assert first and second and not set(first) & set(second), (step, first, second)
    # one process reports: a second progress writer would duplicate every step
    reports = (tmp_path / "progress.jsonl").read_text().splitlines()
    running = [json.loads(r)["status"] for r in reports]
    steps_reported = [r["progress"]["step"] for r in running if "artifact" not in r]
    assert sorted(steps_reported) == list(range(1, steps + 1))


def test_a_killed_rank_restarts_the_group_from_the_newest_checkpoint(
    tmp_path: Path,
    pvcs: Path,
) -> None:
    recipe = {
        **RECIPE,
        "training": {**RECIPE["training"], "batchSize": 2, "maxSteps": 60, "epochs": 1},
        "checkpoint": {"everySteps": 5, "keep": 2},
    }
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    (launcher,) = launch(make_run(interrupted, pvcs, **recipe), interrupted, 1, 2)
    checkpoints = interrupted / "checkpoints"
    deadline = time.monotonic() + 300
    while not list_checkpoints(checkpoints) and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    workers = subprocess.run(
        ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)  # one rank's node goes away
    output = launcher.communicate(timeout=120)[0].decode()
    assert launcher.returncode != 0, output[-3000:]  # the group fails; the Job restarts it
    assert not (interrupted / "out").exists()
    newest = int(list_checkpoints(checkpoints)[-1].name.removeprefix("step-"))
    assert 5 <= newest < 60

    finish(launch(make_run(interrupted, pvcs, **recipe), interrupted, 1, 2))
    finish(launch(make_run(reference, pvcs, **recipe), reference, 1, 2))
    resumed, whole = manifest(interrupted), manifest(reference)
    assert resumed["metrics"]["resumedFromStep"] == newest
    assert len(resumed["metrics"]["losses"]) == 60
    assert resumed["metrics"]["losses"] == pytest.approx(whole["metrics"]["losses"], rel=2e-3)


def test_a_checkpoint_of_two_processes_resumes_in_one(
    tmp_path: Path,
    pvcs: Path,
) -> None:
    """The global batch is kept: one process of batch 2 accumulates 2 micro-batches."""
    recipe = {
        **RECIPE,
        "training": {**RECIPE["training"], "batchSize": 2, "maxSteps": 12, "epochs": 1},
        "checkpoint": {"everySteps": 4, "keep": 1},
    }
    run = make_run(tmp_path, pvcs, **recipe)
    (launcher,) = launch(run, tmp_path, 1, 2)
    while not list_checkpoints(tmp_path / "checkpoints") and launcher.poll() is None:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # torchrun forwards it: checkpoint and stop
    launcher.communicate(timeout=120)
    step = int(list_checkpoints(tmp_path / "checkpoints")[-1].name.removeprefix("step-"))
    assert step < 12
    train(run)  # one process
    got = manifest(tmp_path)
    assert got["metrics"]["resumedFromStep"] == step
    assert got["distributed"] == {"worldSize": 1, "strategy": "none", "globalBatch": 4}
    assert len(got["metrics"]["losses"]) == 12


def test_gpus_asked_without_cuda_fail_at_once_naming_the_field(
    tmp_path: Path,
    pvcs: Path,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this node has a GPU")
    run = make_run(tmp_path, pvcs, resources={"gpus": 1})
    spec = write_spec(run, tmp_path)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tailor.workloads.training.trainer", "--spec", str(spec)],
        env={**os.environ, "TAILOR_TERMINATION_LOG": str(tmp_path / "termination-log")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert termination["reason"] == "GPUNotVisible"
    assert "spec.resources.gpus is 1" in termination["message"]
    assert "0 CUDA device" in termination["message"]
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 120  # before any data or model is loaded


def test_fsdp_full_fine_tune_matches_one_process_and_resumes(
    tmp_path: Path,
    pvcs: Path,
) -> None:
    """FSDP2 over gloo: parameters sharded per decoder layer; checkpoints and the artifact
    gathered whole by every rank and written by rank 0; SIGTERM, then a restart, resumes."""
    training = {"precision": "fp32", "epochs": 1, "maxSteps": 16, "learningRate": 1e-4}
    common: dict[str, Any] = {"method": "full", "lora": None, "checkpoint": {"everySteps": 4}}
    whole = tmp_path / "one"
    train(make_run(whole, pvcs, **common, training={**training, "batchSize": 4}))
    sharded = tmp_path / "fsdp"
    run = make_run(
        sharded, pvcs, **common, training={**training, "batchSize": 2, "strategy": "fsdp"}
    )
    (launcher,) = launch(run, sharded, 1, 2)
    while not list_checkpoints(sharded / "checkpoints") and launcher.poll() is None:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=300)[0].decode()
    assert not (sharded / "out").exists(), output[-3000:]
    step = int(list_checkpoints(sharded / "checkpoints")[-1].name.removeprefix("step-"))
    assert step < 16
    finish(launch(run, sharded, 1, 2))

    got, reference = manifest(sharded), manifest(whole)
    assert got["distributed"] == {"worldSize": 2, "strategy": "fsdp", "globalBatch": 4}
    assert got["metrics"]["resumedFromStep"] == step
    assert got["metrics"]["losses"] == pytest.approx(reference["metrics"]["losses"], rel=5e-3)
    assert got["metrics"]["evalLoss"] == pytest.approx(reference["metrics"]["evalLoss"], rel=0.02)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharded / "out")  # whole weights, loadable
    assert sum(p.numel() for p in model.parameters()) > 0
