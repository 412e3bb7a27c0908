"""Benchmark of the AdaptationLoop (not a test): ``python tests/bench/bench_loop.py``.

The simulated users of bench_feedback.py, now continuous, against the real thing: a dev
cluster, the operator (local runtime: real processes, no pods) and the quickstart's
resources (KnowledgeBase, PromptProfile, the LoRA FineTuneJob, the ModelDeployment with
capture on), then an AdaptationLoop on the deployment's adapter:

- **Users** ask APIBench Torch Hub training questions through the gateway, each with its
  own session (header X-Session-Id), ``--concurrency`` at a time, without pause; each judges
  the answer with the paper's AST scorer (thumbs up for the gold call), sends the correct
  call as a correction for ``--correct-share`` of the down-rated answers.
- **The loop** (promotion Auto): triggered by ``--ratings`` new ratings; one kto rung of
  ``--steps`` steps on the feedback since the last iteration (the frozen evaluation set's
  questions left out), continuing the champion; gated on exact match against it on the
  frozen set (``--eval`` eval questions); rolled out as a canary (30% then 60% of sessions,
  satisfaction at most 10 points worse, ``--min-samples`` ratings per variant per step).
- **Corruption**: after two iterations (``--corrupt``: the iteration whose feedback is
  corrupted, 3 by default; ``--corrupt 1 --iterations 1`` measures that iteration alone,
  from the quickstart adapter, in a third of the time), the users flip every rating (up
  for a wrong answer, down for the gold one) until that iteration's training begins, then
  rate honestly again: its adapter must be stopped by its gate or rolled back by the
  canary, never promoted.

Per iteration it reports the champion's and the candidate's exact / accuracy /
hallucination on the frozen set (the gate's Evaluation), the live satisfaction per variant
during its canary, and the wall time of each phase; with ``--overhead`` instead, tokens/s
at 16 clients through one engine behind three gateways: no rollout; a rollout at weight 0
(every request assigned to a variant and counted, all answered by the stable: the
per-variant bookkeeping alone); and a 50% canary between two copies of the same adapter
(what mixing two adapters in one batch costs the engine besides), alternating rounds in
alternating order, mean with a 95% interval.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from tailor.cli.quickstart_data import EXAMPLES, load_data  # noqa: E402
from tailor.data import apibench_dir  # noqa: E402
from tailor.devcluster.cluster import DevCluster, state_root  # noqa: E402
from tailor.devcluster.kube import Kube, apply_crds, wait_established  # noqa: E402
from tailor.workloads.evaluation.apibench import Corpus, answer_text, load_questions  # noqa: E402

NS = "bench-loop"
DEPLOYMENT = "api-assistant"


class Users:
    """Simulated users in threads: ask, judge with the paper's scorer, rate."""

    def __init__(self, endpoint: str, questions: list[Any], args: argparse.Namespace):
        self.endpoint, self.questions, self.args = endpoint, questions, args
        self.corpus = Corpus.load(apibench_dir() / "torchhub_api.jsonl")
        self.flip = False  # corrupted ratings
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {"asked": 0, "up": 0, "down": 0, "flipped": 0, "errors": 0}
        self.rng = random.Random(args.seed)
        self.threads = [
            threading.Thread(target=self._user, args=(i,), daemon=True)
            for i in range(args.concurrency)
        ]

    def start(self) -> Users:
        for t in self.threads:
            t.start()
        return self

    def _user(self, worker: int) -> None:
        client = httpx.Client(timeout=600)
        n = worker
        while not self.stop.is_set():
            q = self.questions[n % len(self.questions)]
            n += self.args.concurrency
            session = f"user-{n % self.args.sessions}"
            body = {
                "model": f"{DEPLOYMENT}/torchhub",
                "messages": [{"role": "user", "content": q.question}],
                "max_tokens": 64,
            }
            try:
                reply = client.post(
                    f"{self.endpoint}/chat/completions",
                    json=body,
                    headers={"X-Session-Id": session},
                ).json()
                text = reply["choices"][0]["message"]["content"]
                good = self.corpus.score(text, q.api_call, q.domain).exact
                flip = self.flip
                up = (not good) if flip else good
                rating: dict[str, Any] = {"id": reply["id"], "rating": "up" if up else "down"}
                with self.lock:
                    correct = not up and not flip and self.rng.random() < self.args.correct_share
                if correct:
                    rating["correction"] = answer_text(q)
                client.post(f"{self.endpoint}/feedback", json=rating).raise_for_status()
                with self.lock:
                    self.counts["asked"] += 1
                    self.counts["up" if up else "down"] += 1
                    self.counts["flipped"] += int(flip)
            except (httpx.HTTPError, KeyError, ValueError):
                with self.lock:
                    self.counts["errors"] += 1
                time.sleep(1)


