"""``tailor up`` / ``tailor down`` / ``tailor status``: the whole job on one machine.

``up`` starts the local control plane (built from Go modules on first use), installs the
CRDs, starts the operator with the local runtime, loads the APIBench Torch Hub data into
ConfigMaps, applies ``docs/examples/quickstart/`` and follows every resource until the
ModelDeployment serves. Then it shows a sample exchange, how to talk to the server, and
the APIBench accuracy of base, base + RAG and adapter + RAG measured on the endpoint.
Everything is reused when it already runs; ``down`` stops all of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import socket
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
from tailor.workloads.apibench import chat_example, load_questions, matches

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples" / "quickstart"
NAMESPACE = "tailor-quickstart"
DEPLOYMENT = "api-assistant"
ADAPTER = "torchhub"


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


def load_data(kube: Kube, data: Path) -> None:
    """ConfigMaps torchhub-api (the corpus) and torchhub-chat (chat training examples)."""
    work = state_dir() / "data"
    work.mkdir(parents=True, exist_ok=True)
    train = work / "train.jsonl"
    examples = [chat_example(q) for q in load_questions(data / "torchhub_train.json")]
    train.write_text("".join(json.dumps(e) + "\n" for e in examples))
    for name, source, key in (
        ("torchhub-api", data / "torchhub_api.jsonl", "torchhub_api.jsonl"),
        ("torchhub-chat", train, "train.jsonl"),
    ):
        manifest = kube.kubectl(
            "create",
            "configmap",
            name,
            f"--from-file={key}={source}",
            "-n",
            NAMESPACE,
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
    return f"{kind:16} {obj['metadata']['name']:16} {phase:12} {detail}"[:160]


def follow(kube: Kube, timeout: float) -> dict[str, Any]:
    """Print progress until the ModelDeployment is Ready (or something fails)."""
    deadline = time.monotonic() + timeout
    tty = sys.stdout.isatty()
    last: list[str] = []
    started = time.monotonic()
    while time.monotonic() < deadline:
        items = kube.get_json("tailor", "-n", NAMESPACE)["items"]
        lines = [describe(o) for o in sorted(items, key=lambda o: o["kind"])]
        elapsed = f"[{time.monotonic() - started:5.0f}s]"
        if lines != last:
            if tty and last:
                sys.stdout.write(f"\x1b[{len(last) + 1}A")
            say(f"{elapsed} kubectl get tailor -n {NAMESPACE}" + ("\x1b[K" if tty else ""))
            for line in lines:
                say(line + ("\x1b[K" if tty else ""))
            last = lines
        failed = [o for o in items if (o.get("status") or {}).get("phase") in ("Failed", "Invalid")]
        if failed:
            raise SystemExit(
                f"{failed[0]['kind']} {failed[0]['metadata']['name']} failed: {describe(failed[0])}"
            )
        md = next((o for o in items if o["kind"] == "ModelDeployment"), None)
        if md and (md.get("status") or {}).get("phase") == "Ready":
            return dict(md)
        time.sleep(2)
    raise SystemExit(
        f"timed out after {timeout:.0f}s; see {state_dir()}/operator.log and {state_dir()}/local"
    )


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


def accuracy(
    endpoint: str, questions: list[Any], model: str, retrieval: bool, workers: int = 16
) -> float:
    def one(q: Any) -> bool:
        answer = chat(endpoint, model, q.question, retrieval)["choices"][0]["message"]["content"]
        return matches(answer, q.api_call)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, questions))
    return sum(results) / max(len(results), 1)


def report(endpoint: str, data: Path, eval_limit: int | None, revision: str = "") -> None:
    question = "I need to estimate the depth of objects in a single photo. Which model?"
    answer = chat(endpoint, f"{DEPLOYMENT}/{ADAPTER}", question)
    sources = [
        s.get("title") or s.get("id") for s in (answer.get("tailor") or {}).get("sources", [])
    ]
    say("\nSample exchange (model api-assistant/torchhub, with RAG):")
    say(f"  user:      {question}")
    say(f"  assistant: {answer['choices'][0]['message']['content'].strip()}")
    say(f"  sources:   {', '.join(map(str, sources))}")

    questions = load_questions(data / "torchhub_eval.json")[: eval_limit or None]
    # The table is a function of what is served (the deployment's revision hashes the
    # adapters, prompt revision and index build) and of the questions: a second `make up`
    # shows the stored table instead of asking the same 3 x 186 questions again.
    cache = state_dir() / "accuracy.json"
    key = f"{revision}:{len(questions)}"
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    reused = stored.get("key") == key and bool(revision)
    say(
        f"\nAPIBench Torch Hub accuracy on {len(questions)} eval questions (exact repo + model match),"
    )
    say(
        "measured on the served endpoint"
        + (
            " (stored from the first run of this revision; --eval-again to re-measure):"
            if reused
            else ":"
        )
    )
    rows = [
        ("base", DEPLOYMENT, False),
        ("base + RAG", DEPLOYMENT, True),
        ("adapter + RAG", f"{DEPLOYMENT}/{ADAPTER}", True),
    ]
    table: dict[str, list[float]] = stored.get("rows", {}) if reused else {}
    for label, model, retrieval in rows:
        if label not in table:
            started = time.monotonic()
            score = accuracy(endpoint, questions, model, retrieval)
            table[label] = [score, time.monotonic() - started]
        score, seconds = table[label]
        say(f"  {label:15} {score * 100:6.1f}%   ({seconds:.0f}s)")
    cache.write_text(json.dumps({"key": key, "rows": table}))


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
    say("1/5 local control plane (etcd, kube-apiserver, scheduler, controller-manager, kwok)")
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
    md = follow(kube, args.timeout)
    endpoint = md["status"]["endpoint"]
    say(
        f"\nReady in {time.monotonic() - started:.0f}s: {endpoint} serves {', '.join(md['status']['models'])}"
    )
    if not args.skip_eval:
        if args.eval_again:
            (state_dir() / "accuracy.json").unlink(missing_ok=True)
        report(endpoint, data, args.eval_limit, md["status"].get("revision") or "")
    how_to_talk(endpoint, cluster.kubeconfig)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the quickstart end to end")
    p_up.add_argument("--data", default=str(default_data()), help="APIBench folder")
    p_up.add_argument("--timeout", type=float, default=3600)
    p_up.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N")
    p_up.add_argument("--skip-eval", action="store_true")
    p_up.add_argument("--eval-again", action="store_true", help="re-measure the accuracy table")
    p_down = sub.add_parser("down", help="stop everything `up` started")
    p_down.add_argument("--purge", action="store_true", help="also delete the state")
    sub.add_parser("status", help="where every quickstart resource stands")
    args = parser.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[args.command](args)
    except urllib.error.URLError as exc:
        raise SystemExit(f"the server did not answer: {exc}") from exc
