"""Dashboards and alerts: generated from code (no drift), built only from metrics the code
exports, valid for ``promtool`` and firing when they should (``promtool test rules`` on
synthetic series). On the dev control plane, a real Prometheus scrapes a real operator
running with the chart's ServiceAccount (so the chart's RBAC is what it runs under), a
real serving workload on the builtin model, and processes exposing the trainer's and the
index job's metric definitions; every dashboard and alert query then runs on it.

Prometheus comes from Debian's ``prometheus`` package (``promtool`` too); tests that need
it skip, naming the package, where the binaries are absent.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from tailor.devcluster.kube import Kube, create_namespace, delete_namespace
from tailor.devcluster.kueue import Kueue
from tailor.observability import alerts, dashboards
from tests.chart.helpers import CHART, ROOT, helm

RATE_INTERVAL = "1m"
"""What Grafana's ``$__rate_interval`` becomes in these tests (Prometheus scrapes every 1 s)."""


# ----------------------------------------------------------------- what the code exports
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum", ""),
}


def defined_metrics() -> dict[str, str]:
    """Every ``tailor_*`` metric the package defines, with its type, read from the source:
    a call such as ``Counter("tailor_...", ...)`` or ``gauge("tailor_...", ...)``. Reading
    the source keeps this test fast (the index workload imports torch); the registries
    cross-check it below and a real Prometheus checks the names on the control plane."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "operator" / "tailor").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and str(first.value).startswith("tailor_")):
                continue
            callee = str(getattr(node.func, "id", None) or getattr(node.func, "attr", ""))
            kind = next((k for k in SUFFIXES if k in callee.lower()), None)
            if kind:
                found[str(first.value)] = kind
    return found


def exported_names() -> set[str]:
    """The sample names Prometheus sees: counters end in _total, histograms have series."""
    return {
        name.removesuffix("_total") + suffix
        for name, kind in defined_metrics().items()
        for suffix in SUFFIXES[kind]
    }


def test_reading_the_source_finds_what_the_registries_hold() -> None:
    import tailor.observability.operator
    import tailor.observability.training  # noqa: F401
    from tailor.observability.serving import ServingMetrics

    registered = {
        family.name: family.type
        for registry in (REGISTRY, ServingMetrics("names").registry)
        for family in registry.collect()
        if family.name.startswith(
            ("tailor_operator", "tailor_knowledgebase", "tailor_train", "tailor_serve")
        )
    }
    defined = {
        name.removesuffix("_total"): kind
        for name, kind in defined_metrics().items()
        if not name.startswith("tailor_index")
    }
    assert defined == registered
    assert {"tailor_index_documents", "tailor_index_chunks"} <= set(defined_metrics())


@dataclass(frozen=True)
class UsedQuery:
    """One PromQL expression of a dashboard panel or an alert."""

    where: str
    expr: str


def dashboard_models() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((CHART / "dashboards").glob("*.json"))]


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in model["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_queries() -> list[UsedQuery]:
    return [
        UsedQuery(f"{model['title']} / {panel['title']} / {target['refId']}", target["expr"])
        for model in dashboard_models()
        for panel in panels(model)
        for target in panel["targets"]
    ]


def queries_by_panel() -> dict[str, list[UsedQuery]]:
    """Dashboard queries grouped by "dashboard / panel"."""
    grouped: dict[str, list[UsedQuery]] = {}
    for query in dashboard_queries():
        grouped.setdefault(query.where.rsplit(" / ", 1)[0], []).append(query)
    return grouped


def variable_queries() -> list[UsedQuery]:
    return [
        UsedQuery(f"{model['title']} / ${variable['name']}", variable["query"])
        for model in dashboard_models()
        for variable in model["templating"]["list"]
        if variable["type"] == "query"
    ]


def alert_queries(thresholds: dict[str, float] | None = None) -> list[UsedQuery]:
    return [
        UsedQuery(rule["alert"], rule["expr"])
        for group in alerts.rule_groups(thresholds)
        for rule in group["rules"]
    ]


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\btailor_[a-z0-9_]+\b", expr))
    if re.search(r"\bup\{", expr):
        names.add("up")
    return names


def for_prometheus(expr: str) -> str:
    """A dashboard expression with Grafana's variables as "All" would set them."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$cost_per_device_hour", "1")
    return re.sub(r"\$[a-z_]+", ".*", expr)


