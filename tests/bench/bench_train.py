"""Benchmark of the fine-tuning workload against TRL's SFTTrainer + peft, measured in the
same process on the same model (builtin SmolLM2-135M-Instruct), data and hyperparameters,
on equal terms. Not a test: run it by hand and read the table.

Data: chat examples built from APIBench's Torch Hub split (``torchhub_train.json``:
the instruction as the user turn, the gold ``api_call`` as the assistant answer), variable
length; validation from ``torchhub_eval.json``. Both trainers get the same tokenized
examples (SmolLM2's chat template, loss on assistant tokens only) in the same order (Tailor
shuffles as the Trainer does for a seed), LoRA r=16 on q/k/v/o, batch 8, one epoch, cosine
schedule.

Equal terms: the same dtype (``--precision bf16``: both load the frozen base in bf16, keep
the LoRA weights in float32 and run under bf16 autocast), no padding on either side (Tailor
packs each batch's examples into rows with position ids restarting per example; the
baseline uses TRL's padding-free batches, the whole batch flattened into one row the same
way), and the same timed span: from the start of the training loop to the end of the last
step, collation of every batch included, evaluation and checkpoints outside it (Tailor's
``trainSeconds``; a TrainerCallback's ``on_train_begin`` to ``on_train_end`` for TRL).
What the baseline does not get is Tailor's own CPU choice of float32 attention inside
bf16 autocast (see ``register_fp32_attention``): it runs the model's default SDPA, as a
TRL user would. ``--ablation`` adds Tailor without packing, TRL with padded batches, and
TRL given Tailor's float32 attention (to show how much of the gap that choice is).

Throughput is training tokens (real, unpadded) over that span. Evaluation loss is computed
afterwards by one shared function on both adapters, over the same validation examples, in
float32.

    .venv/bin/python tests/bench/bench_train.py --examples 200 --eval-examples 40 --rounds 2

Target: Tailor at least 1.3x the baseline's tokens/s at equal or better eval loss.
"""

from __future__ import annotations

import os

# Both trainers run in this process under the same OpenMP settings; passive waiting keeps
# busy neighbours on a shared machine from stalling every parallel region.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tailor.api.workloads import TrainRun
from tailor.workloads.io.model_loading import load_tokenizer, resolve_model_dir
from tailor.workloads.training.data import IGNORE_INDEX, Example, collate, load_datasets
from tailor.workloads.training.trainer import batch_loss, train

ROOT = Path(__file__).resolve().parents[2]
from tailor.data import apibench_dir  # noqa: E402

APIBENCH = apibench_dir()
INSTRUCTION = re.compile(
    r"'Instruction':\s*(.*?),\s*'Output':|###Instruction:\s*(.*?)###Output:", re.S
)
BASELINE = "TRL SFTTrainer (padding-free)"
LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def apibench_chats(path: Path, limit: int) -> list[dict[str, Any]]:
    """Chat records: the instruction as the user turn, the gold api_call as the answer."""
    chats = []
    for line in path.read_text().splitlines()[:limit]:
        row = json.loads(line)
        match = INSTRUCTION.search(row["code"])
        if not match:
            continue
        question = (match.group(1) or match.group(2)).strip().strip("\"'").strip()
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": row["api_call"]},
                ]
            }
        )
    return chats


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run(work: Path, out: Path, args: argparse.Namespace, packing: bool) -> TrainRun:
    """The Tailor run: data on the ``data`` volume under ``work``, results under ``out``."""
    name = f"tailor-{'packed' if packing else 'padded'}"
    return TrainRun.model_validate(
        {
            "spec": {
                "baseModel": {"builtin": "smollm2-135m-instruct"},
                "method": "lora",
                "lora": LORA,
                "dataset": {
                    "train": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
                    "validation": {"pvc": {"claimName": "data", "path": "eval.jsonl"}},
                },
                "training": {
                    "epochs": args.epochs,
                    "batchSize": args.batch_size,
                    "learningRate": args.learning_rate,
                    "maxSeqLength": 512,
                    "warmupRatio": 0.03,
                    "scheduler": "cosine",
                    "precision": args.precision,
                    "packing": packing,
                    "seed": args.seed,
                },
                "checkpoint": {"everySteps": 100000},
            },
            "outputDir": str(out / name / "out"),
            "checkpointDir": str(out / name / "checkpoints"),
            "paths": {"artifacts": str(work), "pvcs": str(work / "pvcs")},
            "reporter": {"kind": "none"},
            "owner": {"kind": "FineTuneJob", "namespace": "bench", "name": name},
        }
    )


def run_tailor(work: Path, out: Path, args: argparse.Namespace, packing: bool) -> dict[str, Any]:
    run = make_run(work, out, args, packing)
    train(run)
    manifest = json.loads((Path(run.output_dir) / "manifest.json").read_text())
    metrics = manifest["metrics"]
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(), run.output_dir)
    return {"tokens": metrics["tokens"], "seconds": metrics["trainSeconds"], "model": model}


def load_base(dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    from tailor.api.common import ModelSource
    from tailor.api.workloads import Paths

    name, _ = resolve_model_dir(ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts="/"))
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)


class Span(TrainerCallback):  # type: ignore[misc]
    """The span of the training steps, from the start of the loop (before the first
    batch is collated) to the end of the last step: the span Tailor's ``trainSeconds``
    covers (collation included; evaluation and checkpoints outside)."""

    seconds = 0.0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self.started


