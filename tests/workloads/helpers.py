"""Helpers shared by the workload tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from tailor.api.workloads import ObjectStore
from tailor.devcluster.s3 import S3Server


class ThreadServer:
    """uvicorn serving an app on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app: Any):
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