def every_query() -> list[UsedQuery]:
    return dashboard_queries() + variable_queries() + alert_queries()


# ----------------------------------------------------------------- generated files
def test_generated_dashboards_and_rules_are_up_to_date() -> None:
    drift = dashboards.write(CHART, check=True)
    assert not drift, f"run `python -m tailor.observability.dashboards`: {drift}"


def test_every_metric_used_is_exported_by_the_code() -> None:
    exported = exported_names() | {"up"}
    for query in every_query():
        missing = metric_names(query.expr) - exported
        assert not missing, f"{query.where} uses {missing}, which no code exports"


VLLM_METRICS = Path(__file__).with_name("fixtures") / "vllm-0.26.0-metrics.txt"


def vllm_only(queries: list[UsedQuery]) -> bool:
    """Every query of a panel reads vLLM's metrics alone (no Tailor metric)."""
    return all(dashboards.vllm_metric_names(q.expr) and not metric_names(q.expr) for q in queries)


def test_the_vllm_row_reads_what_vllm_exports() -> None:
    """The serving dashboard's vLLM row uses names vLLM 0.26.0 exports (its source's list;
    tests/gpu/serve.sh checks them against a running vLLM), and only that row needs vLLM."""
    exported = {line for line in VLLM_METRICS.read_text().splitlines() if line and line[0] != "#"}
    used = dashboards.vllm_metric_names()
    assert used and used <= exported, used - exported
    serving = json.loads((CHART / "dashboards" / "tailor-serving.json").read_text())
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for panel in serving["panels"]:  # a row's panels follow it (or sit inside it, collapsed)
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], list(panel.get("panels", [])))
        else:
            current.append(panel)
    needs_vllm = {panel for panel, queries in queries_by_panel().items() if vllm_only(queries)}
    in_row = {f"{serving['title']} / {p['title']}" for p in rows[dashboards.VLLM_ROW]}
    assert needs_vllm == in_row and in_row, (needs_vllm, in_row)


REQUIRED = {
    "tailor-operator": {
        "tailor_operator_resources",
        "tailor_operator_reconciliations_total",
        "tailor_operator_queued_for_seconds",
        "tailor_operator_queued_seconds_bucket",
        "tailor_operator_reconcile_duration_seconds_bucket",
    },
    "tailor-finetuning": {
        "tailor_train_loss",
        "tailor_train_eval_loss",
        "tailor_train_tokens_per_second",
        "tailor_train_step",
        "tailor_train_total_steps",
        "tailor_train_gpu_memory_bytes",
    },
    "tailor-knowledgebases": {
        "tailor_index_documents",
        "tailor_index_chunks",
        "tailor_index_duration_seconds",
        "tailor_knowledgebase_last_indexed_timestamp_seconds",
        "tailor_knowledgebase_next_refresh_timestamp_seconds",
    },
    "tailor-serving": {
        "tailor_serve_requests_total",
        "tailor_serve_request_duration_seconds_bucket",
        "tailor_serve_time_to_first_token_seconds_bucket",
        "tailor_serve_engine_generated_tokens_total",
        "tailor_serve_cache_hits_total",
        "tailor_serve_adapter_requests_total",
        "tailor_serve_retrieval_duration_seconds_bucket",
        "tailor_serve_request_device_seconds_sum",
        "tailor_serve_feedback_total",
    },
}


def test_dashboards_answer_what_they_promise_and_are_well_formed() -> None:
    models = {model["uid"]: model for model in dashboard_models()}
    assert sorted(models) == sorted(REQUIRED)
    assert len({model["title"] for model in models.values()}) == len(models)
    for uid, model in models.items():
        used = set().union(*(metric_names(t["expr"]) for p in panels(model) for t in p["targets"]))
        assert REQUIRED[uid] <= used, f"{uid} lacks {REQUIRED[uid] - used}"
        variables = {v["name"] for v in model["templating"]["list"]}
        assert "datasource" in variables
        ids = [panel["id"] for panel in model["panels"]]
        assert len(ids) == len(set(ids))
        for panel in panels(model):
            where = f"{uid} / {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["description"], where
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), where
            for target in panel["targets"]:
                undefined = set(re.findall(r"\$([a-z_]+)", target["expr"])) - variables
                assert undefined <= {"__rate_interval"}, f"{where}: ${undefined} undefined"


