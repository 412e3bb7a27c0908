"""``tailor up`` / ``tailor down`` / ``tailor status``: the whole job on one machine.

``up`` starts the local control plane (built from Go modules on first use), installs the
CRDs, starts the operator with the local runtime, loads the APIBench Torch Hub data into
ConfigMaps, applies ``docs/examples/quickstart/`` and follows every resource (a live table
on a terminal, changed lines only otherwise) until the ModelDeployments serve. Then it
shows a sample exchange, the customization ladder measured on the endpoints (zero-shot,
few-shot, RAG, LoRA + RAG: APIBench accuracy as the RAFT paper scores it, exact match,
hallucination rate, p50 latency and cost per query; printed, and written as JSON and a PNG
chart), and how to talk to the server. Everything is reused when it already runs; ``down``
stops all of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tailor.data import apibench_dir
from tailor.devcluster.cluster import DevCluster, state_root
from tailor.devcluster.kube import Kube, apply_crds, wait_established
from tailor.workloads.evaluation.apibench import (
    Corpus,
    Question,
    answer_text,
    load_documents,
    load_questions,
    raft_question,
    score_totals,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples" / "quickstart"
NAMESPACE = "tailor-quickstart"
DEPLOYMENT = "api-assistant"
FEWSHOT = "api-assistant-fewshot"
ADAPTER = "torchhub"
TRAIN_EXAMPLES = 480
EVAL_DEFAULT = 48
"""Eval questions of the default ladder (evenly spaced over the 186; ``--eval-all``)."""
RUNGS = (
    # (row, ModelDeployment, model, retrieval)
    ("zero-shot", DEPLOYMENT, DEPLOYMENT, False),
    ("few-shot", FEWSHOT, FEWSHOT, False),
    ("RAG", DEPLOYMENT, DEPLOYMENT, True),
    ("LoRA + RAG", DEPLOYMENT, f"{DEPLOYMENT}/{ADAPTER}", True),
)


def state_dir() -> Path:
    return state_root() / "quickstart"


def default_data() -> Path:
    return apibench_dir()


def say(text: str) -> None:
    print(text, flush=True)


# -- the operator as a background process ---------------------------------------------------


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_operator(cluster: DevCluster) -> int:
    """The quickstart's operator (local runtime), started unless it already runs."""
    pidfile = state_dir() / "operator.pid"
    pid = _pid(pidfile)
    if pid:
        return pid
    logfile = state_dir() / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "TAILOR_RUNTIME": "local",
        "TAILOR_LOCAL_STATE_DIR": str(state_dir() / "local"),
        "TAILOR_PROGRESS_INTERVAL_SECONDS": "2",
        "TAILOR_LOCAL_BACKOFF_SECONDS": "5",
    }
    argv = [sys.executable, "-m", "tailor.cli", "operator", "run", "--runtime", "local"]
    argv += ["--metrics-port", str(_free_port()), "--health-port", str(_free_port())]
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pidfile.write_text(str(proc.pid))
    return proc.pid


def stop_operator() -> None:
    pid = _pid(state_dir() / "operator.pid")
    if pid:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if _pid(state_dir() / "operator.pid") is None:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
    (state_dir() / "operator.pid").unlink(missing_ok=True)


def stop_workloads(grace: float = 30.0) -> None:
    """Stop every workload process the local runtime started (they outlive the operator,
    like pods): SIGTERM (the trainer checkpoints first), then SIGKILL after ``grace``."""
    groups = []
    for record in (state_dir() / "local").glob("*/runs/*.json"):
        data = json.loads(record.read_text())
        pid = data.get("pid")
        if pid:
            try:
                os.killpg(int(pid), signal.SIGTERM)
                groups.append(int(pid))
            except OSError:
                pass
            data["pid"] = None
            if data.get("phase") not in ("Succeeded", "Failed"):
                data["phase"] = "Pending"
            record.write_text(json.dumps(data))
    deadline = time.monotonic() + grace
    while groups and time.monotonic() < deadline:
        groups = [g for g in groups if _group_alive(g)]
        time.sleep(0.2)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


# -- data -----------------------------------------------------------------------------------


