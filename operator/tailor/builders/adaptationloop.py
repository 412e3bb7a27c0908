"""What an AdaptationLoop creates: a rung's FineTuneJob (owned by the loop), trained on the
deployment's feedback with an evaluation gate against the champion, or a prompt rung's
Evaluation; and the rollout it writes into the deployment."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tailor.api import API_VERSION
from tailor.api.adaptationloop import AdaptationLoopSpec, Rung
from tailor.api.common import DataSource, FeedbackData, LocalObjectRef, ModelSource
from tailor.api.evaluation import GatedEvaluation
from tailor.api.finetunejob import DatasetSpec, FineTuneJobSpec, Preference, Reference
from tailor.api.rollout import Rollout, Variant
from tailor.builders.common import Manifest, Parent, child_name, metadata
from tailor.builders.evaluation import comparison


def rung_name(parent: Parent, number: int, rung: Rung) -> str:
    """The child of a rung in an iteration (its FineTuneJob and that adapter's name on the
    deployment, or a prompt rung's Evaluation)."""
    return child_name(parent, f"i{number}-{rung.name}")


def rung_fine_tune(
    spec: AdaptationLoopSpec,
    parent: Parent,
    number: int,
    rung: Rung,
    base_model: ModelSource,
    champion_uri: str | None,
    since: datetime | None = None,
) -> Manifest:
    """A rung's FineTuneJob: the feedback in the rung's format (the evaluation set's
    questions left out), continuing the champion, gated against it on the deployment."""
    assert rung.fine_tune is not None
    feedback = spec.dataset.from_feedback
    evaluation = spec.evaluation
    exclude = evaluation.questions.config_map if feedback.dedup_against_evaluation else None
    train = DataSource(
        feedback=FeedbackData(
            deployment_ref=spec.deployment_ref,
            format=rung.fine_tune.objective,
            min_records=feedback.min_records,
            held_out_fraction=feedback.held_out_fraction,
            exclude_questions=exclude,
            since=since if feedback.window == "sinceLastIteration" else None,
        )
    )
    reference = Reference(uri=champion_uri) if champion_uri else None
    gated = GatedEvaluation(
        **{k: getattr(evaluation, k) for k in type(evaluation).model_fields},
        deployment_ref=spec.deployment_ref,
        baseline_adapter=spec.adapter,
        gate=spec.gate,
    )
    ftj = FineTuneJobSpec(
        base_model=base_model,
        method="lora",
        lora=rung.fine_tune.lora,
        training=rung.fine_tune.training,
        resources=rung.fine_tune.resources,
        objective=rung.fine_tune.objective,
        preference=Preference(reference=reference),
        dataset=DatasetSpec(train=train),
        evaluation=gated,
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": metadata(parent, rung_name(parent, number, rung), "adaptation"),
        "spec": ftj.wire(),
    }


def rung_evaluation(spec: AdaptationLoopSpec, parent: Parent, number: int, rung: Rung) -> Manifest:
    """A prompt rung's Evaluation: the champion adapter under the rung's PromptProfile
    against the champion under the deployment's own profile, on the frozen set."""
    assert rung.prompt is not None
    champion = {"deploymentRef": spec.deployment_ref.wire(), "adapter": spec.adapter}
    profile = {"promptProfileRef": {"name": rung.prompt.profile_ref.name}}
    name = rung_name(parent, number, rung)
    return comparison(
        parent, name, "adaptation", spec.evaluation, champion, {**champion, **profile}
    )


def winner_rollout(spec: AdaptationLoopSpec, candidate: Variant) -> Rollout:
    """The canary that rolls a winner (an adapter, or the champion adapter under a prompt
    profile) out against the adapter users call."""
    template = spec.rollout
    return Rollout(
        stable=Variant(adapter=spec.adapter),
        candidate=candidate,
        mode="canary",
        steps=template.steps,
        sticky=template.sticky,
        analysis=template.analysis,
    )


def served_by(job: str, name: str) -> dict[str, Any]:
    """A deployment's adapter entry serving a FineTuneJob's artifact."""
    return {"name": name, "fineTuneJobRef": LocalObjectRef(name=job).wire()}