def test_docs_describe_every_metric_dashboard_and_alert() -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    for name, kind in defined_metrics().items():
        documented = name.removesuffix("_total") + ("_total" if kind == "counter" else "")
        assert f"`{documented}`" in docs, f"docs/observability.md lacks {documented}"
    for alert in alerts.all_alerts():
        assert f"\n### {alert.name}\n" in docs, f"docs/observability.md lacks {alert.name}"
    for model in dashboard_models():
        assert f"### {model['title']} (`{model['uid']}`)" in docs


# ----------------------------------------------------------------- promtool
def prometheus_binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found: apt-get install prometheus (Debian's package has both)")
    return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_rule_file_passes_promtool_check() -> None:
    result = promtool("check", "rules", str(CHART / alerts.RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts.all_alerts())} rules found" in result.stdout


def test_prometheus_rule_from_helm_matches_the_rule_file_and_takes_thresholds(
    tmp_path: Path,
) -> None:
    def prometheus_rule(values: dict[str, Any]) -> dict[str, Any]:
        values = {
            "prometheusRule": {"enabled": True, **values},
            "serviceMonitor": {"enabled": True},
        }
        out = helm("template", "t", str(CHART), "--show-only", alerts.TEMPLATE_FILE, values=values)
        rule: dict[str, Any] = yaml.safe_load(out.stdout)
        return rule

    default = prometheus_rule({})
    plain = yaml.safe_load((CHART / alerts.RULES_FILE).read_text())
    assert default["spec"]["groups"] == plain["groups"]

    thresholds = {"queuedSeconds": 600, "servingErrorRatio": 0.25}
    custom = prometheus_rule({"thresholds": thresholds, "ruleLabels": {"team": "ml"}})
    rules = {r["alert"]: r for g in custom["spec"]["groups"] for r in g["rules"]}
    assert rules["TailorRunQueuedTooLong"]["expr"].endswith(") > 600")
    assert rules["TailorServingErrorRate"]["expr"].endswith("> 0.25")
    assert all(rule["labels"]["team"] == "ml" for rule in rules.values())
    assert "{{ $labels.deployment }}" in rules["TailorServingErrorRate"]["annotations"]["summary"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": custom["spec"]["groups"]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr

    without_monitor = helm(
        "template", "t", str(CHART), "--show-only", alerts.TEMPLATE_FILE,
        values={"prometheusRule": {"enabled": True}},
    ).stdout  # fmt: skip
    assert "TailorOperatorDown" not in without_monitor  # nothing scrapes the operator


# Synthetic series, one minute apart, and when each alert must (not) fire.
RULE_TESTS = textwrap.dedent(
    """
    rule_files: [rules.yaml]
    evaluation_interval: 1m
    tests:
    - interval: 1m
      input_series:
      # A queued run whose gauge the operator has not refreshed (stays at 5 s).
      - series: 'tailor_operator_queued_for_seconds{kind="FineTuneJob",namespace="ml",name="big"}'
        values: '5x60'
      - series: 'tailor_operator_resources{kind="FineTuneJob",phase="Failed"}'
        values: '0 0 1x30'
      - series: 'tailor_operator_resources{kind="FineTuneJob",phase="Succeeded"}'
        values: '3x30'
      - series: 'tailor_operator_resources{kind="KnowledgeBase",phase="Failed"}'
        values: '0x30'
      - series: 'tailor_operator_resources{kind="ModelDeployment",phase="Degraded"}'
        values: '1x30'
      - series: 'tailor_operator_reconciliations_total{kind="KnowledgeBase",result="error"}'
        values: '0+3x30'
      - series: 'tailor_operator_reconciliations_total{kind="KnowledgeBase",result="ok"}'
        values: '0+7x30'
      - series: 'tailor_operator_reconciliations_total{kind="FineTuneJob",result="ok"}'
        values: '0+10x30'
      # Refresh due at t=10m; nothing finished since.
      - series: 'tailor_knowledgebase_next_refresh_timestamp_seconds{namespace="ml",name="docs"}'
        values: '600x60'
      - series: 'tailor_serve_requests_total{namespace="ml",deployment="chat",model="chat",endpoint="/v1/chat/completions",code="200"}'
        values: '0+54x30'
      - series: 'tailor_serve_requests_total{namespace="ml",deployment="chat",model="chat",endpoint="/v1/chat/completions",code="500"}'
        values: '0+6x30'
      - series: 'tailor_serve_errors_total{namespace="ml",deployment="chat",model="chat",code="500",type="server_error"}'
        values: '0+6x30'
      - series: 'tailor_serve_request_duration_seconds_bucket{namespace="ml",deployment="chat",model="chat",le="20"}'
        values: '0x30'
      - series: 'tailor_serve_request_duration_seconds_bucket{namespace="ml",deployment="chat",model="chat",le="40"}'
        values: '0+60x30'
      - series: 'tailor_serve_request_duration_seconds_bucket{namespace="ml",deployment="chat",model="chat",le="+Inf"}'
        values: '0+60x30'
      - series: 'tailor_serve_ready{namespace="ml",deployment="chat",pod="chat-1"}'
        values: '0x30'
      - series: 'tailor_serve_ready{namespace="ml",deployment="chat",pod="chat-2"}'
        values: '1x30'
      - series: 'tailor_serve_retrieval_failures_total{namespace="ml",deployment="chat"}'
        values: '0+2x30'
      alert_rule_test:
      - {eval_time: 4m, alertname: TailorOperatorDown, exp_alerts: []}
      - eval_time: 6m
        alertname: TailorOperatorDown
        exp_alerts: [{exp_labels: {severity: critical}}]
      - {eval_time: 10m, alertname: TailorReconcileErrors, exp_alerts: []}
      - eval_time: 27m
        alertname: TailorReconcileErrors
        exp_alerts: [{exp_labels: {severity: warning, kind: KnowledgeBase}}]
      - {eval_time: 1m, alertname: TailorFineTuneJobFailed, exp_alerts: []}
      - eval_time: 3m
        alertname: TailorFineTuneJobFailed
        exp_alerts: [{exp_labels: {severity: warning, kind: FineTuneJob}}]
      - {eval_time: 20m, alertname: TailorRunQueuedTooLong, exp_alerts: []}
      - eval_time: 40m
        alertname: TailorRunQueuedTooLong
        exp_alerts:
        - exp_labels: {severity: warning, kind: FineTuneJob, namespace: ml, name: big}
          exp_annotations:
            summary: FineTuneJob ml/big is queued.
            description: >-
              FineTuneJob ml/big has waited 40m 0s for nodes that can run it (Unschedulable).
              Its Scheduled condition carries the scheduler's message: usually not enough
              GPUs, or a nodeSelector/toleration no node matches.
            runbook: docs/observability.md#tailorrunqueuedtoolong
      - {eval_time: 20m, alertname: TailorKnowledgeBaseFailed, exp_alerts: []}
      - {eval_time: 20m, alertname: TailorKnowledgeBaseStale, exp_alerts: []}
      - eval_time: 30m
        alertname: TailorKnowledgeBaseStale
        exp_alerts:
        - exp_labels: {severity: warning, namespace: ml, name: docs}
          exp_annotations:
            summary: KnowledgeBase ml/docs is stale.
            description: >-
              The scheduled refresh of KnowledgeBase ml/docs was due 20m 0s ago and has not
              finished: the previous index keeps serving older content. Look at the
              LastBuildSucceeded condition and the latest index Job.
            runbook: docs/observability.md#tailorknowledgebasestale
      - {eval_time: 8m, alertname: TailorServingErrorRate, exp_alerts: []}
      - eval_time: 20m
        alertname: TailorServingErrorRate
        exp_alerts: [{exp_labels: {severity: critical, namespace: ml, deployment: chat}}]
      - {eval_time: 10m, alertname: TailorServingLatencyHigh, exp_alerts: []}
      - eval_time: 20m
        alertname: TailorServingLatencyHigh
        exp_alerts: [{exp_labels: {severity: warning, namespace: ml, deployment: chat}}]
      - {eval_time: 14m, alertname: TailorServerNotReady, exp_alerts: []}
      - eval_time: 16m
        alertname: TailorServerNotReady
        exp_alerts: [{exp_labels: {severity: warning, namespace: ml, deployment: chat, pod: chat-1}}]
      - {eval_time: 14m, alertname: TailorModelDeploymentUnavailable, exp_alerts: []}
      - eval_time: 16m
        alertname: TailorModelDeploymentUnavailable
        exp_alerts: [{exp_labels: {severity: warning, kind: ModelDeployment, phase: Degraded}}]
      - {eval_time: 5m, alertname: TailorRetrievalFailing, exp_alerts: []}
      - eval_time: 15m
        alertname: TailorRetrievalFailing
        exp_alerts: [{exp_labels: {severity: warning, namespace: ml, deployment: chat}}]
    """
)


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    tests = yaml.safe_load(RULE_TESTS)
    cases = tests["tests"][0]["alert_rule_test"]
    assert {c["alertname"] for c in cases} == {a.name for a in alerts.all_alerts()}
    # Annotations are compared only where a case spells them out.
    spelled = {c["alertname"] for c in cases for a in c["exp_alerts"] if "exp_annotations" in a}
    groups = alerts.rule_groups()
    for group in groups:
        for rule in group["rules"]:
            if rule["alert"] not in spelled:
                del rule["annotations"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, width=1000))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ----------------------------------------------------------------- a real Prometheus
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Processes:
    """Child processes of the module, each with its log file, stopped at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str) -> bool:
        return self.running[name].poll() is None

    def stop_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


EXPORTER = """
import sys, time
from tailor.api.workloads import OwnerRef
from tailor.observability.training import TrainingMetrics, serve_metrics
from tailor.workloads.knowledge.index import IndexMetrics, IndexStats

train = TrainingMetrics("work", "torchhub-lora")
for gauge, value in ((train.loss, 1.9), (train.eval_loss, 2.1), (train.tokens_per_second, 850),
                     (train.step, 40), (train.total_steps, 100), (train.gpu_memory_bytes, 3.2e9)):
    gauge.set(value)
serve_metrics(int(sys.argv[1]))
index = IndexMetrics(OwnerRef(kind="KnowledgeBase", namespace="work", name="torchhub-docs"),
                     int(sys.argv[2]))
index.embedded.inc(94)
index.finished(IndexStats(alias="work-torchhub-docs", documents=94, chunks=94, embedded=94,
                          seconds=12.5))
time.sleep(900)
"""


def example(kind: str, name: str | None = None, **spec: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(
        (ROOT / "docs" / "examples" / f"{kind}.yaml").read_text()
    )
    if name:
        manifest["metadata"]["name"] = name
    manifest["spec"].update(spec)
    return manifest


def service_account_kubeconfig(kube: Kube, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a TokenRequest token)."""
    token = kube.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout
    config = json.loads(kube.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    cluster = config["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": account, "user": {"token": token.strip()}}],
                "contexts": [
                    {"name": account, "context": {"cluster": cluster["name"], "user": account}}
                ],
                "current-context": account,
            }
        )
    )
    return path


