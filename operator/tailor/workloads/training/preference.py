"""Preference objectives (``spec.objective: kto | dpo``) inside the trainer's own loop.

The losses are TRL's (``DPOTrainer``'s sigmoid loss, ``KTOTrainer``'s ``kto`` loss with
its KL baseline from mismatched pairs), computed here rather than by running TRL's
trainers: those bring transformers' Trainer loop, with its own checkpoints, resume, FSDP
wrapping and logging, and a preference run would then resume, shard and report unlike an
sft run of the same FineTuneJob. Here every objective shares the loop, the checkpoints
(which hold the reference log-probabilities), torchrun, the progress reports and the
artifact.

The reference model is the model as training starts: the base model for a new adapter
(LoRA starts as the identity) or for full fine-tuning, the named adapter for
``preference.reference``. Its log-probabilities of every answer are computed once before
the first step (TRL's ``precompute_ref_log_probs``), so no second copy of the model is
kept, and saved in every checkpoint, so a resumed run compares with the same reference.

DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``.
KTO (Ethayarajh et al. 2024): ``z = max(0, mean(pi_kl - ref_kl))`` over the batch's
mismatched pairs (detached), then ``1 - sigmoid(beta * (r - z))`` for desirable answers
and ``1 - sigmoid(beta * (z - r))`` for undesirable ones, ``r = pi - ref``, weighted.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from tailor.api.finetunejob import FineTuneJobSpec
from tailor.workloads.errors import WorkloadError
from tailor.workloads.training.data import IGNORE_INDEX, Example, Format, collate


def check_objective(objective: str, fmt: Format, what: str = "dataset.train") -> None:
    """The records fit the objective, or an error naming both."""
    if objective == "sft" and fmt in ("kto", "dpo"):
        raise WorkloadError(
            "InvalidDataset",
            f"{what} holds {fmt} records ({'prompt, completion, label' if fmt == 'kto' else 'prompt, chosen, rejected'}): "
            f"set spec.objective: {fmt}",
        )
    if objective != "sft" and fmt != objective:
        wanted = (
            "{prompt, completion, label}" if objective == "kto" else "{prompt, chosen, rejected}"
        )
        raise WorkloadError(
            "InvalidDataset",
            f"{what} holds {fmt} records but spec.objective is {objective}, which learns from "
            f"{wanted} records (TRL's format; a feedback DataSource with format: {objective} "
            "writes them)",
        )


def sequence_logps(
    model: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    max_length: int,
    autocast: AbstractContextManager[Any],
) -> torch.Tensor:
    """Summed log-probability of each example's learned tokens (one value per example)."""
    device = next(model.parameters()).device
    batch = collate(examples, pad_id, False, max_length).to(device)
    keep = batch.targets != IGNORE_INDEX
    with autocast:
        logits = model(input_ids=batch.input_ids, use_cache=False, logits_to_keep=keep).logits
    logps = torch.log_softmax(logits.float(), dim=-1)
    token_logps = logps.gather(-1, batch.targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(len(examples), device=device).index_add(0, rows, token_logps)


def _sides(examples: list[Example]) -> list[Example]:
    """The second sequence of each example: dpo's rejected answer, kto's mismatched pair."""
    seconds = []
    for example in examples:
        assert example.pair is not None
        second = example.pair.rejected or example.pair.kl
        assert second is not None
        seconds.append(second)
    return seconds


@torch.no_grad()  # type: ignore[untyped-decorator]
def reference_logps(
    model: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    max_length: int,
    autocast: AbstractContextManager[Any],
    batch_size: int,
) -> list[list[float]]:
    """[first, second] log-probabilities of every example under the model as it is now."""
    was_training = model.training
    model.eval()
    values: list[list[float]] = []
    for start in range(0, len(examples), batch_size):
        group = examples[start : start + batch_size]
        first = sequence_logps(model, group, pad_id, max_length, autocast)
        second = sequence_logps(model, _sides(group), pad_id, max_length, autocast)
        values.extend([float(a), float(b)] for a, b in zip(first, second, strict=True))
    model.train(was_training)
    return values


def preference_loss(
    model: torch.nn.Module,
    examples: list[Example],
    reference: list[list[float]],
    spec: FineTuneJobSpec,
    pad_id: int,
    autocast: AbstractContextManager[Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, rewards accuracy count) of a micro-batch; ``reference`` holds the
    reference log-probabilities of ``examples``, in order."""
    max_length = spec.training.max_seq_length
    beta = spec.preference.beta
    first = sequence_logps(model, examples, pad_id, max_length, autocast)
    second = sequence_logps(model, _sides(examples), pad_id, max_length, autocast)
    ref = torch.tensor(reference, device=first.device)
    if spec.objective == "dpo":
        margin = (first - ref[:, 0]) - (second - ref[:, 1])
        losses = -F.logsigmoid(beta * margin)
        return losses.sum(), (margin > 0).sum().detach()
    # kto
    ratios = first - ref[:, 0]
    kl = (second - ref[:, 1]).mean().detach().clamp(min=0)
    labels = torch.tensor([bool(e.pair and e.pair.label) for e in examples], device=first.device)
    desirable = spec.preference.desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl)))
    undesirable = spec.preference.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios)))
    losses = torch.where(labels, desirable, undesirable)
    correct = torch.where(labels, ratios > kl, ratios < kl)
    return losses.sum(), correct.sum().detach()
