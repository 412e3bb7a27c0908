"""The fine-tuning workload end to end: LoRA and full runs on a tiny random-init Llama (for
speed), one LoRA run on the builtin SmolLM2 that must learn, a pod killed after a
checkpoint that resumes where it stopped, and the errors a user sees for bad data and for
qlora without a GPU."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from tailor.api.common import ModelSource
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_tokenizer
from tailor.workloads.io.storage import artifact_uri
from tailor.workloads.training.checkpoints import list_checkpoints
from tailor.workloads.training.data import IGNORE_INDEX, Example, collate
from tailor.workloads.training.trainer import StopRequested, batch_loss, train
from tests.workloads.helpers import animal_chats, free_port, make_run, run_workload

pytestmark = [pytest.mark.workloads, pytest.mark.usefixtures("one_thread")]

SMOLLM2 = ModelSource(builtin="smollm2-135m-instruct")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scrape(port: int, metric: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(metric + "{") and 'name="ftj1"' in line and 'namespace="ns1"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{metric} not served")


def test_lora_run_publishes_a_checked_adapter_and_reports_progress(
    tmp_path: Path, pvcs: Path
) -> None:
    port = free_port()
    run = make_run(tmp_path, pvcs).model_copy(update={"metrics_port": port})
    artifact = train(run)

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert artifact.sha256 == sha256(out / "manifest.json")
    assert artifact.uri == f"file://{out.resolve()}/"
    names = {f["path"] for f in manifest["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    for entry in manifest["files"]:  # every checksum and size is right
        assert entry["sha256"] == sha256(out / entry["path"])
        assert entry["sizeBytes"] == (out / entry["path"]).stat().st_size
    assert artifact.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    assert not list(tmp_path.glob("out.tmp-*"))

    metrics = manifest["metrics"]
    assert (manifest["method"], manifest["lora"]["r"]) == ("lora", 8)
    assert manifest["dataset"]["train"]["examples"] == 32
    assert metrics["steps"] == 16  # 32 examples / batch 4 = 8 steps per epoch, 2 epochs
    evals = metrics["evals"]
    assert [e["step"] for e in evals] == [0, 8, 16]
    assert evals[-1]["evalLoss"] < evals[0]["evalLoss"] - 0.5
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["evalLoss"], rel=1e-6)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 17))
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 2  # keep: 2 of steps 5, 10, 15

    reports = [json.loads(line)["status"] for line in (tmp_path / "progress.jsonl").open()]
    assert not any("phase" in r for r in reports)  # the operator alone writes the phase
    assert all("progress" in r and "artifact" not in r for r in reports[:-1])
    final = reports[-1]
    assert final["artifact"]["sha256"] == artifact.sha256
    assert final["progress"]["step"] == final["progress"]["totalSteps"] == 16
    assert final["progress"]["percent"] == 100
    assert final["progress"]["evalLoss"] == pytest.approx(evals[-1]["evalLoss"], abs=1e-4)
    assert final["progress"]["tokensPerSecond"] > 0

    assert scrape(port, "tailor_train_step") == 16
    assert scrape(port, "tailor_train_total_steps") == 16
    assert scrape(port, "tailor_train_eval_loss") == pytest.approx(evals[-1]["evalLoss"], 1e-3)
    assert scrape(port, "tailor_train_tokens_per_second") > 0

    # The adapter loads back onto the base with peft and changes its outputs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pvcs / "models" / "tiny")
    ids = torch.tensor([[1, 2, 3, 4]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, out)
    assert not torch.allclose(tuned(ids).logits, before, atol=1e-3)

    # A retried pod after publishing reports the same artifact without training again.
    started = time.monotonic()
    assert train(run) == artifact
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("output", "uri"),
    [
        ("/mnt/pvc/artifacts/finetunejob/a/u1", "pvc://artifacts/finetunejob/a/u1/"),
        ("/data/out", "file:///data/out/"),
    ],
)
def test_artifact_uri_names_the_claim_when_the_output_is_on_one(output: str, uri: str) -> None:
    assert artifact_uri(Path(output), Paths(artifacts="/a", pvcs="/mnt/pvc")) == uri


def test_full_fine_tune_writes_safetensors_weights(tmp_path: Path, pvcs: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = make_run(
        tmp_path,
        pvcs,
        method="full",
        lora=None,
        training={"maxSteps": 3},
        dataset={"train": {"inline": animal_chats(12)}},
    )
    train(run)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "transformers" and manifest["lora"] is None
    assert manifest["metrics"]["evalLoss"] is None  # no validation data, no evaluation
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(pvcs / "models" / "tiny")
    changed = [
        name
        for (name, p), q in zip(tuned.named_parameters(), base.parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert "model.layers.0.mlp.down_proj.weight" in changed


def test_packed_and_padded_batches_have_the_same_loss(pvcs: Path) -> None:
    """Packed rows hold several examples with restarting positions; the block-diagonal
    mask must keep them apart, so the loss equals that of one example per row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pvcs / "models" / "tiny").eval()
    generator = torch.Generator().manual_seed(0)

    def example(length: int) -> Example:
        ids = torch.randint(10, 1000, (length,), generator=generator).tolist()
        return Example(ids, [*ids[1:], IGNORE_INDEX])

    examples = [example(40), example(15), example(25), example(12), example(28)]
    fp32 = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        packed_batch = collate(examples, pad_id=0, packing=True, max_length=80)
        assert packed_batch.position_ids is not None and packed_batch.input_ids.shape[0] == 2
        packed = batch_loss(model, packed_batch, fp32).item()
        padded = batch_loss(model, collate(examples, 0, False, 80), fp32).item()
        alone = sum(batch_loss(model, collate([e], 0, False, 80), fp32).item() for e in examples)
    assert packed == pytest.approx(padded, rel=1e-5)
    assert packed == pytest.approx(alone, rel=1e-5)


