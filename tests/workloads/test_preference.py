"""Preference tuning (``FineTuneJob.spec.objective: kto | dpo``) in the trainer's loop: it
moves a held-out behaviour of the builtin model, resumes with its reference, and continues
a named adapter against itself."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from tailor.api.common import ModelSource
from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer
from tailor.workloads.training.checkpoints import list_checkpoints
from tailor.workloads.training.data import tokenize_records, validate_record
from tailor.workloads.training.preference import sequence_logps
from tailor.workloads.training.trainer import StopRequested, train
from tests.workloads.helpers import SOUNDS, make_run

pytestmark = [pytest.mark.workloads, pytest.mark.usefixtures("one_thread")]

SMOLLM2 = ModelSource(builtin="smollm2-135m-instruct")
BAD = "I cannot answer that."
TRAINED, HELD_OUT = SOUNDS[:7], SOUNDS[7:]


def prompt(animal: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"What does a {animal} say?"},
    ]


def good(animal: str, sound: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"The {animal} says {sound}."}]


def refusal() -> list[dict[str, str]]:
    return [{"role": "assistant", "content": BAD}]


def records(objective: str, animals: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """dpo pairs, or kto examples (each good answer desirable, each refusal not)."""
    if objective == "dpo":
        return [
            {"prompt": prompt(a), "chosen": good(a, s), "rejected": refusal()} for a, s in animals
        ]
    return [
        record
        for a, s in animals
        for record in (
            {"prompt": prompt(a), "completion": good(a, s), "label": True},
            {"prompt": prompt(a), "completion": refusal(), "label": False},
        )
    ]


def trainer_log(artifact: Path) -> list[str]:
    """The artifact's per-step log lines."""
    return (artifact / "trainer_log.jsonl").read_text().splitlines()


def margins(model: Any, tokenizer: Any) -> list[float]:
    """log p(good answer) - log p(refusal) on the held-out animals."""
    chosen = [
        validate_record("held-out", {"prompt": prompt(a), "completion": good(a, s)}, "completion")
        for a, s in HELD_OUT
    ]
    rejected = [
        validate_record("held-out", {"prompt": prompt(a), "completion": refusal()}, "completion")
        for a, _ in HELD_OUT
    ]
    first, _ = tokenize_records(chosen, tokenizer, 128)
    second, _ = tokenize_records(rejected, tokenizer, 128)
    with torch.no_grad():
        a = sequence_logps(model, first, tokenizer.pad_token_id, 128, nullcontext())
        b = sequence_logps(model, second, tokenizer.pad_token_id, 128, nullcontext())
    return (a - b).tolist()


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_tuning_moves_a_held_out_preference_of_the_builtin_model(
    objective: str, tmp_path: Path
) -> None:
    """Trained to prefer "The <animal> says <sound>." over a refusal on seven animals,
    the builtin model prefers it on three animals it never saw, by more than before."""
    from peft import PeftModel

    run = make_run(
        tmp_path,
        Path("/nonexistent"),
        baseModel={"builtin": "smollm2-135m-instruct"},
        objective=objective,
        preference={"beta": 0.5},
        dataset={"train": {"inline": records(objective, TRAINED)}},
        # four steps: dpo's 7 pairs in batches of 4, kto's 14 examples in batches of 7
        training={
            "epochs": 2,
            "batchSize": 4 if objective == "dpo" else 7,
            "learningRate": 3e-3,
            "warmupRatio": 0,
        },
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
    )
    train(run)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    losses = [json.loads(line)["loss"] for line in trainer_log(tmp_path / "out")]
    tokenizer = load_tokenizer(SMOLLM2, run.paths)
    base = load_causal_lm(SMOLLM2, run.paths).eval()
    before = margins(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    after = margins(tuned, tokenizer)
    assert manifest["metrics"]["steps"] > 0
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after, losses)


