"""Benchmark of learning from use (not a test): ``python tests/bench/bench_feedback.py``.

One feedback round on APIBench Torch Hub with simulated users, every part the product's own:

1. **Deployed system**: the quickstart's LoRA adapter (its recipe and data: 480 training
   questions, each with the gold card among three, 40 steps) served with its prompt profile
   and RAG (MiniLM over the 94 cards, top 3) by the real gateway, with capture on
   (``spec.feedback``, segments on the claim).
2. **Users**: ``--users`` other training questions (400) asked through the gateway's HTTP
   API, 16 at a time; each user judges the answer with the paper's AST scorer (thumbs up for
   the gold call, down for a wrong or hallucinated one), sends the correct call and why as a
   ``correction`` for ``--correct-share`` of the down-rated answers, and marks each cited card
   useful when it is the gold card.
3. **Learning, from those records only** (feedback DataSources of the deployment): KTO and
   DPO LoRA runs continuing the deployed adapter (it is their reference), an SFT run on the
   same records from the same adapter with the same steps (so the objective's effect is
   visible), and the knowledge base's adaptation on the feedback pairs (format retrieval).
4. **Evaluation** on ``--eval`` held-out eval questions (93), end to end through the gateway:
   the paper's accuracy, exact match and hallucination for each adapter with the base index
   and for the best one with the adapted index; hit@5 of the gold card for both indexes.

Capture overhead (``--overhead``): tokens/s of the base model at 16 clients with capture off
and on, the same engine behind both gateways, alternating rounds, mean with a 95% interval.

The numbers in docs/serving.md come from ``--steps 16 --batch-size 4`` (the defaults, 30
steps of 8, head past 20 minutes per objective on a 2-core CPU); a GPU run can keep them.
Everything runs in this one process: at the issue's size it grew to 24 GB and was killed
while serving the last system on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from tailor.api.workloads import IndexRun, ServeRun, TrainRun  # noqa: E402
from tailor.cli.quickstart_data import EXAMPLES, TRAIN_EXAMPLES, rag_training_examples  # noqa: E402
from tailor.data import apibench_dir  # noqa: E402
from tailor.workloads.evaluation.apibench import Corpus, answer_text, load_documents, score_totals  # noqa: E402
from tailor.workloads.io.feedback import feedback_records  # noqa: E402
from tailor.workloads.knowledge.index import build_index  # noqa: E402
from tailor.workloads.knowledge.retriever import Retriever  # noqa: E402
from tailor.workloads.serving.app import create_app  # noqa: E402
from tailor.workloads.training.trainer import train  # noqa: E402
from tests.bench.bench_raft import corpus_lines, split  # noqa: E402
from tests.workloads.helpers import ThreadServer  # noqa: E402

DEPLOYMENT = "api-assistant"


def quickstart(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())["spec"]
    return spec


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="tailor-bench-feedback-"))
        self.artifacts = self.root / "artifacts"
        self.pvcs = self.root / "pvc"
        (self.pvcs / "data").mkdir(parents=True)
        (self.pvcs / "runs").mkdir(parents=True)
        (self.pvcs / "data" / "api.jsonl").write_text(corpus_lines("torchhub"))
        self.paths = {"artifacts": str(self.artifacts), "pvcs": str(self.pvcs)}
        self.corpus = Corpus.load(apibench_dir() / "torchhub_api.jsonl")
        self.times: dict[str, float] = {}

    def timed(self, label: str, started: float) -> None:
        self.times[label] = round(time.perf_counter() - started, 1)
        print(f"[{label}] {self.times[label]} s", flush=True)

    # -- parts
    def index(self, name: str, adaptation: dict[str, Any] | None = None) -> IndexRun:
        spec = quickstart("10-knowledgebase.yaml")
        spec["sources"] = [{"pvc": {"claimName": "data", "path": "api.jsonl"}}]
        if adaptation:
            spec["adaptation"] = adaptation
        run = IndexRun.model_validate(
            {
                "owner": {"kind": "KnowledgeBase", "namespace": "bench", "name": name},
                "paths": self.paths,
                "reporter": {"kind": "none"},
                "spec": spec,
                "target": {
                    "alias": name,
                    "path": str(self.root / name / "qdrant"),
                    "embedders": str(self.artifacts / "embedders"),
                    "retrieval": {"topK": 3},
                },
                "mode": "full",
            }
        )
        build_index(run)
        return run

    def train(self, name: str, spec: dict[str, Any]) -> str:
        """Train into pvc://runs/<name>; returns that URI."""
        run = TrainRun.model_validate(
            {
                "spec": spec,
                "outputDir": str(self.pvcs / "runs" / name),
                "checkpointDir": str(self.root / "checkpoints" / name),
                "paths": self.paths,
                "reporter": {"kind": "none"},
                "owner": {"kind": "FineTuneJob", "namespace": "bench", "name": name},
            }
        )
        train(run)
        return f"pvc://runs/{name}"

    def serve(self, index: IndexRun, adapters: dict[str, str], capture: bool) -> ThreadServer:
        profile = self.root / "profile.json"
        profile.write_text(json.dumps(quickstart("20-promptprofile.yaml")))
        run = ServeRun.model_validate(
            {
                "spec": {
                    "baseModel": {"builtin": "smollm2-135m-instruct"},
                    "batching": {"maxBatchSize": 16},
                    "cache": {"enabled": False},
                    **({"feedback": {"rotate": {"maxSeconds": 3600}}} if capture else {}),
                },
                "servedName": DEPLOYMENT,
                "adapters": [
                    {"name": n, "path": str(self.pvcs / u.removeprefix("pvc://"))}
                    for n, u in adapters.items()
                ],
                "owner": {"kind": "ModelDeployment", "namespace": "bench", "name": DEPLOYMENT},
                "paths": self.paths,
                "promptProfileFile": str(profile),
                "knowledgeBase": index.target.wire(),
                "replica": "bench",
            }
        )
        server = ThreadServer(create_app(run)).__enter__()
        deadline = time.monotonic() + 600
        while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the server did not load"
            time.sleep(1)
        return server

    def ask(self, url: str, model: str, questions: list[Any]) -> list[dict[str, Any]]:
        """Every question to ``model``, ``--concurrency`` at a time: the whole responses."""

        def one(q: Any) -> dict[str, Any]:
            body = {"model": model, "messages": [{"role": "user", "content": q.question}]}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            response.raise_for_status()
            answer: dict[str, Any] = response.json()
            return answer

        with concurrent.futures.ThreadPoolExecutor(self.args.concurrency) as pool:
            return list(pool.map(one, questions))

    def score(self, responses: list[dict[str, Any]], questions: list[Any]) -> dict[str, Any]:
        verdicts = [
            self.corpus.score(r["choices"][0]["message"]["content"], q.api_call, q.domain)
            for r, q in zip(responses, questions, strict=True)
        ]
        return score_totals(verdicts)

    @staticmethod
    def hit_at_5(index: IndexRun, questions: list[Any]) -> float:
        retriever = Retriever(index.target, index.paths)
        hits = sum(
            any(d.document_id == q.api_call for d in retriever.search(q.question, top_k=5))
            for q in questions
        )
        return round(hits / len(questions), 4)

    # -- the round
    def run(self) -> dict[str, Any]:
        args = self.args
        train_qs, evals = split(
            argparse.Namespace(hub="torchhub", seed=args.seed, train=0, eval=args.eval)
        )
        adapter_qs, user_qs = train_qs[:TRAIN_EXAMPLES], train_qs[-args.users :]
        cards = load_documents(apibench_dir() / "torchhub_api.jsonl")

        started = time.perf_counter()
        base_index = self.index("torchhub")
        recipe = quickstart("30-finetunejob.yaml")
        recipe["dataset"] = {
            "train": {"inline": rag_training_examples(adapter_qs, cards, args.seed)},
            "validationSplit": 0.05,
        }
        deployed = self.train("quickstart", recipe)
        self.timed("set-up: index and the quickstart adapter", started)

        # users: ask, judge, rate
        started = time.perf_counter()
        server = self.serve(base_index, {"torchhub": deployed}, capture=True)
        responses = self.ask(server.url, f"{DEPLOYMENT}/torchhub", user_qs)
        rng = random.Random(args.seed)
        ratings = {"up": 0, "down": 0, "corrections": 0, "useful": 0}
        for response, q in zip(responses, user_qs, strict=True):
            text = response["choices"][0]["message"]["content"]
            good = self.corpus.score(text, q.api_call, q.domain).exact
            body: dict[str, Any] = {"id": response["id"], "rating": "up" if good else "down"}
            if not good and rng.random() < args.correct_share:
                body["correction"] = answer_text(q)
                ratings["corrections"] += 1
            sources = response.get("tailor", {}).get("sources") or []
            body["sources"] = [
                {"id": s["id"], "useful": s.get("document_id") == q.api_call} for s in sources
            ]
            ratings["useful"] += sum(s["useful"] for s in body["sources"])
            ratings[body["rating"]] += 1
            httpx.post(f"{server.url}/v1/feedback", json=body, timeout=60).raise_for_status()
        server.app.state.server.capture.close()  # publish the open segment
        server.__exit__()
        self.timed("answering and rating", started)
        print("ratings", json.dumps(ratings), flush=True)

        # learning from the records only
        started = time.perf_counter()
        source = lambda fmt: {  # noqa: E731
            "feedback": {"deploymentRef": {"name": DEPLOYMENT}, "format": fmt, "heldOutFraction": 0}
        }
        counts = {}
        from tailor.api.common import FeedbackData
        from tailor.api.workloads import Paths

        for fmt in ("sft", "kto", "dpo", "retrieval"):
            spec = FeedbackData.model_validate(source(fmt)["feedback"])
            counts[fmt] = feedback_records(spec, Paths.model_validate(self.paths))[1].wire()
        print("records", json.dumps(counts), flush=True)
        lora = recipe["lora"] | {"dropout": 0.0}
        common = {
            "baseModel": recipe["baseModel"],
            "method": "lora",
            "lora": lora,
            "preference": {"beta": args.beta, "reference": {"uri": deployed}},
            "training": {
                "epochs": 1,
                "maxSteps": args.steps,
                "learningRate": args.lr,
                "batchSize": args.batch_size,
                "maxSeqLength": 512,
                "warmupRatio": 0.1,
            },
            "checkpoint": {"everySteps": 1000},
        }
        adapters = {"torchhub": deployed}
        for objective in args.objectives.split(","):
            if counts[objective]["records"] == 0:
                print(f"no {objective} records: skipped", flush=True)
                continue
            clock = time.perf_counter()
            spec = {**common, "objective": objective, "dataset": {"train": source(objective)}}
            adapters[objective] = self.train(f"feedback-{objective}", spec)
            self.timed(f"train {objective}", clock)
        clock = time.perf_counter()
        adaptation = {"questions": source("retrieval"), "holdout": 0.2}
        adapted_index = self.index("torchhub-adapted", adaptation)
        self.timed("re-index with adaptation", clock)
        self.timed("learning", started)

        # evaluation, end to end
        started = time.perf_counter()
        results: dict[str, Any] = {}
        server = self.serve(base_index, adapters, capture=False)
        for name in adapters:
            label = "deployed adapter" if name == "torchhub" else f"+ {name}"
            results[label] = self.score(self.ask(server.url, f"{DEPLOYMENT}/{name}", evals), evals)
            print(label, json.dumps(results[label]), flush=True)
        server.__exit__()
        best = max(
            (n for n in adapters if n != "torchhub"),
            key=lambda n: results[f"+ {n}"]["exact"],
            default="torchhub",
        )
        server = self.serve(adapted_index, {best: adapters[best]}, capture=False)
        label = f"+ {best} + adapted retrieval"
        results[label] = self.score(self.ask(server.url, f"{DEPLOYMENT}/{best}", evals), evals)
        print(label, json.dumps(results[label]), flush=True)
        server.__exit__()
        hits = {
            "base index": self.hit_at_5(base_index, evals),
            "adapted index": self.hit_at_5(adapted_index, evals),
        }
        self.timed("evaluation", started)
        # the round is what a team runs: the sft comparison run is not part of it
        round_minutes = (
            self.times["answering and rating"]
            + self.times["learning"]
            - self.times.get("train sft", 0.0)
            + self.times["evaluation"]
        ) / 60
        return {
            "ratings": ratings,
            "records": counts,
            "results": results,
            "hit@5": hits,
            "times": self.times,
            "round_minutes": round(round_minutes, 1),
        }