def test_a_killed_run_resumes_from_its_newest_checkpoint(tmp_path: Path, pvcs: Path) -> None:
    changes: dict[str, Any] = {
        "training": {"maxSteps": 150, "epochs": 1},
        "checkpoint": {"everySteps": 5, "keep": 2},
    }
    reference = make_run(tmp_path / "reference", pvcs, **changes)
    interrupted = make_run(tmp_path / "interrupted", pvcs, **changes)

    process = run_workload(interrupted, tmp_path)
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list_checkpoints(checkpoints) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # like a node going away: no cleanup at all
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == -signal.SIGKILL, output
    assert not (tmp_path / "interrupted" / "out").exists()
    newest = int(list_checkpoints(checkpoints)[-1].name.removeprefix("step-"))
    assert 5 <= newest < 150

    train(interrupted)  # the restarted pod
    train(reference)  # the same run, never interrupted
    resumed = json.loads((tmp_path / "interrupted" / "out" / "manifest.json").read_text())
    whole = json.loads((tmp_path / "reference" / "out" / "manifest.json").read_text())
    assert resumed["metrics"]["resumedFromStep"] == newest
    assert whole["metrics"]["resumedFromStep"] is None

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "out" / "trainer_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert len(losses("interrupted")) == len(losses("reference")) == 150
    assert losses("interrupted") == pytest.approx(losses("reference"), rel=1e-3)
    assert resumed["metrics"]["evalLoss"] == pytest.approx(whole["metrics"]["evalLoss"], rel=1e-3)


def test_sigterm_checkpoints_after_the_step_and_stops(tmp_path: Path, pvcs: Path) -> None:
    """A pod being deleted (suspend, preemption) gets SIGTERM: the trainer finishes its
    step, checkpoints it and exits 143, and the next pod continues from there; from the
    one before when the newest checkpoint cannot be read."""
    run = make_run(tmp_path, pvcs, checkpoint={"everySteps": 100})
    stop = StopRequested()
    stop.requested = True  # as the SIGTERM handler installed by main() would set it
    with pytest.raises(SystemExit) as exited:
        train(run, stop)
    assert exited.value.code == 143
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000001"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # preempted again, one step later
        train(run, stop)
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000001", "step-00000002"]
    # the node went away while step 2 was reaching the disk: its weights are cut short
    weights = checkpoints[-1] / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    train(run)  # resumes from the checkpoint before the unreadable one
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["resumedFromStep"] == 1
    assert manifest["metrics"]["steps"] == 16


