"""Tailor's Grafana dashboards, written as code with grafana-foundation-sdk.

Four dashboards: the operator (resources by phase, reconciliations, errors, queue and run
times), fine-tuning (loss and evaluation loss, throughput, progress, GPU memory),
knowledge bases (documents, chunks, build duration, freshness) and serving (traffic,
latency percentiles, time to first token, tokens/s, cache, adapters, retrieval, cost,
feedback). Each panel is a small :class:`Panel` record whose PromQL uses only metrics the
code exports (a test checks every name against a real Prometheus); the SDK turns the
records into dashboard JSON (Grafana 10.1 and later).

``python -m tailor.observability.dashboards`` writes ``charts/tailor/dashboards/*.json``
(shipped by the chart as a ConfigMap for Grafana's dashboard sidecar) and the alerting
rules of :mod:`tailor.observability.alerts`; ``--check`` reports drift instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    prometheus,
    stat,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    VariableHide,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

from tailor.observability import alerts

CHART = Path(__file__).resolve().parents[3] / "charts" / "tailor"
DASHBOARDS_DIR = "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
VLLM_ROW = "vLLM engine"
"""The serving row fed by vLLM's metrics: data only where a ModelDeployment runs vLLM."""

PanelKind = Literal["timeseries", "stat", "bargauge"]


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """One panel: what it answers (``description``), its queries and how to draw them."""

    title: str
    description: str
    queries: tuple[Query, ...]
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    stacked: bool = False
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A dashboard variable: a label's values (``label_values``) or a free number."""

    name: str
    label: str
    query: str = ""
    """``label_values(metric{...}, label)``; empty for a text box."""
    default: str = ""
    """A text box's default value."""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    file: str
    rows: tuple[Row, ...]
    variables: tuple[Variable, ...] = field(default_factory=tuple)

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


def quantiles(
    metric: str, by: str, selector: str, legend: str, *levels: float
) -> tuple[Query, ...]:
    """``histogram_quantile`` of ``metric`` at each level, grouped ``by`` (plus ``le``)."""
    return tuple(
        q(
            f"histogram_quantile({level}, sum by ({by}, le) "
            f"(rate({metric}_bucket{selector}[{RATE}])))",
            f"p{round(level * 100)} {legend}".strip(),
        )
        for level in levels
    )