def run_trl(
    out: Path,
    args: argparse.Namespace,
    train_set: list[Example],
    tokenizer: Any,
    padding_free: bool,
    fp32_attention: bool = False,
) -> dict[str, Any]:
    """TRL's SFTTrainer as its documentation sets it up for LoRA SFT on pre-tokenized
    data: the frozen base in the same dtype as Tailor's (bf16, LoRA weights float32,
    autocast), loss on the answer tokens only (a ``labels`` column), and with
    ``padding_free`` each batch flattened into one row with position ids restarting per
    example (TRL's padding-free batches; the model masks every example off from the
    others), else batches right-padded to their longest example."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    dataset = Dataset.from_list(
        [
            # TRL's labels are not shifted (the model shifts them); Tailor's targets are
            {"input_ids": e.input_ids, "labels": [IGNORE_INDEX, *e.targets[:-1]]}
            for e in train_set
        ]
    )
    config = SFTConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        report_to="none",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        padding_free=padding_free,
        max_length=None if padding_free else 512,  # the examples are already at most 512
        model_init_kwargs=None,
        dataset_num_proc=None,
    )
    span = Span()
    model = load_base(dtype)
    if fp32_attention:  # the ablation: Tailor's CPU attention choice given to the baseline
        from tailor.workloads.training.model import register_fp32_attention

        model.set_attn_implementation(register_fp32_attention())
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["targetModules"],
            task_type="CAUSAL_LM",
        ),
        callbacks=[span],
    )
    trainer.train()
    return {
        "tokens": sum(len(e) for e in train_set) * args.epochs,
        "seconds": span.seconds,
        "model": trainer.model,
    }


@torch.no_grad()
def eval_loss(model: Any, examples: list[Example], pad_id: int) -> float:
    """Mean loss per answer token over the validation examples, in float32."""
    model = model.float().eval()
    total, count = 0.0, 0
    fp32 = torch.autocast("cpu", enabled=False)
    for start in range(0, len(examples), 8):
        batch = collate(examples[start : start + 8], pad_id, packing=False, max_length=512)
        total += batch_loss(model, batch, fp32).item()
        count += batch.num_targets
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--eval-examples", type=int, default=40)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=1, help="2 runs each trainer twice (ABBA)")
    parser.add_argument("--ablation", action="store_true", help="also Tailor without packing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_jsonl(
        work / "pvcs" / "data" / "train.jsonl",
        apibench_chats(APIBENCH / "torchhub_train.json", args.examples),
    )
    write_jsonl(
        work / "pvcs" / "data" / "eval.jsonl",
        apibench_chats(APIBENCH / "torchhub_eval.json", args.eval_examples),
    )
    run = make_run(work, work, args, packing=True)
    tokenizer = load_tokenizer(run.spec.base_model, run.paths)
    data = load_datasets(run.spec.dataset, run.paths, tokenizer, 512, seed=42)
    lengths = [len(e) for e in data.train]
    print(
        f"data: {len(data.train)} train examples ({min(lengths)}-{max(lengths)} tokens, "
        f"mean {sum(lengths) / len(lengths):.0f}), {len(data.validation)} validation; "
        f"torch {torch.__version__}, {args.threads} threads, {args.precision}",
        flush=True,
    )

    base_loss = eval_loss(load_base(), data.validation, tokenizer.pad_token_id)
    trainers = {
        "tailor (packing)": lambda out: run_tailor(work, out, args, packing=True),
        BASELINE: lambda out: run_trl(out, args, data.train, tokenizer, padding_free=True),
    }
    if args.ablation:
        trainers["tailor (no packing)"] = lambda out: run_tailor(work, out, args, packing=False)
        trainers["TRL SFTTrainer (padded)"] = lambda out: run_trl(
            out, args, data.train, tokenizer, padding_free=False
        )
        trainers["TRL (padding-free, fp32 attn)"] = lambda out: run_trl(
            out, args, data.train, tokenizer, padding_free=True, fp32_attention=True
        )
    names = list(trainers)
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    # Rounds alternate the order (A B, B A, ...) so a machine that gets busier or quieter
    # during the run favours neither; Tailor goes first in round one and pays any warm-up.
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            result = trainers[name](work / f"round{round_}")
            loss = eval_loss(result["model"], data.validation, tokenizer.pad_token_id)
            rate = result["tokens"] / result["seconds"]
            rows[name].append((rate, loss))
            print(f"round {round_ + 1}: {name}: {rate:.1f} tokens/s, eval loss {loss:.4f}")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    base_rate = mean([rate for rate, _ in rows[BASELINE]])
    print(f"\n{'trainer':30s} {'tokens/s':>9s} {'ratio':>6s} {'eval loss':>9s} {'perplexity':>10s}")
    print(
        f"{'base model (no training)':30s} {'':>9s} {'':>6s} {base_loss:9.4f} "
        f"{math.exp(base_loss):10.2f}"
    )
    for name in names:
        rate = mean([rate for rate, _ in rows[name]])
        loss = mean([loss for _, loss in rows[name]])
        print(f"{name:30s} {rate:9.1f} {rate / base_rate:5.2f}x {loss:9.4f} {math.exp(loss):10.2f}")
    steps = math.ceil(len(data.train) / args.batch_size) * args.epochs
    print(f"\n{steps:.0f} optimizer steps per run, {args.rounds} round(s), means over rounds")


if __name__ == "__main__":
    main()
