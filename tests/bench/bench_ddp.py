"""Scaling of the trainer under torch.distributed: the same FineTuneJob recipe (builtin
SmolLM2-135M-Instruct, LoRA r=16 on q/k/v/o, APIBench Torch Hub chats, one epoch) with the
same global batch, trained by 1 and by N processes launched with ``torchrun --standalone``
exactly as the training Job launches them. Not a test: run it by hand and read the table.

On CPU (gloo) the machine's cores are split between the processes (``OMP_NUM_THREADS`` =
cores / processes), so the table shows what DDP costs or gains at equal hardware; on CUDA
(NCCL) each process gets one GPU and the table adds model FLOPs utilisation (6 x parameters
x tokens/s over the GPUs' peak; pass ``--peak-tflops``, default 989 for H100/H200 bf16 dense).

    .venv/bin/python tests/bench/bench_ddp.py                          # CPU, 1 vs 2 processes
    .venv/bin/python tests/bench/bench_ddp.py --device cuda --procs 1,8 --method qlora

Goal: final eval loss within 2% of one process; on GPUs scaling efficiency >= 90%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_train import APIBENCH, LORA, apibench_chats, write_jsonl  # noqa: E402


def spec_for(args: argparse.Namespace, work: Path, procs: int) -> dict[str, Any]:
    name = f"ddp-{procs}"
    return {
        "spec": {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "method": args.method,
            "lora": LORA,
            "dataset": {
                "train": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
                "validation": {"pvc": {"claimName": "data", "path": "eval.jsonl"}},
            },
            "training": {
                "epochs": 1,
                "batchSize": args.global_batch // procs,
                "learningRate": 1e-3,
                "maxSeqLength": 512,
                "warmupRatio": 0.03,
                "precision": args.precision,
                "seed": 42,
            },
            "checkpoint": {"everySteps": 100000},
            "resources": {"gpus": procs if args.device == "cuda" else 0},
        },
        "outputDir": str(work / name / "out"),
        "checkpointDir": str(work / name / "checkpoints"),
        "paths": {"artifacts": str(work), "pvcs": str(work / "pvcs")},
        "reporter": {"kind": "none"},
        "owner": {"kind": "FineTuneJob", "namespace": "bench", "name": name},
    }


def run(args: argparse.Namespace, work: Path, procs: int) -> dict[str, Any]:
    spec = work / f"spec-{procs}.json"
    spec.write_text(json.dumps(spec_for(args, work, procs)))
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         f"--nproc-per-node={procs}", "-m", "tailor.workloads.training.trainer", "--spec", str(spec)],
        env=env, check=True, cwd=ROOT,
    )  # fmt: skip
    manifest = json.loads((work / f"ddp-{procs}" / "out" / "manifest.json").read_text())
    return {"wall": time.monotonic() - started, **manifest["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--procs", default="1,2", help="process counts to compare")
    parser.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--eval-examples", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    counts = [int(p) for p in args.procs.split(",")]
    if any(args.global_batch % p for p in counts):
        parser.error(f"--global-batch {args.global_batch} must divide by every count {counts}")
    work = Path(tempfile.mkdtemp(prefix="tailor-bench-ddp-"))
    write_jsonl(work / "pvcs" / "data" / "train.jsonl",
                apibench_chats(APIBENCH / "torchhub_train.json", args.examples))  # fmt: skip
    write_jsonl(work / "pvcs" / "data" / "eval.jsonl",
                apibench_chats(APIBENCH / "torchhub_eval.json", args.eval_examples))  # fmt: skip
    results = {p: run(args, work, p) for p in counts}

    params = 134_515_008  # SmolLM2-135M
    one = results[counts[0]]
    print(
        f"\n{args.method}, {args.examples} examples, global batch {args.global_batch}, "
        f"{args.device} ({len(os.sched_getaffinity(0))} cores), one epoch"
    )
    header = f"{'procs':>5s} {'tokens/s':>9s} {'speedup':>8s} {'efficiency':>10s} "
    header += f"{'eval loss':>9s} {'vs 1':>7s} {'train s':>8s}"
    print(header + (f" {'MFU':>6s}" if args.device == "cuda" else ""))
    for p, r in results.items():
        speedup = r["tokensPerSecond"] / one["tokensPerSecond"]
        line = (
            f"{p:5d} {r['tokensPerSecond']:9.1f} {speedup:8.2f} {speedup / p * counts[0]:10.0%} "
            f"{r['evalLoss']:9.4f} {(r['evalLoss'] / one['evalLoss'] - 1):+7.2%} "
            f"{r['trainSeconds']:8.1f}"
        )
        if args.device == "cuda":
            line += f" {6 * params * r['tokensPerSecond'] / (p * args.peak_tflops * 1e12):6.1%}"
        print(line)
    (work / "table.json").write_text(json.dumps({"args": vars(args), "results": results}))
    print(f"results under {work}")


if __name__ == "__main__":
    main()
