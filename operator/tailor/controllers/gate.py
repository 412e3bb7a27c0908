"""A FineTuneJob's evaluation gate (``spec.evaluation``): once training has succeeded, the
new adapter is measured against a baseline on a deployment serving both, and passes or
fails its gate (``status.evaluation``).

The deployment serves the adapter (an entry of its ``spec.adapters`` naming this job) to
Evaluations only until the gate passes (the ModelDeployment controller marks it gated).
The gate waits until every ready replica serves it, then creates one Evaluation, owned by
the job (``<job>-gate``), with two candidates, ``baseline`` and ``candidate``; its results
decide, in the shape of MLflow's validation thresholds: the metric's ``min``, and against
the baseline a ``minAbsoluteChange`` and optionally a paired test (the Evaluation's exact
McNemar p-value below ``alpha``, the change positive). A failed artifact is kept: its
lineage (the Evaluation, the numbers) stays in the status.
"""

from __future__ import annotations

from typing import Any

from tailor.api.evaluation import Gate, GatedEvaluation
from tailor.builders.common import Parent, child_name
from tailor.builders.evaluation import comparison
from tailor.controllers.children import is_owned_by
from tailor.controllers.context import Operator, condition_of

KIND = "FineTuneJob"
POLL_SECONDS = 5.0
"""How often an undecided gate looks at its deployment and Evaluation."""


def sync_gate(op: Operator, body: dict[str, Any], template: GatedEvaluation) -> None:
    """Move ``status.evaluation`` of a trained FineTuneJob one step."""
    status = body.get("status") or {}
    old = status.get("evaluation") or {}
    if old.get("phase") in ("Passed", "Failed"):
        return
    parent = Parent.from_body(body)
    new = _next(op, parent, template)
    if new != old:
        op.patch_status(body, {"evaluation": new})
        if new["phase"] in ("Passed", "Failed"):
            warning = new["phase"] == "Failed"
            op.event(
                body, "Warning" if warning else "Normal", f"Gate{new['phase']}", new["message"]
            )
    if new["phase"] not in ("Passed", "Failed"):
        op.queue.add_after((KIND, parent.namespace, parent.name), POLL_SECONDS)


def _next(op: Operator, parent: Parent, template: GatedEvaluation) -> dict[str, Any]:
    ns, ref = parent.namespace, template.deployment_ref.name
    name = child_name(parent, "gate")
    md = op.get("ModelDeployment", ns, ref)
    if md is None:
        return _waiting(
            f"spec.evaluation.deploymentRef.name: ModelDeployment {ref} does not exist in {ns}"
        )
    adapters = (md.get("spec") or {}).get("adapters") or []
    served = next(
        (a["name"] for a in adapters if (a.get("fineTuneJobRef") or {}).get("name") == parent.name),
        None,
    )
    if served is None:
        return _waiting(
            f"ModelDeployment {ref} serves no adapter from this FineTuneJob: add "
            f"{{name: ..., fineTuneJobRef: {{name: {parent.name}}}}} to its spec.adapters"
        )
    replicas = (md.get("status") or {}).get("replicaAdapters") or []
    if not replicas or any(served not in (r.get("adapters") or []) for r in replicas):
        return _waiting(f"waiting for ModelDeployment {ref}'s replicas to load adapter {served}")
    evaluation = op.get("Evaluation", ns, name)
    if evaluation is not None and not is_owned_by(evaluation, parent.uid):
        return {
            "phase": "Failed",
            "evaluation": name,
            "message": f"Evaluation {name} exists and was not created by this FineTuneJob; "
            "rename or delete it",
        }
    if evaluation is None:
        op.runtime.apply(_evaluation(parent, name, template, served))
        return {
            "phase": "Evaluating",
            "evaluation": name,
            "metric": template.gate.metric,
            "message": f"Evaluation {name}: {served} against "
            f"{template.baseline_adapter or 'the base model'} on {ref}",
        }
    ev_status = evaluation.get("status") or {}
    if ev_status.get("phase") == "Failed":
        failed = condition_of(ev_status, "Ready")
        return {
            "phase": "Failed",
            "evaluation": name,
            "metric": template.gate.metric,
            "message": f"its Evaluation {name} failed: {failed.get('message', '')}",
        }
    if ev_status.get("phase") != "Succeeded":
        return {
            "phase": "Evaluating",
            "evaluation": name,
            "metric": template.gate.metric,
            "message": f"Evaluation {name} is {ev_status.get('phase') or 'Pending'}",
        }
    results = {c["name"]: c for c in ev_status.get("candidates") or []}
    return {
        "evaluation": name,
        **verdict(template.gate, results.get("candidate") or {}, results.get("baseline") or {}),
    }


def verdict(gate: Gate, candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The gate's decision on an Evaluation's two results (``status.candidates`` items)."""
    metric = gate.metric
    value = (candidate.get(metric) or {}).get("value")
    base = (baseline.get(metric) or {}).get("value") if metric != "winRate" else None
    out: dict[str, Any] = {"metric": metric, "candidate": value, "baseline": base}
    if value is None:
        return {**out, "phase": "Failed", "message": f"the Evaluation measured no {metric}"}
    failed: list[str] = []
    passed: list[str] = []
    if gate.min is not None:
        (failed if value < gate.min else passed).append(f"{metric} {value} (min {gate.min})")
    if gate.vs_baseline is not None:
        change = round(value - (base or 0.0), 4)
        out["change"] = change
        need = gate.vs_baseline.min_absolute_change
        line = f"{metric} {value} vs baseline {base}: change {change:+} (least {need:+})"
        (failed if change < need else passed).append(line)
        test = gate.vs_baseline.paired_test
        if test is not None:
            p = candidate.get("pValue")
            out["pValue"] = p
            significant = p is not None and p < test.alpha and change > 0
            (passed if significant else failed).append(
                f"McNemar p {p} (an improvement below alpha {test.alpha} needed)"
            )
    phase = "Failed" if failed else "Passed"
    return {**out, "phase": phase, "message": "; ".join(failed or passed)}


def _waiting(message: str) -> dict[str, Any]:
    return {"phase": "Waiting", "message": message}


def _evaluation(
    parent: Parent, name: str, template: GatedEvaluation, served: str
) -> dict[str, Any]:
    """The gate's Evaluation: the new adapter against the baseline on one deployment."""
    deployment = {"deploymentRef": {"name": template.deployment_ref.name}}
    baseline = (
        {**deployment, "adapter": template.baseline_adapter}
        if template.baseline_adapter
        else deployment
    )
    return comparison(parent, name, "gate", template, baseline, {**deployment, "adapter": served})
