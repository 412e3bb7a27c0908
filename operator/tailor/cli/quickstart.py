"""``tailor up`` / ``tailor down`` / ``tailor status``: the whole job on one machine.

``up`` starts the local control plane (built from Go modules on first use), installs the
CRDs, starts the operator with the local runtime, loads the APIBench Torch Hub data into
ConfigMaps (``quickstart_data``), applies ``docs/examples/quickstart/`` and follows every
resource (a live table on a terminal, changed lines only otherwise) until the
ModelDeployments serve. Then it shows a sample exchange, the customization ladder measured
on the endpoints by an Evaluation (``ladder``: zero-shot, few-shot, RAG, LoRA + RAG), and
how to talk to the server. Everything is reused when it already runs; ``down`` stops all of it.
``tailor example-data`` loads the same ConfigMaps into any cluster's namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tailor.cli.ladder import ADAPTER, DEPLOYMENT, EVAL_DEFAULT, RUNGS, report, say
from tailor.cli.quickstart_data import EXAMPLES, REPO, load_data

if TYPE_CHECKING:
    from tailor.devcluster.cluster import DevCluster
    from tailor.devcluster.kube import Kube

NAMESPACE = "tailor-quickstart"


def state_dir() -> Path:
    """The quickstart's folder: its control plane, operator log, data and ladder."""
    from tailor.devcluster.cluster import state_root

    return state_root() / "quickstart"


def default_data() -> Path:
    from tailor.data import apibench_dir

    return apibench_dir()


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
    elif kind == "Evaluation":
        p = status.get("progress") or {}
        if p.get("total"):
            detail = f"{p.get('answered')}/{p['total']} answered"
        if (status.get("recommendation") or {}).get("message"):
            detail = status["recommendation"]["message"]
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
            failed = [  # (the ladder's Evaluations report for themselves)
                o
                for o in items
                if (o.get("status") or {}).get("phase") in ("Failed", "Invalid")
                and o["kind"] != "Evaluation"
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


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_up = commands.add_parser("up", help="run the quickstart end to end")
    p_up.add_argument("--data", default=str(default_data()), help="APIBench folder")
    p_up.add_argument("--timeout", type=float, default=3600)
    p_up.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help=f"evaluate on a seeded sample of N eval questions (default {EVAL_DEFAULT})",
    )
    p_up.add_argument("--eval-all", action="store_true", help="evaluate on all 186")
    p_up.add_argument("--skip-eval", action="store_true")
    p_up.add_argument("--eval-again", action="store_true", help="re-measure the ladder")
    p_up.set_defaults(handler=up)
    p_down = commands.add_parser("down", help="stop everything `tailor up` started")
    p_down.add_argument("--purge", action="store_true", help="also delete the state")
    p_down.set_defaults(handler=down)
    p_status = commands.add_parser("status", help="where every quickstart resource stands")
    p_status.set_defaults(handler=status)
    p_data = commands.add_parser("example-data", help="create the ConfigMaps docs/examples read")
    p_data.add_argument("-n", "--namespace", default="default")
    p_data.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG")
    p_data.add_argument("--data", default=str(default_data()), help="APIBench folder")
    p_data.set_defaults(handler=example_data)


def up(args: argparse.Namespace) -> int:
    try:
        return _up(args)
    except urllib.error.URLError as exc:
        raise SystemExit(f"the server did not answer: {exc}") from exc


def _up(args: argparse.Namespace) -> int:
    from tailor.devcluster.cluster import DevCluster
    from tailor.devcluster.kube import Kube, apply_crds, wait_established

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
    cluster = DevCluster(state_dir())
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
    load_data(kube, data, NAMESPACE, state_dir() / "data")
    kube.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLES))
    say("5/5 following progress (Ctrl-C stops following; everything keeps running)")
    mds = follow(kube, args.timeout)
    endpoints = {name: md["status"]["endpoint"] for name, md in mds.items()}
    say(f"\nReady in {time.monotonic() - started:.0f}s:")
    for md in mds.values():
        say(f"  {md['status']['endpoint']} serves {', '.join(md['status']['models'])}")
    if not args.skip_eval:
        revision = "+".join(str(mds[n]["status"].get("revision") or "") for n in sorted(mds))
        count = None if args.eval_all else (args.eval_limit or EVAL_DEFAULT)
        report(kube, NAMESPACE, endpoints[DEPLOYMENT], count, revision, state_dir(),
               again=args.eval_again)  # fmt: skip
    how_to_talk(endpoints[DEPLOYMENT], cluster.kubeconfig)
    return 0


def down(args: argparse.Namespace) -> int:
    from tailor.devcluster.cluster import DevCluster

    stop_operator()
    stop_workloads()
    DevCluster(state_dir()).down()
    if args.purge:
        shutil.rmtree(state_dir(), ignore_errors=True)
    say("stopped: operator, workloads and the local control plane")
    return 0


def status(args: argparse.Namespace) -> int:
    from tailor.devcluster.cluster import DevCluster
    from tailor.devcluster.kube import Kube

    cluster = DevCluster(state_dir())
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
    from tailor.devcluster.kube import Kube

    kubeconfig = (
        args.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    )
    load_data(Kube(Path(kubeconfig)), Path(args.data), args.namespace, state_dir() / "data")
    say(
        f"ConfigMaps torchhub-api, torchhub-chat, torchhub-questions, torchhub-eval in {args.namespace}"
    )
    return 0