def test_a_bad_dataset_fails_before_training_with_file_and_line(tmp_path: Path, pvcs: Path) -> None:
    data = pvcs / "data"
    data.mkdir(exist_ok=True)
    lines = [json.dumps(r) for r in animal_chats(4)]
    lines.insert(2, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    (data / "bad.jsonl").write_text("\n".join(lines) + "\n")
    run = make_run(
        tmp_path,
        pvcs,
        dataset={"train": {"pvc": {"claimName": "data", "path": "bad.jsonl"}}},
    )
    process = run_workload(run, tmp_path)
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 2, output
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert termination["reason"] == "InvalidDataset"
    assert termination["message"] == (
        f"{data / 'bad.jsonl'}:3: messages has no assistant message with weight 1: "
        "there is nothing to learn"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "checkpoints").exists()


def test_qlora_without_a_gpu_is_a_clear_error(tmp_path: Path, pvcs: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this node has a GPU")
    run = make_run(tmp_path, pvcs, method="qlora", resources={"gpus": 1})
    with pytest.raises(WorkloadError) as caught:
        train(run)
    assert caught.value.reason == "QLoRANeedsGPU"
    assert "needs a CUDA GPU" in caught.value.message and "use method lora" in caught.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("native", "asked", "dtype"), [
    (False, "auto", torch.float32), (True, "auto", torch.bfloat16), (False, "bf16", torch.bfloat16),
])  # fmt: skip
def test_precision_auto_is_bf16_only_where_the_cpu_has_it_and_emulated_bf16_is_named(
    tmp_path: Path,
    pvcs: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    native: bool,
    asked: str,
    dtype: torch.dtype,
) -> None:
    """Emulated bf16 makes each step ~20x slower: auto never picks it, and asking for it
    says so in the log with the fix."""
    from tailor.workloads.training import model

    if torch.cuda.is_available():
        pytest.skip("this node has a GPU")
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: native)
    run = make_run(tmp_path, pvcs, training={"precision": asked})
    with caplog.at_level("WARNING", logger=model.log.name):
        assert model.choose_device(run.spec) == (torch.device("cpu"), dtype)
    warned = "without native bf16" in caplog.text and "precision to auto or fp32" in caplog.text
    assert warned is (asked == "bf16" and not native)


def test_builtin_smollm2_lora_learns_and_the_adapter_changes_generations(
    tmp_path: Path,
) -> None:
    """The real model: held-out loss falls, and the saved adapter loads back with peft and
    changes what the model says."""
    from peft import PeftModel

    from tailor.workloads.io.model_loading import load_causal_lm

    run = make_run(
        tmp_path,
        Path("/nonexistent"),
        baseModel={"builtin": "smollm2-135m-instruct"},
        dataset={
            "train": {"inline": animal_chats(12)},
            "validation": {"inline": animal_chats(13)[-3:]},
        },
        training={"epochs": 2, "batchSize": 4, "learningRate": 2e-3},
        lora={
            "r": 16,
            "alpha": 32,
            "dropout": 0.0,
            "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
    )
    train(run)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    evals = [e["evalLoss"] for e in manifest["metrics"]["evals"]]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.3, evals

    tokenizer = load_tokenizer(SMOLLM2, run.paths)
    prompt = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What does a dog say? (7)"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    base = load_causal_lm(SMOLLM2, run.paths).eval()

    def answer(model: Any) -> str:
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    before = answer(base)
    after = answer(PeftModel.from_pretrained(base, tmp_path / "out").eval())
    assert after != before
    assert after.startswith("The dog says woof"), (before, after)


def test_a_finished_run_vouches_for_its_artifact_in_the_termination_message(
    tmp_path: Path, pvcs: Path
) -> None:
    """The operator calls a FineTuneJob Succeeded only on this report: the trainer re-reads
    what it published against manifest.json before it exits 0."""
    from tailor.workloads.errors import WorkloadError
    from tailor.workloads.io.storage import sha256_file
    from tailor.workloads.training.artifact import verify_artifact

    run = make_run(tmp_path / "r", pvcs, training={"maxSteps": 3, "epochs": 1})
    process = run_workload(run, tmp_path)
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output
    out = Path(run.output_dir)
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["reason"] == "ArtifactPublished"
    assert report["artifact"]["sha256"] == sha256_file(out / "manifest.json")
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert report["artifact"]["files"] == len(files) > 0

    weights = out / next(f["path"] for f in files if f["path"].endswith(".safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    with pytest.raises(WorkloadError, match="sha256 differs") as corrupt:
        verify_artifact(out)
    assert corrupt.value.reason == "ArtifactCorrupt"
    (out / "manifest.json").unlink()
    with pytest.raises(WorkloadError) as missing:
        verify_artifact(out)
    assert missing.value.reason == "ArtifactMissing"