def test_a_preference_run_resumes_with_its_reference_and_continues_a_named_adapter(
    tmp_path: Path, pvcs: Path
) -> None:
    """Stopped after its first step, a dpo run resumes from the checkpoint with the
    reference log-probabilities it computed before training (the model has moved since)
    and ends where an uninterrupted run ends. A second run continues that adapter
    (preference.reference): at its first step the model is its own reference, so the loss
    is exactly log 2."""
    data = {"train": {"inline": records("dpo", SOUNDS)}}
    common: dict[str, Any] = {
        "objective": "dpo",
        "dataset": data,
        "training": {"epochs": 2, "batchSize": 2, "learningRate": 1e-2},
        "checkpoint": {"everySteps": 100},
        "lora": {"dropout": 0.0},  # the first step's policy is then exactly the reference
    }
    for name in ("whole", "stopped", "more"):
        (tmp_path / name).mkdir()
    whole = make_run(tmp_path / "whole", pvcs, **common)
    train(whole)
    interrupted = make_run(tmp_path / "stopped", pvcs, **common)
    stop = StopRequested()
    stop.requested = True
    with pytest.raises(SystemExit):
        train(interrupted, stop)
    assert [p.name for p in list_checkpoints(tmp_path / "stopped" / "checkpoints")] == [
        "step-00000001"
    ]
    train(interrupted)

    resumed = json.loads((tmp_path / "stopped" / "out" / "manifest.json").read_text())
    reference = json.loads((tmp_path / "whole" / "out" / "manifest.json").read_text())
    assert resumed["metrics"]["resumedFromStep"] == 1
    assert resumed["metrics"]["trainLoss"] == pytest.approx(
        reference["metrics"]["trainLoss"], rel=1e-3
    )

    # the adapter a deployment serves, improved in place: it is its own reference
    claim = pvcs / "runs"
    claim.mkdir(exist_ok=True)
    (tmp_path / "whole" / "out").rename(claim / "dpo-adapter")
    more = make_run(
        tmp_path / "more",
        pvcs,
        **{**common, "preference": {"reference": {"uri": "pvc://runs/dpo-adapter"}}},
    )
    train(more)
    first = json.loads(trainer_log(tmp_path / "more" / "out")[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_bad_preference_records_are_named_before_any_model_loads(tmp_path: Path) -> None:
    """A record without its rejected answer, or records of another objective, fail with
    the record's place and the fix."""
    from tailor.workloads.errors import WorkloadError
    from tailor.workloads.training.data import read_datasets
    from tailor.workloads.training.preference import check_objective

    broken = records("dpo", SOUNDS[:3])
    del broken[1]["rejected"]
    run = make_run(
        tmp_path, Path("/nonexistent"), objective="dpo", dataset={"train": {"inline": broken}}
    )
    with pytest.raises(WorkloadError, match=r"inline\[1\]: expected \{prompt, chosen, rejected\}"):
        read_datasets(run.spec.dataset, run.paths, 0)
    kto = make_run(
        tmp_path, Path("/nonexistent"), dataset={"train": {"inline": records("kto", SOUNDS[:2])}}
    )
    fmt = read_datasets(kto.spec.dataset, kto.paths, 0).format
    with pytest.raises(WorkloadError, match=r"set spec\.objective: kto"):
        check_objective("sft", fmt)
    with pytest.raises(WorkloadError, match=r"spec\.objective is dpo"):
        check_objective("dpo", fmt)


def test_a_kto_run_reads_a_deployments_captured_feedback_and_reports_what_it_used(
    tmp_path: Path, pvcs: Path
) -> None:
    """Captured exchanges and ratings (as the gateway writes them) train a kto run through
    a feedback DataSource; the run reports what it used and skipped in its status."""
    from tailor.api.modeldeployment import Feedback
    from tailor.workloads.serving.capture import CaptureLog

    log = CaptureLog(Feedback(), "assistant", tmp_path, None, "r0")
    for i, (animal, sound) in enumerate(SOUNDS):
        asked = prompt(animal)[1:]
        response_id = f"chatcmpl-{i:032x}"
        answer = f"The {animal} says {sound}." if i % 2 else BAD
        log.append({"type": "exchange", "id": response_id, "time": 1.0 + i, "asked": asked,
                    "seen": prompt(animal), "answer": answer, "sources": []})  # fmt: skip
        log.append({"type": "feedback", "id": response_id, "time": 2.0 + i, "caller": "k",
                    "rating": "up" if i % 2 else "down"})  # fmt: skip
    log.append({"type": "exchange", "id": "chatcmpl-" + "f" * 32, "time": 99.0, "seen": []})
    log.close()
    feedback = {"deploymentRef": {"name": "assistant"}, "format": "kto", "heldOutFraction": 0}
    run = make_run(tmp_path, pvcs, objective="kto", dataset={"train": {"feedback": feedback}})
    train(run)
    reports = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    used = next(r["status"]["feedback"]["train"] for r in reports if "feedback" in r["status"])
    assert len(used.pop("sha256")) == 64  # the dataset's identity, for lineage
    assert used == {"exchanges": 11, "rated": 10, "records": 10, "skipped": {"notRated": 1}}
    assert (tmp_path / "out" / "manifest.json").exists()