def loop_manifest(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "AdaptationLoop",
        "metadata": {"name": "improve"},
        "spec": {
            "deploymentRef": {"name": DEPLOYMENT},
            "adapter": "torchhub",
            "trigger": {"newRatings": args.ratings},
            "dataset": {"fromFeedback": {"minRecords": 20, "heldOutFraction": 0}},
            "evaluation": {
                "questions": {"configMap": {"name": "frozen", "key": "eval.jsonl"}},
                "scoring": {"type": "apibench", "corpus": "torchhub"},
                "maxTokens": 64,
                "concurrency": 8,
            },
            "gate": {"metric": "exact", "vsBaseline": {"minAbsoluteChange": args.min_change}},
            "ladder": {
                "target": {"metric": "exact", "min": 0.0},
                "rungs": [
                    {
                        "name": "kto",
                        "fineTune": {
                            "objective": "kto",
                            "training": {
                                "epochs": 1,
                                "maxSteps": args.steps,
                                "batchSize": args.batch_size,
                                "learningRate": args.lr,
                                "maxSeqLength": 512,
                                "warmupRatio": 0.1,
                            },
                            "lora": {
                                "r": 16,
                                "alpha": 32,
                                "dropout": 0.0,
                                "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                            },
                        },
                    }
                ],
            },
            "promotion": "Auto",
            "rollout": {
                "steps": [{"weight": 30, "pauseSeconds": 0}, {"weight": 60, "pauseSeconds": 0}],
                "analysis": {
                    "intervalSeconds": 5,
                    "metrics": [
                        {"name": "satisfaction", "maxWorse": 0.1, "minSamples": args.min_samples},
                        {"name": "errorRate", "maxWorse": 0.05, "minSamples": args.min_samples},
                    ],
                },
            },
            "maxIterations": 3,
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.e2e.helpers import LocalOperator

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tailor-bench-loop-"))
    cluster = DevCluster(state_root() / "bench-loop")
    cluster.up(timeout=300)
    kube = Kube(cluster.kubeconfig)
    wait_established(cluster.kubeconfig, apply_crds(cluster.kubeconfig, ROOT / "crds"))
    kube.kubectl("create", "namespace", NS, check=False)
    load_data(kube, apibench_dir(), NS, work / "data")
    evals = load_questions(apibench_dir() / "torchhub_eval.json")
    random.Random(args.seed).shuffle(evals)
    frozen = "".join(
        json.dumps({"id": f"eval-{i}", "question": q.question, "apiCall": q.api_call}) + "\n"
        for i, q in enumerate(evals[: args.eval])
    )
    (work / "frozen.jsonl").write_text(frozen)
    kube.kubectl(
        "create",
        "configmap",
        "frozen",
        f"--from-file=eval.jsonl={work / 'frozen.jsonl'}",
        "-n",
        NS,
        check=False,
    )
    operator = LocalOperator(kube, NS, work, {})
    try:
        docs = []
        for name in (
            "10-knowledgebase.yaml",
            "20-promptprofile.yaml",
            "30-finetunejob.yaml",
            "40-modeldeployment.yaml",
        ):
            doc = yaml.safe_load((EXAMPLES / name).read_text())
            if doc["kind"] == "ModelDeployment":
                doc["spec"].update(
                    cache={"enabled": False},
                    quantization="none",
                    feedback={"rotate": {"maxSeconds": 30}},
                )
            docs.append(doc)
        kube.apply(docs, "-n", NS)
        endpoint = wait_for_phase(kube, "md", DEPLOYMENT, "Ready", 3600)["status"]["endpoint"]
        setup = round(time.perf_counter() - started)
        print(f"[set-up] {setup} s: the quickstart deployment is Ready", flush=True)
        asked = {q.question for q in evals[: args.eval]}
        pool = [
            q
            for q in load_questions(apibench_dir() / "torchhub_train.json")
            if q.question not in asked
        ]
        random.Random(args.seed + 1).shuffle(pool)
        users = Users(endpoint, pool, args).start()
        kube.apply([loop_manifest(args)], "-n", NS)
        iterations = follow(kube, users, args)
        users.stop.set()
        return {
            "setup_seconds": setup,
            "users": users.counts,
            "iterations": iterations,
            "minutes": round((time.perf_counter() - started) / 60, 1),
        }
    finally:
        operator.stop()
        for record in (work / "local").glob("*/runs/*.json"):
            pid = json.loads(record.read_text()).get("pid")
            if pid:
                try:
                    os.killpg(int(pid), 15)
                except OSError:
                    pass
        if not args.keep_cluster:
            cluster.down(purge=True)


def wait_for_phase(kube: Kube, kind: str, name: str, phase: str, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        body = kube.get_json(kind, name, "-n", NS)
        if (body.get("status") or {}).get("phase") == phase:
            return body
        assert time.monotonic() < deadline, f"{kind}/{name}: {body.get('status')}"
        time.sleep(5)


def follow(kube: Kube, users: Users, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Watch the loop until ``--iterations`` are done; flip the users' ratings between the
    end of the iteration before ``--corrupt`` and the corrupted one's training; each
    finished iteration's report."""
    reports: dict[int, dict[str, Any]] = {}
    canaries: dict[int, dict[str, Any]] = {}
    flipped = False
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = kube.get_json("loop", "improve", "-n", NS).get("status") or {}
        its = status.get("iterations") or []
        done = [i for i in its if i["phase"] == "Done"]
        current = next((i for i in its if i["phase"] != "Done"), None)
        corrupt = args.corrupt
        if len(done) == corrupt - 1 and current is None and not users.flip and not flipped:
            users.flip = flipped = True
            print("[corruption] users flip their ratings now", flush=True)
        if users.flip and current is not None and current["number"] == corrupt and current["rungs"]:
            users.flip = False  # the corrupted iteration trains on the flipped window
            print(f"[corruption] iteration {corrupt} trains: users rate honestly again", flush=True)
        if current is not None and current["phase"] == "RollingOut":
            rollout = (kube.get_json("md", DEPLOYMENT, "-n", NS).get("status") or {}).get("rollout")
            if rollout:
                canaries[current["number"]] = rollout
        for it in done:
            if it["number"] not in reports:
                reports[it["number"]] = report(kube, it, canaries.get(it["number"]))
                print(json.dumps(reports[it["number"]]), flush=True)
        if len(done) >= args.iterations or status.get("phase") == "Finished":
            break
        time.sleep(5)
    return [reports[n] for n in sorted(reports)]


def report(kube: Kube, it: dict[str, Any], canary: dict[str, Any] | None) -> dict[str, Any]:
    """One iteration's numbers: the gate's Evaluation (frozen set) and the canary."""
    numbers: dict[str, Any] = {}
    for rung in it.get("rungs") or []:
        if not rung.get("evaluation"):
            continue
        ev = kube.get_json("evaluation", rung["evaluation"], "-n", NS).get("status") or {}
        for c in ev.get("candidates") or []:
            numbers[c["name"]] = {
                m: round(100 * c[m]["value"], 1)
                for m in ("accuracy", "exact", "hallucination")
                if c.get(m)
            }
    variants = {
        v["name"]: {"satisfaction": v.get("satisfaction"), "rated": v.get("rated")}
        for v in (canary or {}).get("variants") or []
    }
    return {
        "iteration": it["number"],
        "trigger": it["trigger"],
        "records": it.get("records"),
        "gate": [r["phase"] for r in it.get("rungs") or []],
        "rollout": it.get("rollout"),
        "frozen set": numbers,
        "canary (last step seen)": variants,
        "seconds": it.get("seconds"),
        "outcome": it.get("outcome"),
    }


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s at 16 clients without a rollout and with a 50% canary between two copies
    of one adapter, one engine behind both gateways, alternating rounds."""
    from tailor.api.modeldeployment import ModelDeploymentSpec
    from tailor.api.workloads import Paths, ServeRun
    from tailor.workloads.serving.app import create_app
    from tailor.workloads.serving.engine.builtin import load_engine
    from tests.bench.bench_feedback import interval
    from tests.workloads.helpers import PERSONAS, ThreadServer, train_adapter

    root = Path(tempfile.mkdtemp(prefix="tailor-bench-rollout-"))
    from tailor.api.common import ModelSource
    from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer

    source, paths = ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts=str(root))
    train_adapter(
        load_causal_lm(source, paths),
        load_tokenizer(source, paths),
        PERSONAS["pirate"][0],
        root / "a",
    )
    shutil.copytree(root / "a", root / "b")
    adapters = [{"name": n, "path": str(root / n)} for n in ("a", "b")]
    declared = [{"name": n, "pvc": {"claimName": "x", "path": n}} for n in ("a", "b")]
    base = {
        "baseModel": {"builtin": "smollm2-135m-instruct"},
        "batching": {"maxBatchSize": 16},
        "cache": {"enabled": False},
        "adapters": declared,
    }
    spec = ModelDeploymentSpec.model_validate(base)
    from tailor.api.workloads import ServedAdapter

    engine = load_engine(spec, [ServedAdapter.model_validate(a) for a in adapters], paths)
    rollout = {"stable": {"adapter": "a"}, "candidate": {"adapter": "b"}, "steps": [{"weight": 50}]}
    # off: no rollout; books: a rollout at weight 0 (every request assigned and counted,
    # all answered by "a": the bookkeeping alone); split: 50% of sessions on "b" (the same
    # weights under another name: what mixing two adapters in a batch costs the engine)
    servers = {}
    for label, weight in (("off", None), ("books", 0), ("split", 50)):
        body: dict[str, Any] = {
            "spec": {**base, **({"rollout": rollout} if weight is not None else {})},
            "servedName": "smol",
            "adapters": adapters,
            "owner": {"kind": "ModelDeployment", "namespace": "bench", "name": "smol"},
            "paths": {"artifacts": str(root)},
        }
        if weight is not None:
            body["routing"] = {"id": "bench", "step": 0, "weight": weight, "rollout": rollout}
        run_spec = ServeRun.model_validate(body)
        servers[label] = ThreadServer(create_app(run_spec, engine=engine)).__enter__()
    questions = [f"Write a short sentence about the number {i}." for i in range(16 * 4)]

    def round_rate(url: str) -> float:
        def one(i: int) -> int:
            body = {
                "model": "smol/a",
                "max_tokens": 48,
                "temperature": 0,
                "messages": [{"role": "user", "content": questions[i]}],
            }
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json=body,
                timeout=600,
                headers={"X-Session-Id": f"s{i}"},
            )
            return int(response.json()["usage"]["completion_tokens"])

        clock = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            tokens = sum(pool.map(one, range(len(questions))))
        return tokens / (time.perf_counter() - clock)

    round_rate(servers["off"].url)  # warm-up
    rates: dict[str, list[float]] = {label: [] for label in servers}
    for n in range(args.overhead_rounds):
        order = list(servers) if n % 2 == 0 else list(reversed(servers))
        for label in order:
            rates[label].append(round_rate(servers[label].url))
            print(f"{label:5}: {rates[label][-1]:.1f} tokens/s", flush=True)
    books = {
        label: {
            k: v["answered"]
            for k, v in server.app.state.server.report()["rollout"]["variants"].items()
        }
        for label, server in servers.items()
        if label != "off"
    }
    for server in servers.values():
        server.__exit__()
    engine.close()

    def ratio(label: str) -> tuple[float, float]:
        return interval([100 * x / o for o, x in zip(rates["off"], rates[label], strict=True)])

    return {
        **{f"{label} tokens/s": interval(values) for label, values in rates.items()},
        "books/off %": ratio("books"),
        "split/off %": ratio("split"),
        "answers per variant": books,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=int, default=48, help="frozen evaluation questions")
    parser.add_argument("--ratings", type=int, default=150, help="trigger: new ratings")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--min-change", type=float, default=0.0, help="gate: least exact gain")
    parser.add_argument("--min-samples", type=int, default=15)
    parser.add_argument("--correct-share", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument(
        "--iterations", type=int, default=3, help="stop after this many (3: the corrupted one)"
    )
    parser.add_argument(
        "--corrupt", type=int, default=3, help="the iteration trained on flipped ratings"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep-cluster", action="store_true")
    parser.add_argument("--overhead", action="store_true", help="only the bookkeeping cost")
    parser.add_argument("--overhead-rounds", type=int, default=5)
    args = parser.parse_args()
    if args.overhead:
        print(json.dumps(overhead(args)), flush=True)
        return
    result = run(args)
    print(json.dumps(result, indent=1), flush=True)
    print(
        "\n| iteration | records | gate | rollout | champion exact | candidate exact | "
        "canary satisfaction (stable / candidate) | training s | rollout s |"
    )
    print("| ---: | ---: | --- | --- | ---: | ---: | --- | ---: | ---: |")
    for it in result["iterations"]:
        frozen, canary = it["frozen set"], it["canary (last step seen)"]
        sat = " / ".join(
            str((canary.get(v) or {}).get("satisfaction")) for v in ("stable", "candidate")
        )
        print(
            f"| {it['iteration']} | {it['records']} | {','.join(it['gate'])} | {it['rollout']} | "
            f"{(frozen.get('baseline') or {}).get('exact')} | "
            f"{(frozen.get('candidate') or {}).get('exact')} | {sat} | "
            f"{(it['seconds'] or {}).get('training')} | {(it['seconds'] or {}).get('rollout')} |"
        )


if __name__ == "__main__":
    main()
