"""Checkpoints of a training run: ``step-NNNNNNNN`` folders written atomically on the
pod's volume (the trainable weights in safetensors, the optimizer, scheduler, scaler and RNG
state, and the :class:`TrainState`), the newest resumed by a retried pod when it was written
for the same recipe and data (:func:`fingerprint_of`), and, with an object store, uploaded
after each save and the newest downloaded before resuming."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tailor.api.finetunejob import FineTuneJobSpec
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.storage import Store
from tailor.workloads.training import distributed
from tailor.workloads.training.data import Datasets
from tailor.workloads.training.distributed import World
from tailor.workloads.training.model import device_of
from tailor.workloads.training.state import TrainState

log = logging.getLogger("tailor.workloads.training.checkpoints")

CHECKPOINT_PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: Path,
    keep: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``step-NNNNNNNN`` atomically (temporary folder, then rename) and keep the
    newest ``keep`` checkpoints. ``gathered``: the weights and optimizer state of a sharded
    model (:func:`full_states`)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    tmp = directory / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights, optimizer_state = gathered or (trainable_state(model), optimizer.state_dict())
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "state.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
        _fsync(tmp)  # the files on disk before the rename makes them a checkpoint
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(directory, files=False)  # and the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(folder: Path, files: bool = True) -> None:
    """Flush ``folder``'s files (unless ``files`` is False) and the folder itself to disk: a
    node that loses power right after the rename must not leave a checkpoint of empty files."""
    for path in sorted(folder.iterdir()) if files else []:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resume(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    fingerprint: str,
    sharded: bool = False,
) -> TrainState:
    """Load the newest checkpoint into the model, optimizer, scheduler and RNG; a fresh
    state when there is none. A checkpoint that cannot be read (a node lost mid-write, a
    corrupted volume) is passed over for the one before it. Checkpoints of another spec or
    dataset are removed."""
    checkpoints = list_checkpoints(directory)
    for tmp in directory.glob(".tmp-*") if directory.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a pod killed while saving
    device = "cpu" if sharded else str(device_of(model))
    while checkpoints:
        newest = checkpoints.pop()
        try:
            state, weights, tensors = _read(newest, device)
            break
        except Exception as exc:  # truncated or garbled files: the previous one will do
            # left in place (every rank reads it; the run rewrites that step when it gets there)
            log.warning("checkpoint %s cannot be read (%s); trying the one before", newest, exc)
    else:
        return TrainState(fingerprint=fingerprint)
    if state.fingerprint != fingerprint:
        log.warning(
            "checkpoints in %s were written for another spec or dataset; starting over",
            directory,
        )
        for old in [*checkpoints, newest]:
            shutil.rmtree(old, ignore_errors=True)
        return TrainState(fingerprint=fingerprint)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(weights)
    if missing:
        raise WorkloadError("CheckpointInvalid", f"{newest} lacks {sorted(missing)[:3]}")
    if sharded:  # every rank reads the whole state and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=weights,
            optim_state_dict=tensors["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    if scaler and tensors["scaler"]:
        scaler.load_state_dict(tensors["scaler"])
    torch.set_rng_state(tensors["rng"])
    if tensors["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    state.resumed_from_step = state.step
    log.info("resumed from checkpoint %s (step %d)", newest.name, state.step)
    return state


def _read(
    checkpoint: Path, device: str
) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a checkpoint holds, read (and so checked) before any of it is applied."""
    from safetensors.torch import load_file

    state = TrainState(**json.loads((checkpoint / "trainer_state.json").read_text()))
    weights = load_file(str(checkpoint / "trainable.safetensors"), device=device)
    tensors = torch.load(checkpoint / "state.pt", weights_only=True)
    return state, weights, tensors


def pull_newest_checkpoint(store: Store, directory: Path, world: World) -> None:
    """With an object store: the newest complete checkpoint in the bucket, downloaded into
    this pod's checkpoint folder (once per node, by its local rank 0) unless already there.
    An upload that never finished has no marker and is not a checkpoint."""
    if world.local_rank == 0:
        names = [
            n for n in store.complete_children(store.relative(directory))
            if n.startswith(CHECKPOINT_PREFIX)
        ]  # fmt: skip
        if names:
            newest = max(names, key=lambda n: int(n.removeprefix(CHECKPOINT_PREFIX)))
            store.pull(f"{store.relative(directory)}/{newest}")
            log.info(
                "checkpoint %s downloaded from %s", newest, store.uri(store.relative(directory))
            )
    distributed.barrier()


def push_checkpoint(store: Store, path: Path, keep: int) -> None:
    """Upload a checkpoint (marker last), then remove the bucket's checkpoints beyond the
    newest ``keep``, as on the volume."""
    store.push(path)
    parent = store.relative(path.parent)
    names = sorted(
        (n for n in store.complete_children(parent) if n.startswith(CHECKPOINT_PREFIX)),
        key=lambda n: int(n.removeprefix(CHECKPOINT_PREFIX)),
    )
    for old in names[:-keep]:
        store.delete(f"{parent}/{old}")


def saved_global_batch(directory: Path, fingerprint: str) -> int:
    """The examples per step of the newest checkpoint of this recipe, or 0 without one."""
    for checkpoint in reversed(list_checkpoints(directory)):
        try:
            saved = json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # unreadable: resume() falls back past it too
        return int(saved.get("global_batch", 0)) if saved.get("fingerprint") == fingerprint else 0
    return 0


def fingerprint_of(spec: FineTuneJobSpec, data: Datasets) -> str:
    """What a checkpoint must match to be resumed: the training recipe and the data."""
    digest = hashlib.sha256()
    recipe = spec.model_dump(
        mode="json",
        include={"base_model", "method", "lora", "training", "dataset"}
        | ({"objective", "preference"} if spec.objective != "sft" else set()),
    )
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for example in data.train:
        digest.update(torch.tensor(example.input_ids + example.targets).numpy().tobytes())
    return digest.hexdigest()