def interval(values: list[float]) -> tuple[float, float]:
    """The mean of a few rounds and the half-width of its 95% interval (normal)."""
    mean = statistics.mean(values)
    half = 1.96 * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return round(mean, 1), round(half, 1)


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s at 16 clients, capture off and on, one engine behind both gateways."""
    from tailor.api.modeldeployment import ModelDeploymentSpec
    from tailor.api.workloads import Paths
    from tailor.workloads.serving.engine.builtin import load_engine

    root = Path(tempfile.mkdtemp(prefix="tailor-bench-capture-"))
    spec = ModelDeploymentSpec.model_validate(
        {"baseModel": {"builtin": "smollm2-135m-instruct"}, "batching": {"maxBatchSize": 16}}
    )
    engine = load_engine(spec, [], Paths(artifacts=str(root)))
    servers = {}
    for capture in (False, True):
        run = ServeRun.model_validate(
            {
                "spec": {
                    **spec.wire(),
                    "cache": {"enabled": False},
                    **({"feedback": {}} if capture else {}),
                },
                "servedName": "smol",
                "owner": {"kind": "ModelDeployment", "namespace": "bench", "name": "smol"},
                "paths": {"artifacts": str(root / ("on" if capture else "off"))},
                "replica": "bench",
            }
        )
        servers[capture] = ThreadServer(create_app(run, engine=engine)).__enter__()
    questions = [f"Write a short sentence about the number {i}." for i in range(16 * 4)]

    def round_rate(url: str) -> float:
        def one(text: str) -> int:
            body = {
                "model": "smol",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 48,
                "temperature": 0,
            }
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            return int(response.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            tokens = sum(pool.map(one, questions))
        return tokens / (time.perf_counter() - started)

    round_rate(servers[False].url)  # warm-up
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.overhead_rounds):
        for capture in (False, True):
            rates[capture].append(round_rate(servers[capture].url))
            print(
                f"capture {'on ' if capture else 'off'}: {rates[capture][-1]:.1f} tokens/s",
                flush=True,
            )
    for server in servers.values():
        server.__exit__()
    engine.close()

    ratios = [on / off for off, on in zip(rates[False], rates[True], strict=True)]
    return {
        "off": interval(rates[False]),
        "on": interval(rates[True]),
        "on/off": interval([100 * r for r in ratios]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--eval", type=int, default=93)
    parser.add_argument("--correct-share", type=float, default=0.5)
    parser.add_argument("--objectives", default="kto,dpo,sft")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--overhead", action="store_true", help="only the capture overhead")
    parser.add_argument("--overhead-rounds", type=int, default=5)
    args = parser.parse_args()
    if args.overhead:
        print(json.dumps(overhead(args)), flush=True)
        return
    report = Bench(args).run()
    print(json.dumps(report, indent=1), flush=True)
    results = report["results"]
    print("\n| system | accuracy (paper) | exact | hallucination |")
    print("| --- | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {100 * r['accuracy']:.1f} | {100 * r['exact']:.1f} | "
              f"{100 * r['hallucination']:.1f} |")  # fmt: skip
    print(f"\nhit@5 of the gold card: {report['hit@5']}")
    print(f"the round (answering, rating, kto + dpo training, re-indexing, evaluating): "
          f"{report['round_minutes']} min")  # fmt: skip


if __name__ == "__main__":
    main()