@dataclass
class Stack:
    """What the module runs: the cluster objects, the processes and Prometheus."""

    kube: Kube
    system: str
    work: str
    processes: Processes
    prometheus: str
    serve: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            answer = get_json(url)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{expr}: {error.read().decode()}") from error
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def names(self) -> set[str]:
        return set(get_json(f"{self.prometheus}/api/v1/label/__name__/values")["data"])


@pytest.fixture(scope="module")
def stack(
    chart_cluster: Kube, kueue: Kueue, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    prometheus = prometheus_binary("prometheus")  # skips before anything starts
    kube = chart_cluster
    tmp = tmp_path_factory.mktemp("observability")
    processes = Processes(tmp)
    system, work = f"tailor-obs-{os.getpid()}", f"work-{os.getpid()}"
    ports = {
        name: free_port() for name in ("serve", "operator", "health", "train", "index", "prom")
    }
    try:
        # The serving workload loads its model meanwhile (the slowest start). It rolls an
        # (untrained) adapter out against the base model, for the Rollouts row; one
        # session for every request (no key, sticky by key): the cache check stays true.
        candidate = untrained_adapter(tmp / "artifacts" / "v2")
        rollout = {"candidate": {"adapter": "v2"}, "steps": [{"weight": 50}],
                   "sticky": {"by": "apiKey"}}  # fmt: skip
        serve_spec = {
            "spec": {"baseModel": {"builtin": "smollm2-135m-instruct"}, "knowledgeBaseRef": {"name": "docs"},
                     "adapters": [{"name": "v2", "pvc": {"claimName": "adapters", "path": "v2"}}],
                     "rollout": rollout},
            "adapters": [{"name": "v2", "path": str(candidate)}],
            "routing": {"id": "obs", "step": 0, "weight": 50, "rollout": rollout},
            "servedName": "smol",
            "host": "127.0.0.1",
            "port": ports["serve"],
            "knowledgeBase": {"alias": "docs", "qdrant": {"url": "http://127.0.0.1:9"}},
            "owner": {"kind": "ModelDeployment", "namespace": work, "name": "smol"},
            "paths": {"artifacts": str(tmp / "artifacts")},
            "reporter": {"kind": "none"},
        }  # fmt: skip
        (tmp / "serve.json").write_text(json.dumps(serve_spec))
        python = sys.executable
        processes.start(
            "serve",
            [python, "-m", "tailor.workloads.serving.app", "--spec", str(tmp / "serve.json")],
        )
        processes.start(
            "exporter", [python, "-c", EXPORTER, str(ports["train"]), str(ports["index"])]
        )

        # The chart, namespaced: the operator may act in `work` only.
        for namespace in (system, work):
            create_namespace(kube, namespace)
        helm(
            "install", "obs", str(CHART), "--namespace", system, "--wait", "--timeout", "120s",
            values={"watchNamespaces": [work]}, kube=kube,
        )  # fmt: skip
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"{work}-artifacts"},
                "spec": {
                    "capacity": {"storage": "50Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "hostPath": {"path": f"/tmp/tailor-test-volumes/{work}"},
                    "claimRef": {"namespace": work, "name": "tailor-artifacts"},
                    "persistentVolumeReclaimPolicy": "Retain",
                },
            }
        )
        # Kueue, so a queued run is admitted under the chart's RBAC (the Kueue panels)
        kueue.gpu_queue(work, gpus=8, namespaces=[work])
        config = service_account_kubeconfig(kube, system, "obs-tailor", tmp / "operator.kubeconfig")
        processes.start(
            "operator",
            [
                python, "-m", "tailor.cli", "operator", "run", "--namespace", work,
                "--metrics-port", str(ports["operator"]), "--health-port", str(ports["health"]),
            ],
            env={
                "KUBECONFIG": str(config),
                "TAILOR_IMAGE": "tailor-workloads:test",
                "TAILOR_PROGRESS_INTERVAL_SECONDS": "1",
            },
        )  # fmt: skip

        prometheus_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "tailor-operator",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{ports['operator']}"]}],
                },
                {
                    "job_name": "tailor-server",
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{ports['serve']}"],
                            "labels": {"namespace": work, "pod": "smol-0"},
                        }
                    ],
                },
                {
                    "job_name": "tailor-trainer",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{ports['train']}"]}],
                },
                {
                    "job_name": "tailor-indexer",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{ports['index']}"]}],
                },
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
        processes.start(
            "prometheus",
            [
                prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{ports['prom']}",
                "--log.level=warn",
            ],
        )
        stack = Stack(
            kube,
            system,
            work,
            processes,
            f"http://127.0.0.1:{ports['prom']}",
            f"http://127.0.0.1:{ports['serve']}",
        )

        # Work for the operator: a fine-tune that succeeds, two that wait for GPUs (one is
        # then suspended, leaving the queue), a knowledge base, a prompt profile, a
        # deployment that needs all three and an Evaluation of that deployment.
        def fine_tune(name: str, gpus: int) -> dict[str, Any]:
            return example(
                "finetunejob", name, resources={"gpus": gpus, "cpu": "1", "memory": "1Gi"}
            )

        kube.apply(
            [
                fine_tune("torchhub-lora", 0),
                fine_tune("waiting", 8),
                fine_tune("paused", 8),
                {
                    **fine_tune("queued", 1),
                    "spec": {**fine_tune("queued", 1)["spec"], "queueName": "gpus"},
                },
                example("knowledgebase"),
                example("promptprofile"),
                example("modeldeployment"),
                example("evaluation"),  # its Job completes under kwok: the Evaluations row
            ],
            "-n",
            work,
        )

        def phase(kind: str, name: str) -> str:
            return str((kube.get_json(kind, name, "-n", work).get("status") or {}).get("phase"))

        wait_for("paused Queued", lambda: phase("ftj", "paused") == "Queued")
        kube.kubectl(
            "patch", "ftj", "paused", "-n", work, "--type=merge", "-p", '{"spec":{"suspend":true}}'
        )
        for kind, name, wanted in (
            ("ftj", "torchhub-lora", "Succeeded"),
            ("ftj", "waiting", "Queued"),
            ("ftj", "paused", "Suspended"),
            ("ftj", "queued", "Succeeded"),
            ("kb", "torchhub-docs", "Ready"),
            ("pp", "api-assistant", "Valid"),
            ("md", "api-assistant", "Ready"),
            ("evaluation", "torchhub-ladder", "Succeeded"),
        ):
            wait_for(f"{kind} {name} {wanted}", lambda: phase(kind, name) == wanted)  # noqa: B023

        # Traffic for the server, once Prometheus scrapes it (counters then rise in range).
        wait_for(
            "serve ready",
            lambda: urllib.request.urlopen(f"{stack.serve}/readyz").status == 200,
            timeout=240,
        )
        wait_for("prometheus up", lambda: stack.query('up{job="tailor-server"} == 1'))
        send_traffic(stack.serve)
        yield stack
    finally:
        # Delete the resources while the operator runs: it removes its finalizers.
        kube.kubectl(
            "delete", "ftj,kb,pp,md,evaluation", "--all", "-n", work, "--wait=true",
            "--timeout=60s",
            check=False, timeout=90,
        )  # fmt: skip
        processes.stop_all()
        kube.kubectl("delete", "clusterqueue", work, "--ignore-not-found", "--wait=false")
        if os.environ.get("TAILOR_SHOW_LOGS"):
            for name in processes.running:
                print(f"===== {name}\n{processes.log(name)[-5000:]}")
        helm("uninstall", "obs", "--namespace", system, kube=kube, check=False)
        for namespace in (work, system):
            delete_namespace(kube, namespace)
        kube.kubectl("delete", "pv", f"{work}-artifacts", "--ignore-not-found", "--wait=false")


