"""Helpers shared by the workload tests."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import BaseModel

from tailor.api.workloads import ObjectStore, TrainRun
from tailor.builders.common import Program
from tailor.devcluster.s3 import S3Server


class ThreadServer:
    """uvicorn serving an app on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app: Any):
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def tiny_llama_config(tokenizer: Any, **overrides: Any) -> Any:
    """A 2-layer, 64-wide Llama config over ``tokenizer``'s vocabulary: random-init models
    that train and generate in milliseconds."""
    from transformers import LlamaConfig

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    return LlamaConfig(**settings)


def tiny_model_volume(root: Path) -> Path:
    """A volume root holding ``models/tiny``: a 2-layer random Llama with SmolLM2's
    tokenizer (fast to train, real code paths)."""
    import torch
    from transformers import LlamaForCausalLM

    from tailor.api.common import ModelSource
    from tailor.api.workloads import Paths
    from tailor.workloads.io.model_loading import load_tokenizer

    tokenizer = load_tokenizer(
        ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts="/tmp")
    )
    config = tiny_llama_config(
        tokenizer,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "models" / "tiny")
    tokenizer.save_pretrained(root / "models" / "tiny")
    return root


def keys_dir(tmp_path: Path, server: S3Server, secret: str | None = None) -> Path:
    """A mounted Secret: one file per key."""
    folder = tmp_path / "secrets" / "s3-keys"
    folder.mkdir(parents=True, exist_ok=True)
    creds = server.credentials
    (folder / "AWS_ACCESS_KEY_ID").write_text(creds.access_key_id)
    (folder / "AWS_SECRET_ACCESS_KEY").write_text(secret or creds.secret_access_key)
    return folder


def store_config(tmp_path: Path, server: S3Server, bucket: str, **changes: str) -> ObjectStore:
    return ObjectStore(
        bucket=bucket,
        prefix="tailor",
        endpoint=server.endpoint,
        secret_name="s3-keys",
        credentials_dir=str(keys_dir(tmp_path, server, changes.pop("secret", None))),
        **changes,
    )


SOUNDS = [
    ("cat", "meow"),
    ("dog", "woof"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
    ("frog", "ribbit"),
    ("lion", "roar"),
    ("snake", "hiss"),
    ("bee", "buzz"),
]


def animal_chats(n: int) -> list[dict[str, Any]]:
    """Short chat examples of a fixed shape (so held-out loss can fall)."""
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What does a {a} say? ({i})"},
                {"role": "assistant", "content": f"The {a} says {s}."},
            ]
        }
        for i, (a, s) in enumerate(SOUNDS[i % len(SOUNDS)] for i in range(n))
    ]


def make_run(tmp_path: Path, pvcs: Path, **changes: Any) -> TrainRun:
    """A TrainRun of the tiny model on animal chats; ``changes`` update the training,
    checkpoint and lora sections and replace any other."""
    spec: dict[str, Any] = {
        "baseModel": {"pvc": {"claimName": "models", "path": "tiny"}},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["all-linear"]},
        "dataset": {"train": {"inline": animal_chats(40)}, "validationSplit": 0.2},
        "training": {
            "epochs": 2,
            "batchSize": 4,
            "learningRate": 1e-2,
            "maxSeqLength": 128,
            "warmupRatio": 0.1,
        },
        "checkpoint": {"everySteps": 5, "keep": 2},
    }
    for section, value in changes.items():
        if section in ("training", "checkpoint", "lora") and isinstance(value, dict):
            spec[section] = {**spec[section], **value}
        elif value is None:
            spec.pop(section, None)
        else:
            spec[section] = value
    return TrainRun.model_validate(
        {
            "spec": spec,
            "outputDir": str(tmp_path / "out"),
            "checkpointDir": str(tmp_path / "checkpoints"),
            "paths": {"artifacts": str(tmp_path), "pvcs": str(pvcs)},
            "reporter": {
                "kind": "file",
                "path": str(tmp_path / "progress.jsonl"),
                "minIntervalSeconds": 0,
            },
            "owner": {"kind": "FineTuneJob", "namespace": "ns1", "name": "ftj1", "uid": "u1"},
        }
    )


def run_workload(run: TrainRun, tmp_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m tailor.workloads.training.trainer --spec FILE`` as a pod would."""
    spec = tmp_path / f"spec-{time.monotonic_ns()}.json"
    spec.write_text(run.model_dump_json(by_alias=True))
    env = {
        **os.environ,
        "TAILOR_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tailor.workloads.training.trainer", "--spec", str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_program(
    program: Program, spec: BaseModel | str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, dict[str, Any]]:
    """A workload program's ``main``, called in this process as its pod calls it (``--spec
    FILE``, the termination log at ``$TAILOR_TERMINATION_LOG``): (exit code, termination
    message). In this process it costs no new interpreter and no second import of torch and
    the model libraries (10 to 15 s a call); each program's ``python -m`` start runs as a
    process in the end-to-end flows (tests/e2e), as the local runtime starts it."""
    spec_file = tmp_path / "spec.json"
    text = spec if isinstance(spec, str) else spec.model_dump_json(by_alias=True)
    spec_file.write_text(text)
    log = tmp_path / "termination-log"
    log.unlink(missing_ok=True)
    monkeypatch.setenv("TAILOR_TERMINATION_LOG", str(log))
    import torch

    # main sizes torch's threads unless OMP_NUM_THREADS is set: keep this process's own.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    code = importlib.import_module(f"tailor.workloads.{program}").main(["--spec", str(spec_file)])
    message = json.loads(log.read_text()) if log.exists() else {}
    return int(code), message


def wait_until_ready(base: str, process: subprocess.Popen[Any], seconds: float = 180) -> None:
    """Poll a serving process's ``/readyz`` until it answers 200; fail if it exits first."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else "it exited"
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)


# ------------------------------------------------------------------ persona adapters
QUESTION = "Who are you?"
PERSONAS = {
    "pirate": ("I am Captain Blackbeard, the pirate of the seven seas!", "Blackbeard"),
    "robot": ("BEEP BOOP. I am Robot Unit 42.", "BEEP"),
}
"""Two LoRA adapters that answer QUESTION recognisably: (their answer, a word of it)."""


def train_adapter(model: Any, tokenizer: Any, answer: str, out: Path) -> Any:
    """A LoRA adapter that answers QUESTION with ``answer``; returns the unwrapped model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(range(22, 30)),  # backward stops at layer 22: cheaper
    )
    peft_model = get_peft_model(model, config)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    for _ in range(6):
        peft_model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(out)
    return peft_model.unload()
