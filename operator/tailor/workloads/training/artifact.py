"""The artifact of a training run: the adapter (or full weights) in safetensors with its
tokenizer, a training log and a ``manifest.json`` of checksums and metrics (written last),
in a temporary folder renamed into place so that a failed run never leaves an artifact that
looks complete; and the check of a published artifact against its manifest."""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from tailor.api.common import Artifact
from tailor.api.finetunejob import LoraConfig
from tailor.api.workloads import TrainRun
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.storage import MARKER as STORE_MARKER
from tailor.workloads.io.storage import Store, artifact_uri, check_manifest, sha256_file
from tailor.workloads.training.data import Datasets
from tailor.workloads.training.state import Schedule, TrainState


def publish(
    run: TrainRun,
    model: Any,
    tokenizer: Any,
    state: TrainState,
    data: Datasets,
    schedule: Schedule,
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[Artifact, dict[str, Any]]:
    """Write the adapter (or weights), tokenizer, training log and manifest.json (last) into
    ``<output_dir>.tmp-*`` and rename it to ``output_dir``. ``weights``: a sharded model's,
    gathered."""
    output = Path(run.output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{output}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        with (tmp / "trainer_log.jsonl").open("w") as fh:
            fh.writelines(json.dumps(entry) + "\n" for entry in state.history)
        manifest = build_manifest(run, tmp, state, data, schedule)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if published(run, output):  # this run's own, e.g. a pod retried after the rename
            shutil.rmtree(output)
        elif output.exists():
            output.rmdir()  # empty (published() refuses anything else)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return artifact_of(run, output), manifest


def published(run: TrainRun, output: Path) -> bool:
    """Whether ``output`` holds this run's published artifact (its manifest names this
    FineTuneJob's uid); False when it is absent or empty. Anything else there (another
    run's artifact, files Tailor did not write) is refused, never replaced: the output path
    is the user's to name, e.g. a folder on a shared models claim."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return False
    try:
        owner = json.loads((output / "manifest.json").read_text()).get("owner") or {}
    except (OSError, ValueError, AttributeError):
        owner = {}
    ours = {"namespace": run.owner.namespace, "name": run.owner.name, "uid": run.owner.uid}
    if owner and all(owner.get(k) == v for k, v in ours.items()):
        return True
    raise WorkloadError(
        "OutputNotEmpty",
        f"spec.output: {output} already holds files this FineTuneJob did not publish "
        f"({'the artifact of ' + str(owner.get('name')) if owner else 'not a Tailor artifact'}); "
        "Tailor never replaces them: name an empty path (spec.output.pvc.path), or remove them",
    )


def build_manifest(
    run: TrainRun, folder: Path, state: TrainState, data: Datasets, schedule: Schedule
) -> dict[str, Any]:
    """Checksums, base model, method, hyperparameters and final metrics of an artifact."""
    import peft
    import transformers

    spec = run.spec
    files = [
        {
            "path": str(p.relative_to(folder)),
            "sha256": sha256_file(p),
            "sizeBytes": p.stat().st_size,
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    eval_loss = state.eval_loss
    return {
        "kind": "FineTuneJob",
        "owner": {"namespace": run.owner.namespace, "name": run.owner.name, "uid": run.owner.uid},
        "format": "transformers" if spec.method == "full" else "peft-lora",
        "baseModel": spec.base_model.wire(),
        "method": spec.method,
        "lora": None if spec.method == "full" else (spec.lora or LoraConfig()).wire(),
        "training": spec.training.wire(),
        "dataset": {
            "format": data.format,
            "train": asdict(data.train_stats),
            "validation": asdict(data.validation_stats),
        },
        "metrics": {
            "steps": state.step,
            "epochs": schedule.epoch_of(state.step),
            "trainLoss": state.recent_loss,
            "evalLoss": eval_loss,
            "perplexity": None if eval_loss is None else math.exp(min(eval_loss, 50.0)),
            "evals": state.evals,
            "tokens": state.tokens,
            "trainSeconds": round(state.train_seconds, 2),
            "tokensPerSecond": round(state.tokens / max(state.train_seconds, 1e-9), 1),
            "resumedFromStep": state.resumed_from_step,
            "losses": [h["loss"] for h in state.history],
        },
        "distributed": {
            "worldSize": schedule.world_size,
            "strategy": spec.training.strategy if schedule.world_size > 1 else "none",
            "globalBatch": schedule.global_batch,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }


def artifact_of(run: TrainRun, output: Path) -> Artifact:
    manifest = output / "manifest.json"
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return Artifact(
        uri=artifact_uri(output, run.paths), sha256=sha256_file(manifest), size_bytes=size
    )


def verify_artifact(output: Path, store: Store | None = None) -> dict[str, Any]:
    """Re-read a published artifact against its manifest: every listed file present with
    its size and sha256; with an object store, also its upload complete in the bucket with
    the same checksums. Returns what the operator needs to call the run Succeeded."""
    manifest_path = output / "manifest.json"
    if store:
        marker = store.marker(store.relative(output))
        uploaded = {e["path"]: e["sha256"] for e in (marker or {}).get("files") or []}
        local = {
            p.relative_to(output).as_posix(): sha256_file(p)
            for p in output.rglob("*")
            if p.is_file() and p.name != STORE_MARKER
        }
        if uploaded != local:
            raise WorkloadError(
                "ArtifactIncomplete",
                f"{store.uri(store.relative(output))} does not hold the artifact's files "
                f"completely ({len(uploaded)} of {len(local)} uploaded with matching sha256)",
            )
    manifest = check_manifest(output)
    return {
        "sha256": sha256_file(manifest_path),
        "files": len(manifest.get("files") or []),
    }