def untrained_adapter(out: Path) -> Path:
    """A LoRA adapter of the builtin model as initialised (its B is zero: it answers as the
    base model does); what a rollout's candidate needs to be routed to."""
    from peft import LoraConfig, get_peft_model

    from tailor.api.common import ModelSource
    from tailor.api.workloads import Paths
    from tailor.workloads.io.model_loading import load_causal_lm

    model = load_causal_lm(ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts=str(out)))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(out)
    return out


def send_traffic(base: str) -> None:
    """Requests that exercise every serving metric: generations (cached and not, streamed
    and not), retrieval against an unreachable store, an error, and feedback."""
    chat = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    first = post_json(f"{base}/v1/chat/completions", chat)
    assert first["tailor"]["retrieval"] == "unavailable"
    again = post_json(f"{base}/v1/chat/completions", chat)
    assert again["tailor"]["cached"] is True
    streamed = urllib.request.Request(
        f"{base}/v1/chat/completions",
        json.dumps({**chat, "temperature": 0.7, "stream": True}).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(streamed, timeout=120) as response:
        assert b"[DONE]" in response.read()
    completion = {"model": "smol", "prompt": "One, two,", "max_tokens": 3, "temperature": 0.5}
    post_json(f"{base}/v1/completions", completion)
    with pytest.raises(urllib.error.HTTPError) as missing:
        post_json(f"{base}/v1/chat/completions", {**chat, "model": "nope"})
    assert missing.value.code == 404
    for rating in ("up", "down"):
        assert post_json(f"{base}/v1/feedback", {"id": first["id"], "rating": rating})["known"]


@pytest.mark.cluster
def test_operator_runs_under_the_charts_rbac(stack: Stack) -> None:
    """Every resource reached its phase with the operator holding only the chart's
    namespaced Role (see the fixture); nothing was forbidden."""
    log = stack.processes.log("operator")
    assert stack.processes.alive("operator"), log[-3000:]
    for problem in ("Forbidden", "forbidden", "Not enough permissions"):
        assert problem not in log, log[-5000:]
    jobs = stack.kube.get_json("jobs", "-n", stack.work)["items"]
    assert {"torchhub-lora-train", "torchhub-docs-index-1"} <= {j["metadata"]["name"] for j in jobs}
    assert stack.kube.get_json("hpa", "api-assistant", "-n", stack.work)["spec"]["maxReplicas"] == 4


@pytest.mark.cluster
def test_every_metric_used_is_scraped_by_prometheus(stack: Stack) -> None:
    used = set().union(*(metric_names(q.expr) for q in every_query()))

    def all_there() -> set[str] | None:
        missing = used - stack.names()
        return None if missing else used

    try:
        wait_for("every metric in Prometheus", all_there, timeout=60)
    except AssertionError:
        raise AssertionError(f"never scraped: {sorted(used - stack.names())}") from None


@pytest.mark.cluster
def test_every_dashboard_query_runs_and_every_panel_shows_data(stack: Stack) -> None:
    wait_for("scrapes", lambda: stack.query("count(up == 1) == 4"))
    time.sleep(2)  # two samples of everything inside every rate() window
    # the vLLM row's queries run, but no vLLM runs here (no GPU): checked by name instead
    # (test_the_vllm_row_reads_what_vllm_exports) and on a GPU by tests/gpu/serve.sh
    empty = []
    for panel, queries in queries_by_panel().items():
        sizes = [len(stack.query(for_prometheus(query.expr))) for query in queries]
        if not any(sizes) and not vllm_only(queries):
            empty.append(panel)
    assert not empty, f"panels without data: {empty}"
    for query in variable_queries():
        metric_selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", query.expr).groups()  # type: ignore[union-attr]
        url = f"{stack.prometheus}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
            {"match[]": for_prometheus(metric_selector)}
        )
        assert get_json(url)["data"], query.where