def rag_training_examples(
    questions: list[Question], cards: list[dict[str, Any]], seed: int = 42
) -> list[dict[str, Any]]:
    """Chat examples in the exact form the ModelDeployment serves: the prompt profile's
    system text and template around three numbered API cards (rendered as the knowledge
    base renders them), the gold card among two others at a random place; the answer is
    the gold call and why. Trained this way the adapter learns to read its context."""
    import yaml

    from tailor.api.knowledgebase import KnowledgeBaseSpec
    from tailor.api.promptprofile import PromptProfileSpec
    from tailor.workloads.knowledge.documents import record_document
    from tailor.workloads.serving.prompting import Message, build_messages

    kb = KnowledgeBaseSpec.model_validate(
        yaml.safe_load((EXAMPLES / "10-knowledgebase.yaml").read_text())["spec"]
    )
    profile = PromptProfileSpec.model_validate(
        yaml.safe_load((EXAMPLES / "20-promptprofile.yaml").read_text())["spec"]
    )
    fmt = kb.format.json_
    assert fmt is not None and kb.sources[0].config_map is not None
    cm = kb.sources[0].config_map
    source = f"configmap://{cm.name}/{cm.key}"
    docs = [record_document(card, fmt, source, f"{source}:{n}") for n, card in enumerate(cards, 1)]
    by_id = {d.id: d for d in docs}
    rng = random.Random(seed)
    examples = []
    for q in questions:
        gold = by_id.get(q.api_call)
        if gold is None:
            continue
        context = [*rng.sample([d for d in docs if d is not gold], 2), gold]
        rng.shuffle(context)
        messages = build_messages(profile, [Message("user", q.question)], context)
        turns = [m.as_dict() for m in messages]
        examples.append({"messages": [*turns, {"role": "assistant", "content": answer_text(q)}]})
    return examples


def load_data(kube: Kube, data: Path, namespace: str = NAMESPACE) -> None:
    """ConfigMaps torchhub-api (the corpus), torchhub-chat (chat training examples) and
    torchhub-questions (RAFTJob question records): what the quickstart and every file in
    docs/examples read."""
    work = state_dir() / "data"
    work.mkdir(parents=True, exist_ok=True)
    train = work / "train.jsonl"
    raft = work / "questions.jsonl"
    raft.write_text(
        "".join(
            json.dumps(raft_question(q), separators=(",", ":")) + "\n"
            for q in load_questions(data / "torchhub_train.json")
        )
    )
    # A seeded sample of the 837 training questions: a ConfigMap holds at most 1 MiB, and
    # 40 steps of 4 sequences read fewer than this many examples anyway.
    questions = load_questions(data / "torchhub_train.json")
    random.Random(7).shuffle(questions)
    examples = rag_training_examples(
        questions[:TRAIN_EXAMPLES], load_documents(data / "torchhub_api.jsonl")
    )
    train.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in examples))
    for name, source, key in (
        ("torchhub-api", data / "torchhub_api.jsonl", "torchhub_api.jsonl"),
        ("torchhub-chat", train, "train.jsonl"),
        ("torchhub-questions", raft, "questions.jsonl"),
    ):
        manifest = kube.kubectl(
            "create",
            "configmap",
            name,
            f"--from-file={key}={source}",
            "-n",
            namespace,
            "--dry-run=client",
            "-o",
            "json",
        ).stdout
        kube.kubectl("apply", "--server-side", "-f", "-", input=manifest)


# -- following progress ---------------------------------------------------------------------


def describe(obj: dict[str, Any]) -> str:
    """One line of what a resource is doing."""
    kind, status = obj["kind"], obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    detail = ""
    if kind == "FineTuneJob":
        p = status.get("progress") or {}
        if p.get("step") is not None:
            detail = f"step {p.get('step')}/{p.get('totalSteps')}"
            if p.get("loss") is not None:
                detail += f"  loss {p['loss']:.3f}"
            if p.get("evalLoss") is not None:
                detail += f"  eval {p['evalLoss']:.3f}"
            if p.get("tokensPerSecond"):
                detail += f"  {p['tokensPerSecond']:.0f} tok/s"
            if p.get("etaSeconds") is not None and phase == "Running":
                detail += f"  ETA {p['etaSeconds']}s"
    elif kind == "KnowledgeBase":
        if status.get("chunks") is not None:
            counts = [(status.get(k), k) for k in ("documents", "chunks", "vectors")]
            detail = ", ".join(f"{n} {k}" for n, k in counts if n is not None)
            detail += "" if status.get("vectors") is not None else " (embedding)"
    elif kind == "PromptProfile":
        detail = f"revision {status.get('revision')}" if status.get("revision") else ""
    elif kind == "ModelDeployment":
        if status.get("endpoint"):
            detail = status["endpoint"]
    if not detail:
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") in ("Ready", "ReferencesReady")
                and cond.get("status") == "False"
                and cond.get("message")
            ):
                detail = cond["message"]
                break
    return f"{kind:16} {obj['metadata']['name']:22} {phase:12} {detail}"[:160]


