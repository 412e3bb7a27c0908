"""The data the quickstart and every file in docs/examples read, from the APIBench Torch Hub
files shipped in ``tailor.data``: ConfigMaps ``torchhub-api`` (the corpus), ``torchhub-chat``
(chat training examples in the exact form the ModelDeployment serves, the gold API card among
two others: ``rag_training_examples``), ``torchhub-questions`` (RAFTJob question records) and
``torchhub-eval`` (the eval questions as Evaluation records), loaded by ``tailor up`` and ``tailor example-data`` (``load_data``)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailor.devcluster.kube import Kube
    from tailor.workloads.evaluation.apibench import Question

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "docs" / "examples" / "quickstart"
TRAIN_EXAMPLES = 480


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
    from tailor.workloads.evaluation.apibench import answer_text
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


def load_data(kube: Kube, data: Path, namespace: str, work: Path) -> None:
    """ConfigMaps torchhub-api (the corpus), torchhub-chat (chat training examples),
    torchhub-questions (RAFTJob question records) and torchhub-eval (the 186 eval questions
    as Evaluation records): what the quickstart and every file in docs/examples read. The
    files they are made from are written into ``work``."""
    from tailor.workloads.evaluation.apibench import load_documents, load_questions, raft_question

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
    evals = work / "eval.jsonl"
    evals.write_text(
        "".join(
            json.dumps({"id": f"eval-{i}", "question": q.question, "apiCall": q.api_call}) + "\n"
            for i, q in enumerate(load_questions(data / "torchhub_eval.json"))
        )
    )
    for name, source, key in (
        ("torchhub-api", data / "torchhub_api.jsonl", "torchhub_api.jsonl"),
        ("torchhub-chat", train, "train.jsonl"),
        ("torchhub-questions", raft, "questions.jsonl"),
        ("torchhub-eval", evals, "eval.jsonl"),
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