@pytest.mark.cluster
def test_every_alert_runs_and_the_queue_alert_sees_the_waiting_job(stack: Stack) -> None:
    for query in alert_queries():
        stack.query(query.expr)  # raises on an error
    tiny = {name: 1e-9 for name in alerts.THRESHOLDS}
    firing = {q.where: stack.query(q.expr) for q in alert_queries(tiny)}
    queued = {(s["metric"]["kind"], s["metric"]["name"]) for s in firing["TailorRunQueuedTooLong"]}
    assert queued == {("FineTuneJob", "waiting")}
    assert firing["TailorRetrievalFailing"][0]["metric"]["deployment"] == "smol"
    assert not firing["TailorServerNotReady"]  # the server is ready
    assert not firing["TailorFineTuneJobFailed"]


@pytest.mark.cluster
def test_resources_are_deleted_under_the_charts_rbac(stack: Stack) -> None:
    """Last of the module: deletion runs the KnowledgeBase's cleanup (its finalizer) with
    the same Role; the namespaced Role may read the watched namespace and no other."""
    sa = "system:serviceaccount:" + stack.system + ":obs-tailor"
    can = stack.kube.kubectl(
        "auth", "can-i", "get", f"namespace/{stack.work}", "--as", sa, "-n", stack.work, check=False
    )
    assert can.stdout.strip() == "yes"
    cannot = stack.kube.kubectl(
        "auth", "can-i", "get", "namespace/default", "--as", sa, "-n", "default", check=False
    )
    assert cannot.stdout.strip() == "no"
    stack.kube.kubectl(
        "delete",
        "ftj,kb,pp,md",
        "--all",
        "-n",
        stack.work,
        "--wait=true",
        "--timeout=60s",
        timeout=90,
    )
    assert stack.kube.get_json("kb", "-n", stack.work)["items"] == []
    log = stack.processes.log("operator")
    assert "Forbidden" not in log and "forbidden" not in log, log[-5000:]


def test_grafana_variables_become_what_all_selects() -> None:
    expr = 'sum(rate(x{namespace=~"$namespace"}[$__rate_interval])) * $cost_per_device_hour'
    assert for_prometheus(expr) == 'sum(rate(x{namespace=~".*"}[1m])) * 1'