# ----------------------------------------------------------------- operator overview
def operator_dashboard() -> Dashboard:
    ns = '{namespace=~"$namespace"}'
    return Dashboard(
        uid="tailor-operator",
        title="Tailor / Operator",
        description="What the Tailor operator manages and how its reconciliation loop is doing.",
        file="tailor-operator.json",
        variables=(
            Variable(
                "namespace",
                "Namespace",
                "label_values(tailor_operator_queued_for_seconds, namespace)",
            ),
        ),
        rows=(
            Row(
                "Resources",
                (
                    Panel(
                        "Resources by phase",
                        "How many Tailor resources of each kind are in each phase now.",
                        (
                            q(
                                "sum by (kind, phase) (tailor_operator_resources) > 0",
                                "{{kind}} {{phase}}",
                            ),
                        ),
                        kind="bargauge",
                        width=8,
                    ),
                    Panel(
                        "Resources by phase over time",
                        "The same counts over time: a growing Failed or Queued band needs a look.",
                        (
                            q(
                                "sum by (kind, phase) (tailor_operator_resources)",
                                "{{kind}} {{phase}}",
                            ),
                        ),
                        stacked=True,
                        width=10,
                    ),
                    Panel(
                        "Failed or invalid",
                        "Resources in phase Failed or Invalid (see `kubectl get tailor -A`).",
                        (
                            q(
                                'sum(tailor_operator_resources{phase=~"Failed|Invalid"}) or vector(0)',
                                "failed",
                            ),
                        ),
                        kind="stat",
                        width=6,
                    ),
                ),
            ),
            Row(
                "Reconciliation",
                (
                    Panel(
                        "Reconciliations / s",
                        "Reconciliations by kind and result (ok, error).",
                        (
                            q(
                                f"sum by (kind, result) (rate(tailor_operator_reconciliations_total[{RATE}]))",
                                "{{kind}} {{result}}",
                            ),
                        ),
                        unit="ops",
                        width=8,
                    ),
                    Panel(
                        "Reconcile errors / s",
                        "Failed reconciliations by kind (zero while none fail); the operator "
                        "log names the object and the API error.",
                        (
                            q(
                                "sum by (kind) (rate(tailor_operator_reconciliations_total"
                                f'{{result="error"}}[{RATE}])) or 0 * sum by (kind) '
                                f"(rate(tailor_operator_reconciliations_total[{RATE}]))",
                                "{{kind}}",
                            ),
                        ),
                        unit="ops",
                        width=8,
                    ),
                    Panel(
                        "Reconcile duration",
                        "How long one reconciliation takes, by kind.",
                        quantiles(
                            "tailor_operator_reconcile_duration_seconds",
                            "kind",
                            "",
                            "{{kind}}",
                            0.5,
                            0.95,
                        ),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Phase transitions",
                        "Phase changes by kind and new phase.",
                        (
                            q(
                                f"sum by (kind, phase) (increase(tailor_operator_phase_transitions_total[{RATE}]))",
                                "{{kind}} → {{phase}}",
                            ),
                        ),
                        stacked=True,
                    ),
                    Panel(
                        "Kubernetes API requests / s",
                        "Requests the operator sends to the API server, by client and method.",
                        (
                            q(
                                f"sum by (client, method) (rate(tailor_operator_api_requests_total[{RATE}]))",
                                "{{client}} {{method}}",
                            ),
                        ),
                        unit="reqps",
                    ),
                ),
            ),
            Row(
                "Queue and run time",
                (
                    Panel(
                        "Queued now",
                        "Runs waiting for quota in a Kueue queue or for nodes that can take them "
                        "(Unschedulable), and for how long.",
                        (
                            q(
                                f"max by (kind, namespace, name) (tailor_operator_queued_for_seconds{ns})",
                                "{{kind}} {{namespace}}/{{name}}",
                            ),
                        ),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Time spent queued",
                        "How long runs waited before they started, by kind (last hour).",
                        tuple(
                            q(
                                f"histogram_quantile({level}, sum by (kind, le) "
                                "(rate(tailor_operator_queued_seconds_bucket[1h])))",
                                f"p{round(level * 100)} {{{{kind}}}}",
                            )
                            for level in (0.5, 0.95)
                        ),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Run duration",
                        "Duration of finished training, indexing and RAFT runs (last 6 hours).",
                        tuple(
                            q(
                                f"histogram_quantile({level}, sum by (kind, result, le) "
                                "(rate(tailor_operator_run_duration_seconds_bucket[6h])))",
                                f"p{round(level * 100)} {{{{kind}}}} {{{{result}}}}",
                            )
                            for level in (0.5, 0.95)
                        ),
                        unit="s",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Kueue queues",
                (
                    Panel(
                        "Wait before admission",
                        "How long runs waited in each Kueue LocalQueue before Kueue admitted "
                        "them (last hour; a preempted run counts again when readmitted).",
                        tuple(
                            q(
                                f"histogram_quantile({level}, sum by (queue, le) "
                                "(rate(tailor_operator_kueue_wait_seconds_bucket[1h])))",
                                f"p{round(level * 100)} {{{{queue}}}}",
                            )
                            for level in (0.5, 0.95)
                        ),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Admissions",
                        "Runs Kueue admitted per hour, by LocalQueue.",
                        (
                            q(
                                "sum by (queue) (increase(tailor_operator_kueue_admissions_total[1h]))",
                                "{{queue}}",
                            ),
                        ),
                        width=8,
                    ),
                    Panel(
                        "Preemptions",
                        "Runs Kueue preempted for higher-priority work per hour, by "
                        "LocalQueue (each resumes from its checkpoint when readmitted).",
                        (
                            q(
                                "sum by (queue) (increase(tailor_operator_kueue_preemptions_total[1h]))",
                                "{{queue}}",
                            ),
                        ),
                        width=8,
                    ),
                ),
            ),
            Row(
                "Prompt tests",
                (
                    Panel(
                        "Prompt test cases by revision",
                        "Passed and failed test cases of each PromptProfile revision's last "
                        "run (a gated profile serves only revisions without failures).",
                        (
                            q(
                                f"sum by (profile, revision, result) (tailor_operator_prompt_test_cases{ns})",
                                "{{profile}} r{{revision}} {{result}}",
                            ),
                        ),
                        stacked=True,
                        width=24,
                    ),
                ),
            ),
            Row(
                "Evaluations",
                (
                    Panel(
                        "Accuracy per candidate, with its interval",
                        "Each finished Evaluation's accuracy per candidate and the lower "
                        "bound of its 95% interval (the recommendation compares the lower "
                        "bound with the target).",
                        (
                            q(
                                "max by (evaluation, candidate) (tailor_operator_evaluation_score"
                                '{namespace=~"$namespace", metric="accuracy", bound="value"})',
                                "{{evaluation}} {{candidate}}",
                            ),
                            q(
                                "max by (evaluation, candidate) (tailor_operator_evaluation_score"
                                '{namespace=~"$namespace", metric="accuracy", bound="low"})',
                                "{{evaluation}} {{candidate}} (lower bound)",
                            ),
                        ),
                        kind="bargauge",
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=12,
                    ),
                    Panel(
                        "Cost per question per candidate",
                        "Device-seconds per question: the candidate's wall time while it "
                        "alone was asked, times the devices its deployment held.",
                        (
                            q(
                                "max by (evaluation, candidate) "
                                f"(tailor_operator_evaluation_cost_per_query_device_seconds{ns})",
                                "{{evaluation}} {{candidate}}",
                            ),
                        ),
                        kind="bargauge",
                        unit="s",
                        width=12,
                    ),
                ),
            ),
        ),
    )


# ----------------------------------------------------------------- fine-tuning
def fine_tuning_dashboard() -> Dashboard:
    run = '{namespace=~"$namespace", name=~"$finetunejob"}'
    return Dashboard(
        uid="tailor-finetuning",
        title="Tailor / Fine-tuning",
        description="FineTuneJobs (and the training stage of RAFTJobs) while they train.",
        file="tailor-finetuning.json",
        variables=(
            Variable("namespace", "Namespace", "label_values(tailor_train_step, namespace)"),
            Variable(
                "finetunejob",
                "FineTuneJob",
                'label_values(tailor_train_step{namespace=~"$namespace"}, name)',
            ),
        ),
        rows=(
            Row(
                "Runs",
                (
                    Panel(
                        "FineTuneJobs by phase",
                        "How many FineTuneJobs are Pending, Queued, Running, Succeeded, Failed.",
                        (
                            q(
                                'sum by (phase) (tailor_operator_resources{kind="FineTuneJob"})',
                                "{{phase}}",
                            ),
                        ),
                        kind="stat",
                    ),
                    Panel(
                        "Progress",
                        "Optimizer steps done out of the run's total.",
                        (
                            q(
                                f"100 * max by (namespace, name) (tailor_train_step{run}) "
                                f"/ max by (namespace, name) (tailor_train_total_steps{run})",
                                "{{namespace}}/{{name}}",
                            ),
                        ),
                        kind="bargauge",
                        unit="percent",
                        min=0,
                        max=100,
                    ),
                ),
            ),
            Row(
                "Training",
                (
                    Panel(
                        "Loss",
                        "Training loss (mean of recent steps) and the last evaluation loss. "
                        "Evaluation loss rising while training loss falls is overfitting.",
                        (
                            q(
                                f"avg by (namespace, name) (tailor_train_loss{run})",
                                "{{name}} train",
                            ),
                            q(
                                f"avg by (namespace, name) (tailor_train_eval_loss{run})",
                                "{{name}} eval",
                            ),
                        ),
                    ),
                    Panel(
                        "Throughput",
                        "Training input tokens per second, summed over the run's pods.",
                        (
                            q(
                                f"sum by (namespace, name) (tailor_train_tokens_per_second{run})",
                                "{{namespace}}/{{name}}",
                            ),
                        ),
                        unit="tokens/s",
                    ),
                    Panel(
                        "Steps",
                        "Optimizer steps done and the run's total.",
                        (
                            q(
                                f"max by (namespace, name) (tailor_train_step{run})",
                                "{{name}} done",
                            ),
                            q(
                                f"max by (namespace, name) (tailor_train_total_steps{run})",
                                "{{name}} total",
                            ),
                        ),
                    ),
                    Panel(
                        "GPU memory",
                        "Peak GPU memory allocated by each trainer pod (CUDA only).",
                        (
                            q(
                                f"max by (namespace, name, pod) (tailor_train_gpu_memory_bytes{run})",
                                "{{name}} {{pod}}",
                            ),
                        ),
                        unit="bytes",
                    ),
                ),
            ),
            Row(
                "Scheduling and duration",
                (
                    Panel(
                        "Queued FineTuneJobs",
                        "FineTuneJobs waiting for GPUs or matching nodes, and for how long.",
                        (
                            q(
                                "max by (namespace, name) (tailor_operator_queued_for_seconds"
                                '{kind="FineTuneJob", namespace=~"$namespace"})',
                                "{{namespace}}/{{name}}",
                            ),
                        ),
                        unit="s",
                    ),
                    Panel(
                        "Training run duration",
                        "Duration of finished FineTuneJobs, by result (last 6 hours).",
                        tuple(
                            q(
                                f"histogram_quantile({level}, sum by (result, le) (rate("
                                'tailor_operator_run_duration_seconds_bucket{kind="FineTuneJob"}[6h])))',
                                f"p{round(level * 100)} {{{{result}}}}",
                            )
                            for level in (0.5, 0.95)
                        ),
                        unit="s",
                    ),
                ),
            ),
        ),
    )


# ----------------------------------------------------------------- knowledge bases
def knowledge_bases_dashboard() -> Dashboard:
    kb = '{namespace=~"$namespace", name=~"$knowledgebase"}'
    return Dashboard(
        uid="tailor-knowledgebases",
        title="Tailor / Knowledge bases",
        description="Index builds and freshness of KnowledgeBases.",
        file="tailor-knowledgebases.json",
        variables=(
            Variable(
                "namespace",
                "Namespace",
                "label_values(tailor_knowledgebase_last_indexed_timestamp_seconds, namespace)",
            ),
            Variable(
                "knowledgebase",
                "KnowledgeBase",
                'label_values(tailor_knowledgebase_last_indexed_timestamp_seconds{namespace=~"$namespace"}, name)',
            ),
        ),
        rows=(
            Row(
                "Freshness",
                (
                    Panel(
                        "KnowledgeBases by phase",
                        "Pending, Indexing, Ready or Failed (no usable index).",
                        (
                            q(
                                'sum by (phase) (tailor_operator_resources{kind="KnowledgeBase"})',
                                "{{phase}}",
                            ),
                        ),
                        kind="stat",
                        width=8,
                    ),
                    Panel(
                        "Index age",
                        "Time since each knowledge base last finished an index build.",
                        (
                            q(
                                "time() - max by (namespace, name) "
                                f"(tailor_knowledgebase_last_indexed_timestamp_seconds{kb})",
                                "{{namespace}}/{{name}}",
                            ),
                        ),
                        kind="bargauge",
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Next refresh due in",
                        "Time until each scheduled refresh; below zero the refresh is late.",
                        (
                            q(
                                "max by (namespace, name) "
                                f"(tailor_knowledgebase_next_refresh_timestamp_seconds{kb}) - time()",
                                "{{namespace}}/{{name}}",
                            ),
                        ),
                        kind="bargauge",
                        unit="s",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Index builds",
                (
                    Panel(
                        "Documents",
                        "Documents in each knowledge base's latest index (as its index job "
                        "reported while it was scraped).",
                        (
                            q(
                                "max by (namespace, name) "
                                f"(last_over_time(tailor_index_documents{kb}[1d]))",
                                "{{namespace}}/{{name}}",
                            ),
                        ),
                    ),
                    Panel(
                        "Chunks",
                        "Chunks in the latest index, and how many the last build embedded "
                        "(unchanged chunks are copied, not embedded again).",
                        (
                            q(
                                f"max by (namespace, name) (last_over_time(tailor_index_chunks{kb}[1d]))",
                                "{{name}} chunks",
                            ),
                            q(
                                "max by (namespace, name) "
                                f"(last_over_time(tailor_index_embedded_chunks_total{kb}[1d]))",
                                "{{name}} embedded",
                            ),
                        ),
                    ),
                    Panel(
                        "Index build duration",
                        "The latest build of each knowledge base, and the p95 of all builds "
                        "that finished in the last 6 hours.",
                        (
                            q(
                                "max by (namespace, name) "
                                f"(last_over_time(tailor_index_duration_seconds{kb}[1d]))",
                                "{{namespace}}/{{name}}",
                            ),
                            q(
                                "histogram_quantile(0.95, sum by (le) (rate("
                                'tailor_operator_run_duration_seconds_bucket{kind="KnowledgeBase"}[6h])))',
                                "p95 all builds",
                            ),
                        ),
                        unit="s",
                    ),
                    Panel(
                        "Retrieval latency",
                        "How long ModelDeployments wait for context from their knowledge base.",
                        quantiles(
                            "tailor_serve_retrieval_duration_seconds",
                            "namespace, deployment",
                            '{namespace=~"$namespace"}',
                            "{{deployment}}",
                            0.5,
                            0.95,
                        ),
                        unit="s",
                    ),
                ),
            ),
        ),
    )


# ----------------------------------------------------------------- serving
def serving_dashboard() -> Dashboard:
    md = '{namespace=~"$namespace", deployment=~"$deployment"}'
    errors_5xx = '{namespace=~"$namespace", deployment=~"$deployment", code=~"5.."}'
    device = "tailor_serve_request_device_seconds"
    per_request_cost = (
        f"sum by (model) (rate({device}_sum{md}[{RATE}])) "
        f"/ sum by (model) (rate({device}_count{md}[{RATE}]))"
    )
    return Dashboard(
        uid="tailor-serving",
        title="Tailor / Serving",
        description="ModelDeployments: traffic, latency, tokens, cache, adapters, RAG, cost, feedback, rollouts.",
        file="tailor-serving.json",
        variables=(
            Variable(
                "namespace", "Namespace", "label_values(tailor_serve_requests_total, namespace)"
            ),
            Variable(
                "deployment",
                "ModelDeployment",
                'label_values(tailor_serve_requests_total{namespace=~"$namespace"}, deployment)',
            ),
            Variable(
                "cost_per_device_hour",
                "Cost of one device hour",
                default="1",
            ),
        ),
        rows=(
            Row(
                "Traffic",
                (
                    Panel(
                        "Requests / s",
                        "Answered requests by model (`<deployment>` or `<deployment>/<adapter>`) "
                        "and HTTP status.",
                        (
                            q(
                                f"sum by (model, code) (rate(tailor_serve_requests_total{md}[{RATE}]))",
                                "{{model}} {{code}}",
                            ),
                        ),
                        unit="reqps",
                        stacked=True,
                    ),
                    Panel(
                        "Error ratio",
                        "Share of requests answered with an error: all errors, and 5xx only "
                        "(what the TailorServingErrorRate alert watches).",
                        (
                            q(
                                f"sum by (deployment) (rate(tailor_serve_errors_total{md}[{RATE}])) "
                                f"/ sum by (deployment) (rate(tailor_serve_requests_total{md}[{RATE}]))",
                                "{{deployment}} all",
                            ),
                            q(
                                f"sum by (deployment) (rate(tailor_serve_errors_total{errors_5xx}[{RATE}])) "
                                f"/ sum by (deployment) (rate(tailor_serve_requests_total{md}[{RATE}]))",
                                "{{deployment}} 5xx",
                            ),
                        ),
                        unit="percentunit",
                        width=6,
                    ),
                    Panel(
                        "Ready servers",
                        "Server pods that loaded their model and serve.",
                        (q(f"sum by (deployment) (tailor_serve_ready{md})", "{{deployment}}"),),
                        kind="stat",
                        width=6,
                    ),
                    Panel(
                        "Errors / s by type",
                        "Failed requests by model, status code and OpenAI error type.",
                        (
                            q(
                                f"sum by (model, code, type) (rate(tailor_serve_errors_total{md}[{RATE}]))",
                                "{{model}} {{code}} {{type}}",
                            ),
                        ),
                        unit="reqps",
                        width=24,
                    ),
                ),
            ),
            Row(
                "Latency and tokens",
                (
                    Panel(
                        "Request latency",
                        "Time from receiving a generation request to its last byte.",
                        quantiles(
                            "tailor_serve_request_duration_seconds",
                            "deployment",
                            md,
                            "{{deployment}}",
                            0.5,
                            0.95,
                            0.99,
                        ),
                        unit="s",
                    ),
                    Panel(
                        "Time to first token",
                        "Time from receiving a generation request to its first generated token.",
                        quantiles(
                            "tailor_serve_time_to_first_token_seconds",
                            "deployment",
                            md,
                            "{{deployment}}",
                            0.5,
                            0.95,
                            0.99,
                        ),
                        unit="s",
                    ),
                    Panel(
                        "Tokens / s",
                        "All tokens the engine generates per second, and the decode speed one "
                        "request sees (median).",
                        (
                            q(
                                "sum by (deployment) "
                                f"(rate(tailor_serve_engine_generated_tokens_total{md}[{RATE}]))",
                                "{{deployment}} engine",
                            ),
                            *quantiles(
                                "tailor_serve_request_tokens_per_second",
                                "deployment",
                                md,
                                "{{deployment}} per request",
                                0.5,
                            ),
                        ),
                        unit="tokens/s",
                    ),
                    Panel(
                        "Prompt and completion tokens / s",
                        "Tokens processed per second by model.",
                        (
                            q(
                                f"sum by (model) (rate(tailor_serve_prompt_tokens_total{md}[{RATE}]))",
                                "{{model}} prompt",
                            ),
                            q(
                                f"sum by (model) (rate(tailor_serve_completion_tokens_total{md}[{RATE}]))",
                                "{{model}} completion",
                            ),
                        ),
                        unit="tokens/s",
                    ),
                    Panel(
                        "In flight and queued",
                        "Generation requests being processed (what autoscaling targets) and "
                        "requests waiting for a slot in the running batch.",
                        (
                            q(
                                f"sum by (deployment) (tailor_serve_inflight_requests{md})",
                                "{{deployment}} in flight",
                            ),
                            q(
                                f"sum by (deployment) (tailor_serve_queue_depth{md})",
                                "{{deployment}} queued",
                            ),
                        ),
                    ),
                    Panel(
                        "Batch size",
                        "Sequences in each forward pass of the continuous-batching engine.",
                        quantiles(
                            "tailor_serve_batch_size", "deployment", md, "{{deployment}}", 0.5, 0.95
                        ),
                    ),
                ),
            ),
            Row(
                VLLM_ROW,
                (
                    Panel(
                        "vLLM requests running and waiting",
                        "`spec.engine: vllm`: sequences in vLLM's running batch and requests "
                        "waiting for a slot (vLLM's own gauges, re-exported by the gateway).",
                        (
                            q(
                                f"sum by (deployment) (vllm:num_requests_running{md})",
                                "{{deployment}} running",
                            ),
                            q(
                                f"sum by (deployment) (vllm:num_requests_waiting{md})",
                                "{{deployment}} waiting",
                            ),
                        ),
                        width=8,
                    ),
                    Panel(
                        "vLLM KV cache usage",
                        "Share of vLLM's paged KV cache in use (the busiest replica); near 1, "
                        "vLLM preempts sequences.",
                        (
                            q(
                                f"max by (deployment) (vllm:kv_cache_usage_perc{md})",
                                "{{deployment}}",
                            ),
                        ),
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=8,
                    ),
                    Panel(
                        "vLLM prefix cache hit ratio",
                        "Share of prompt tokens vLLM found in its prefix cache "
                        "(`--enable-prefix-caching`: system prompts and few-shot blocks).",
                        (
                            q(
                                f"sum by (deployment) (rate(vllm:prefix_cache_hits_total{md}[{RATE}])) "
                                f"/ sum by (deployment) (rate(vllm:prefix_cache_queries_total{md}[{RATE}]))",
                                "{{deployment}}",
                            ),
                        ),
                        unit="percentunit",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Cache, adapters and retrieval",
                (
                    Panel(
                        "Cache hit ratio",
                        "Share of cacheable (deterministic) requests answered from the response cache.",
                        (
                            q(
                                f"sum by (deployment) (rate(tailor_serve_cache_hits_total{md}[{RATE}])) "
                                f"/ (sum by (deployment) (rate(tailor_serve_cache_hits_total{md}[{RATE}])) "
                                f"+ sum by (deployment) (rate(tailor_serve_cache_misses_total{md}[{RATE}])))",
                                "{{deployment}}",
                            ),
                        ),
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=8,
                    ),
                    Panel(
                        "Adapter usage",
                        "Generation requests per second by adapter (`base` is the base model).",
                        (
                            q(
                                "sum by (deployment, adapter) "
                                f"(rate(tailor_serve_adapter_requests_total{md}[{RATE}]))",
                                "{{deployment}} {{adapter}}",
                            ),
                        ),
                        unit="reqps",
                        stacked=True,
                        width=8,
                    ),
                    Panel(
                        "Retrieval",
                        "Time to fetch context from the knowledge base, and requests answered "
                        "without context because the vector store was unavailable.",
                        (
                            *quantiles(
                                "tailor_serve_retrieval_duration_seconds",
                                "deployment",
                                md,
                                "{{deployment}}",
                                0.5,
                                0.95,
                            ),
                            q(
                                "sum by (deployment) "
                                f"(rate(tailor_serve_retrieval_failures_total{md}[{RATE}]))",
                                "{{deployment}} failures/s",
                            ),
                        ),
                        unit="s",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Cost and feedback",
                (
                    Panel(
                        "Device seconds per request",
                        "Estimated cost of a request: its share of the wall time of the batches "
                        "it ran in.",
                        (q(per_request_cost, "{{model}}"),),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Cost per 1k requests",
                        "Device seconds per request priced at the dashboard's "
                        "`cost_per_device_hour` variable.",
                        (
                            q(
                                f"1000 * $cost_per_device_hour / 3600 * ({per_request_cost})",
                                "{{model}}",
                            ),
                        ),
                        width=8,
                    ),
                    Panel(
                        "Feedback",
                        "Thumbs up and down on responses per hour (POST /v1/feedback), and the "
                        "share of thumbs up over the last day (satisfaction) per model and "
                        "prompt-profile revision.",
                        (
                            q(
                                f"sum by (model, rating) (increase(tailor_serve_feedback_total{md}[1h]))",
                                "{{model}} {{rating}}",
                            ),
                            q(
                                "sum by (model, revision) (increase(tailor_serve_feedback_total"
                                '{namespace=~"$namespace", deployment=~"$deployment", rating="up"}[1d])) '
                                "/ sum by (model, revision) "
                                f"(increase(tailor_serve_feedback_total{md}[1d]))",
                                "{{model}} {{revision}} share up",
                            ),
                        ),
                        width=8,
                    ),
                ),
            ),
            Row(
                "Rollouts",
                (
                    Panel(
                        "Rollout weight",
                        "The candidate's weight now (spec.rollout; 0 without one or after a "
                        "rollback, 100 once promoted).",
                        (
                            q(
                                f"max by (deployment) (tailor_serve_rollout_weight{md})",
                                "{{deployment}}",
                            ),
                        ),
                        unit="percent",
                        width=6,
                    ),
                    Panel(
                        "Answers per variant",
                        "Requests per second by variant and outcome (shadow: the candidate's "
                        "unseen answers, skipped when the server was busy).",
                        (
                            q(
                                "sum by (variant, outcome) "
                                f"(rate(tailor_serve_rollout_requests_total{md}[5m]))",
                                "{{variant}} {{outcome}}",
                            ),
                        ),
                        unit="reqps",
                        width=6,
                    ),
                    Panel(
                        "Satisfaction per variant",
                        "Share of rated answers rated up, per variant, over the last hour.",
                        (
                            q(
                                "sum by (variant) (increase(tailor_serve_rollout_feedback_total"
                                '{namespace=~"$namespace", deployment=~"$deployment", rating="up"}[1h])) '
                                "/ sum by (variant) "
                                f"(increase(tailor_serve_rollout_feedback_total{md}[1h]))",
                                "{{variant}}",
                            ),
                        ),
                        unit="percentunit",
                        width=6,
                    ),
                    Panel(
                        "p95 latency per variant",
                        "95th percentile seconds per answer, per variant.",
                        (
                            q(
                                "histogram_quantile(0.95, sum by (variant, le) "
                                f"(rate(tailor_serve_rollout_latency_seconds_bucket{md}[5m])))",
                                "{{variant}}",
                            ),
                        ),
                        unit="s",
                        width=6,
                    ),
                ),
            ),
        ),
    )


DASHBOARDS: tuple[Callable[[], Dashboard], ...] = (
    operator_dashboard,
    fine_tuning_dashboard,
    knowledge_bases_dashboard,
    serving_dashboard,
)


def vllm_metric_names(expr: str | None = None) -> set[str]:
    """The vLLM sample names a query reads, or (no argument) all the dashboards read."""
    if expr is not None:
        return set(re.findall(r"\bvllm:[a-z_:]+", expr))
    return {
        name
        for build_dashboard in DASHBOARDS
        for panel in build_dashboard().panels()
        for query in panel.queries
        for name in vllm_metric_names(query.expr)
    }


# ----------------------------------------------------------------- JSON through the SDK
def _legend() -> common.VizLegendOptions:
    return (
        common.VizLegendOptions()
        .show_legend(True)
        .display_mode(LegendDisplayMode.LIST)
        .placement(LegendPlacement.BOTTOM)
    )


def _panel_builder(panel: Panel) -> Any:
    last_value = common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
    if panel.kind == "stat":
        builder: Any = stat.Panel().graph_mode(BigValueGraphMode.AREA).reduce_options(last_value)
    elif panel.kind == "bargauge":
        builder = (
            bargauge.Panel()
            .reduce_options(last_value)
            .orientation(VizOrientation.HORIZONTAL)
            .display_mode(BarGaugeDisplayMode.GRADIENT)
        )
    else:
        builder = timeseries.Panel().legend(_legend()).fill_opacity(10 if not panel.stacked else 60)
        if panel.stacked:
            builder = builder.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    builder = (
        builder.title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .span(panel.width)
        .height(panel.height)
    )
    if panel.min is not None:
        builder = builder.min(panel.min)
    if panel.max is not None:
        builder = builder.max(panel.max)
    for index, query in enumerate(panel.queries):
        target = (
            prometheus.Dataquery()
            .expr(query.expr)
            .legend_format(query.legend or "__auto")
            .ref_id(chr(ord("A") + index))
            .datasource(DATASOURCE)
        )
        if panel.kind != "timeseries":
            target = target.instant()
        builder = builder.with_target(target)
    return builder


def _variable_builder(variable: Variable) -> Any:
    if not variable.query:
        return (
            dashboard.TextBoxVariable(variable.name)
            .label(variable.label)
            .default_value(variable.default)
            .current(VariableOption(text=variable.default, value=variable.default))
        )
    return (
        dashboard.QueryVariable(variable.name)
        .label(variable.label)
        .datasource(DATASOURCE)
        .query(variable.query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(text="All", value="$__all"))
    )


def build(spec: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard JSON model of ``spec``."""
    board = (
        dashboard.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(["tailor"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .editable()
        .with_variable(
            dashboard.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
            .hide(VariableHide.DONT_HIDE)
        )
    )
    for variable in spec.variables:
        board = board.with_variable(_variable_builder(variable))
    for row in spec.rows:
        board = board.with_row(dashboard.Row(row.title))
        for panel in row.panels:
            board = board.with_panel(_panel_builder(panel))
    model: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    for number, panel_json in enumerate(model["panels"], start=1):
        panel_json["id"] = number
    return model


def dashboard_json(spec: Dashboard) -> str:
    return json.dumps(build(spec), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generated_files(chart: Path = CHART) -> dict[Path, str]:
    """Every file this module (and the alerts module) generates, by path."""
    files = {
        chart / DASHBOARDS_DIR / spec.file: dashboard_json(spec)
        for spec in (make() for make in DASHBOARDS)
    }
    files[chart / alerts.RULES_FILE] = alerts.rules_file_text()
    files[chart / alerts.TEMPLATE_FILE] = alerts.prometheus_rule_template()
    return files


def write(chart: Path = CHART, check: bool = False) -> list[Path]:
    """Write the generated files; with ``check``, only return those that differ."""
    drift = []
    for path, text in generated_files(chart).items():
        if path.exists() and path.read_text() == text:
            continue
        drift.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return drift


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tailor.observability.dashboards",
        description="Write the chart's Grafana dashboards and Prometheus rules.",
    )
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart directory")
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    drift = write(args.chart, args.check)
    if args.check and drift:
        print("out of date (run `python -m tailor.observability.dashboards`):", file=sys.stderr)
        for path in drift:
            print(f"  {path}", file=sys.stderr)
        return 1
    for path in drift:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