def follow(kube: Kube, timeout: float) -> dict[str, dict[str, Any]]:
    """Follow every resource until each ModelDeployment is Ready (or something fails):
    a live table that updates in place on a terminal, only the changed lines otherwise."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    live = None
    if sys.stdout.isatty():
        from rich.live import Live

        live = Live(refresh_per_second=2, transient=False)
        live.start()
    shown: dict[str, str] = {}
    try:
        while time.monotonic() < deadline:
            items = kube.get_json("tailor", "-n", NAMESPACE)["items"]
            items.sort(key=lambda o: (o["kind"], o["metadata"]["name"]))
            elapsed = time.monotonic() - started
            if live is not None:
                live.update(_progress_table(items, elapsed))
            else:
                for obj in items:
                    key, line = f"{obj['kind']}/{obj['metadata']['name']}", describe(obj)
                    if shown.get(key) != line:
                        say(f"[{elapsed:5.0f}s] {line}")
                        shown[key] = line
            failed = [
                o for o in items if (o.get("status") or {}).get("phase") in ("Failed", "Invalid")
            ]
            if failed:
                raise SystemExit(
                    f"{failed[0]['kind']} {failed[0]['metadata']['name']} failed: "
                    f"{describe(failed[0])}"
                )
            mds = {o["metadata"]["name"]: o for o in items if o["kind"] == "ModelDeployment"}
            wanted = {md for _, md, _, _ in RUNGS}
            if wanted <= set(mds) and all(
                (mds[n].get("status") or {}).get("phase") == "Ready" for n in wanted
            ):
                return mds
            time.sleep(2)
    finally:
        if live is not None:
            live.stop()
    raise SystemExit(
        f"timed out after {timeout:.0f}s; see {state_dir()}/operator.log and {state_dir()}/local"
    )


def _progress_table(items: list[dict[str, Any]], elapsed: float) -> Any:
    from rich.table import Table

    table = Table(
        title=f"kubectl get tailor -n {NAMESPACE}   [{elapsed:.0f}s]", title_justify="left"
    )
    for column in ("KIND", "NAME", "PHASE", "PROGRESS"):
        table.add_column(column, overflow="fold")
    for obj in items:
        parts = describe(obj).split(maxsplit=3)
        table.add_row(*parts, *[""] * (4 - len(parts)))
    return table


# -- talking to the server ------------------------------------------------------------------


def chat(
    endpoint: str, model: str, question: str, retrieval: bool = True, timeout: float = 300
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 64,
        "tailor": {"retrieval": retrieval},
    }
    request = urllib.request.Request(
        f"{endpoint}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


def eval_questions(data: Path, count: int | None) -> list[Question]:
    """``count`` eval questions evenly spaced over the file (all of them for ``None``)."""
    questions = load_questions(data / "torchhub_eval.json")
    if count is None or count >= len(questions):
        return questions
    return [questions[i * len(questions) // count] for i in range(count)]


def measure(
    endpoint: str,
    model: str,
    retrieval: bool,
    questions: list[Question],
    corpus: Corpus,
    workers: int = 16,
) -> dict[str, Any]:
    """One rung: the paper's accuracy, exact, hallucination, p50 latency and cost per
    query (device-seconds: the serving process is busy for the wall time of the batch)."""
    latencies: list[float] = []

    def one(q: Question) -> Any:
        began = time.monotonic()
        reply = chat(endpoint, model, q.question, retrieval)["choices"][0]["message"]["content"]
        latencies.append(time.monotonic() - began)
        return corpus.score(reply or "", q.api_call, q.domain)

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        verdicts = list(pool.map(one, questions))
    wall = time.monotonic() - began
    return {
        **score_totals(verdicts),
        "p50Seconds": round(statistics.median(latencies), 3),
        "costDeviceSecondsPerQuery": round(wall / max(1, len(questions)), 3),
        "wallSeconds": round(wall, 1),
    }


def chart(table: dict[str, dict[str, Any]], path: Path) -> bool:
    """Accuracy, exact and hallucination per rung, and accuracy against cost (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rungs = list(table)
    fig, (bars, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.27
    for offset, (key, label) in enumerate(
        (("accuracy", "accuracy (paper)"), ("exact", "exact"), ("hallucination", "hallucination"))
    ):
        xs = [i + (offset - 1) * width for i in range(len(rungs))]
        bars.bar(xs, [100 * table[r][key] for r in rungs], width, label=label)
    bars.set_xticks(range(len(rungs)), rungs)
    bars.set_ylabel("% of eval questions")
    bars.set_ylim(0, 100)
    bars.legend(loc="upper left", fontsize=8)
    bars.set_title("APIBench Torch Hub, SmolLM2-135M")
    for rung in rungs:
        x, y = table[rung]["costDeviceSecondsPerQuery"], 100 * table[rung]["accuracy"]
        cost.scatter([x], [y], s=60)
        cost.annotate(rung, (x, y), textcoords="offset points", xytext=(6, 4))
    cost.set_xlabel("cost per query (device-seconds)")
    cost.set_ylabel("accuracy (paper's metric), %")
    cost.set_ylim(0, 100)
    cost.set_title("accuracy vs cost per rung")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(
    endpoints: dict[str, str], data: Path, eval_count: int | None, revision: str = ""
) -> None:
    endpoint = endpoints[DEPLOYMENT]
    question = "I need to estimate the depth of objects in a single photo. Which model?"
    answer = chat(endpoint, f"{DEPLOYMENT}/{ADAPTER}", question)
    sources = [
        s.get("title") or s.get("id") for s in (answer.get("tailor") or {}).get("sources", [])
    ]
    say("\nSample exchange (model api-assistant/torchhub, with RAG):")
    say(f"  user:      {question}")
    reply = answer["choices"][0]["message"]["content"].strip()
    say("  assistant: " + reply.replace("\n", "\n             "))
    say(f"  sources:   {', '.join(map(str, sources))}")

    questions = eval_questions(data, eval_count)
    corpus = Corpus.load(data / "torchhub_api.jsonl")
    # The table is a function of what is served (the deployments' revisions hash the
    # adapters, prompt revisions and index build) and of the questions: a second `make up`
    # shows the stored table instead of asking the same questions again.
    stored_path = state_dir() / "ladder.json"
    key = f"{revision}:{len(questions)}"
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    reused = stored.get("key") == key and bool(revision)
    say(
        f"\nThe customization ladder on {len(questions)} APIBench Torch Hub eval questions"
        + ("" if eval_count is None else " (evenly spaced; --eval-all for all 186)")
        + ", measured on the served endpoints"
        + (" (stored for this revision; --eval-again re-measures)" if reused else "")
        + ":"
    )
    say(
        "  accuracy: the RAFT paper's metric (a real Torch Hub API of the question's domain);"
        " exact: the gold API; hallucination: no such API"
    )
    say(
        f"  {'rung':12} {'accuracy':>9} {'exact':>7} {'halluc.':>8} {'p50 s':>7} {'cost/query':>11}"
    )
    table: dict[str, dict[str, Any]] = stored.get("rungs", {}) if reused else {}
    for label, md, model, retrieval in RUNGS:
        if label not in table:
            table[label] = measure(endpoints[md], model, retrieval, questions, corpus)
        row = table[label]
        say(
            f"  {label:12} {100 * row['accuracy']:8.1f}% {100 * row['exact']:6.1f}% "
            f"{100 * row['hallucination']:7.1f}% {row['p50Seconds']:7.2f} "
            f"{row['costDeviceSecondsPerQuery']:9.2f} s"
        )
    stored_path.write_text(
        json.dumps(
            {"key": key, "questions": len(questions), "model": "SmolLM2-135M-Instruct",
             "rungs": table},
            indent=2,
        )
    )  # fmt: skip
    png = state_dir() / "ladder.png"
    pictured = chart(table, png)
    say(f"  table: {stored_path}" + (f"   chart: {png}" if pictured else ""))


def how_to_talk(endpoint: str, kubeconfig: Path) -> None:
    say(f"""
Talk to it:
  curl -s {endpoint}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{DEPLOYMENT}/{ADAPTER}", "messages": [{{"role": "user", "content": "A model to classify bird species in photos?"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{endpoint}", api_key="unused")
  client.chat.completions.create(model="{DEPLOYMENT}/{ADAPTER}", messages=[{{"role": "user", "content": "..."}}])

  export KUBECONFIG={kubeconfig}
  kubectl get tailor -n {NAMESPACE}
  kubectl describe ftj torchhub-lora -n {NAMESPACE}

Stop everything with `make down` (or `tailor down`).""")


# -- commands -------------------------------------------------------------------------------


def up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    state_dir().mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if not (data / "torchhub_api.jsonl").exists():
        raise SystemExit(
            f"APIBench data not found in {data}; pass --data DIR or set TAILOR_APIBENCH"
        )
    say(
        "1/5 local control plane (etcd, kube-apiserver, scheduler, controller-manager, kwok, volume provisioner)"
    )
    cluster = DevCluster(state_root() / "quickstart")
    cluster.up(timeout=600, log=lambda line: say(f"    {line}"))
    kube = Kube(cluster.kubeconfig)
    say("2/5 CRDs")
    wait_established(cluster.kubeconfig, apply_crds(cluster.kubeconfig, REPO / "crds"))
    say("3/5 operator (local runtime)")
    pid = start_operator(cluster)
    say(f"    pid {pid}, log {state_dir() / 'operator.log'}")
    say(f"4/5 namespace {NAMESPACE}, APIBench data, docs/examples/quickstart/")
    if kube.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        kube.kubectl("create", "namespace", NAMESPACE)
    load_data(kube, data)
    kube.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLES))
    say("5/5 following progress (Ctrl-C stops following; everything keeps running)")
    mds = follow(kube, args.timeout)
    endpoints = {name: md["status"]["endpoint"] for name, md in mds.items()}
    say(f"\nReady in {time.monotonic() - started:.0f}s:")
    for md in mds.values():
        say(f"  {md['status']['endpoint']} serves {', '.join(md['status']['models'])}")
    if not args.skip_eval:
        if args.eval_again:
            (state_dir() / "ladder.json").unlink(missing_ok=True)
        revision = "+".join(str(mds[n]["status"].get("revision") or "") for n in sorted(mds))
        count = None if args.eval_all else (args.eval_limit or EVAL_DEFAULT)
        report(endpoints, data, count, revision)
    how_to_talk(endpoints[DEPLOYMENT], cluster.kubeconfig)
    return 0


