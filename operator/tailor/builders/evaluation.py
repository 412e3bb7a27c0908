"""Evaluation children: one Job that asks every candidate and reports the results.

The Job's answers file lives on the namespace's artifacts claim (with either store), so a
restarted pod continues where the last one stopped; the report is also pushed to the
bucket with the s3 store. The Job retries a pod that failed for a reason a retry can
change (the backoff limit); a bad question file (exit 2) fails it at once.
"""

from __future__ import annotations

from typing import Any

from tailor.api import API_VERSION
from tailor.api.evaluation import EvaluationSpec, Measurement
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import CandidateTarget, EvaluationRun
from tailor.builders.common import (
    Manifest,
    Mounts,
    Parent,
    Program,
    Workload,
    artifact_dir,
    batch_workload,
    child_name,
    metadata,
    reporter,
    workload_paths,
)

BACKOFF_LIMIT = 3
"""Pods the Job may start again after a failure (each continues the answers file)."""


def comparison(
    parent: Parent,
    name: str,
    component: str,
    measurement: Measurement,
    baseline: dict[str, Any],
    candidate: dict[str, Any],
) -> Manifest:
    """An Evaluation owned by ``parent`` measuring two candidates (``spec.candidates``
    items, named ``baseline`` and ``candidate`` here) on ``measurement``'s questions and
    scoring, the first as the baseline: what a gate decides on."""
    wire = Measurement(**{f: getattr(measurement, f) for f in Measurement.model_fields}).wire()
    spec = {
        **wire,
        "candidates": [{**baseline, "name": "baseline"}, {**candidate, "name": "candidate"}],
        "baseline": "baseline",
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "Evaluation",
        "metadata": metadata(parent, name, component),
        "spec": EvaluationSpec.model_validate(spec).wire(),
    }


def job_name(parent: Parent) -> str:
    return child_name(parent, "eval")


def output_dir(parent: Parent, settings: OperatorSettings) -> str:
    return f"{settings.artifacts_mount}/{artifact_dir(parent)}"


def build_evaluation(
    spec: EvaluationSpec,
    parent: Parent,
    settings: OperatorSettings,
    targets: dict[str, CandidateTarget],
    judge: CandidateTarget | None = None,
) -> Workload:
    """The Job that measures ``targets`` (resolved from spec.candidates, in their order)."""
    name = job_name(parent)
    run = EvaluationRun(
        owner=parent.owner(),
        paths=workload_paths(settings, parent.namespace),
        reporter=reporter(settings),
        spec=spec,
        targets=targets,
        judge=judge,
        output_dir=output_dir(parent, settings),
    )
    mounts = Mounts().add_sources([spec.questions])
    for target in [*targets.values(), *([judge] if judge else [])]:
        mounts.add_secret(target.api_key_secret_ref).add_secret(target.test_key_secret_ref)
    return batch_workload(
        parent,
        settings,
        name=name,
        component="evaluator",
        module=Program.EVALUATION,
        run=run,
        resources=spec.resources,
        mounts=mounts,
        rbac_name=name,
        plural="evaluations",
        backoff_limit=BACKOFF_LIMIT,
        artifacts_volume=True,
    )
