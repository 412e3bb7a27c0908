#!/usr/bin/env bash
# The GPU checks of the trainer, in one go, for a machine with CUDA GPUs and the workloads
# extra installed (`make venv`, or inside the -cuda workloads image with PY=python):
#   1. bf16 LoRA, 1 GPU vs all visible GPUs (DDP over NCCL): tokens/s, scaling, MFU, eval loss
#   2. QLoRA (4-bit NF4 base, bitsandbytes), 1 GPU vs all
#   3. the workload tests that only run with CUDA (qlora, bf16 autocast)
# Prints the tables; exit status non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -lt 1 ]; then
  echo "no CUDA GPU visible: these checks need one" >&2
  exit 2
fi
PROCS=1
[ "$GPUS" -gt 1 ] && PROCS="1,$GPUS"
BATCH=$((8 * GPUS))
"$PY" -c 'import torch; print("GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
echo "== bf16 LoRA, DDP over $PROCS GPU(s)"
"$PY" tests/bench/bench_ddp.py --device cuda --procs "$PROCS" --precision bf16 --global-batch "$BATCH" --examples 800
echo "== QLoRA, DDP over $PROCS GPU(s)"
"$PY" tests/bench/bench_ddp.py --device cuda --procs "$PROCS" --method qlora --global-batch "$BATCH" --examples 800
echo "== workload tests"
"$PY" -m pytest -q tests/workloads/test_train.py tests/workloads/test_train_distributed.py