def down(args: argparse.Namespace) -> int:
    stop_operator()
    stop_workloads()
    DevCluster(state_root() / "quickstart").down()
    if args.purge:
        shutil.rmtree(state_dir(), ignore_errors=True)
    say("stopped: operator, workloads and the local control plane")
    return 0


def status(args: argparse.Namespace) -> int:
    cluster = DevCluster(state_root() / "quickstart")
    if not cluster.is_healthy():
        say("the quickstart is not running (`make up`)")
        return 1
    kube = Kube(cluster.kubeconfig)
    for obj in kube.get_json("tailor", "-n", NAMESPACE)["items"]:
        say(describe(obj))
    return 0


def example_data(args: argparse.Namespace) -> int:
    """``tailor example-data``: the ConfigMaps docs/examples read, in a namespace of the
    current kubeconfig's cluster."""
    import os

    kubeconfig = (
        args.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    )
    load_data(Kube(Path(kubeconfig)), Path(args.data), args.namespace)
    say(f"ConfigMaps torchhub-api, torchhub-chat, torchhub-questions in {args.namespace}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the quickstart end to end")
    p_up.add_argument("--data", default=str(default_data()), help="APIBench folder")
    p_up.add_argument("--timeout", type=float, default=3600)
    p_up.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help=f"evaluate on N evenly spaced eval questions (default {EVAL_DEFAULT})",
    )
    p_up.add_argument("--eval-all", action="store_true", help="evaluate on all 186")
    p_up.add_argument("--skip-eval", action="store_true")
    p_up.add_argument("--eval-again", action="store_true", help="re-measure the ladder")
    p_down = sub.add_parser("down", help="stop everything `up` started")
    p_down.add_argument("--purge", action="store_true", help="also delete the state")
    sub.add_parser("status", help="where every quickstart resource stands")
    p_data = sub.add_parser(
        "example-data", help="create the ConfigMaps docs/examples read (corpus, chats, questions)"
    )
    p_data.add_argument("-n", "--namespace", default="default")
    p_data.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG")
    p_data.add_argument("--data", default=str(default_data()), help="APIBench folder")
    args = parser.parse_args(argv)
    try:
        commands = {"up": up, "down": down, "status": status, "example-data": example_data}
        return commands[args.command](args)
    except urllib.error.URLError as exc:
        raise SystemExit(f"the server did not answer: {exc}") from exc
