"""What the llama.cpp engine adds to the engine contract (which runs against it in
test_serve.py): PEFT adapters converted to GGUF LoRA answer as PEFT does, quantizations
are converted once and found by content, a cached prefix gives the same answers as a
prompt read whole, and requests that do not fit the KV cells wait instead of failing.
Real llama.cpp on the builtin SmolLM2 GGUF throughout."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tailor.api.common import ModelSource
from tailor.api.workloads import Paths
from tailor.observability.serving import ServingMetrics
from tailor.workloads.io.model_loading import load_causal_lm, load_tokenizer
from tailor.workloads.io.sources import builtin_path
from tailor.workloads.serving.engine.base import SamplingParams
from tailor.workloads.serving.engine.gguf_files import lora_file, model_file
from tailor.workloads.serving.engine.llamacpp import LlamaEngine

pytestmark = pytest.mark.workloads

SOURCE = ModelSource(builtin="smollm2-135m-instruct")
PROMPTS = ["Who are you?", "Name a fruit.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return Paths(artifacts=str(tmp_path_factory.mktemp("llamacpp")))


@pytest.fixture(scope="module")
def tokenizer(paths: Paths) -> Any:
    return load_tokenizer(SOURCE, paths)


@pytest.fixture(scope="module")
def gguf() -> Path:
    return builtin_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def float_file(gguf: Path) -> Path:
    """The builtin model's weights in float32: the same numbers transformers loads."""
    return model_file(gguf, "float")


def chat_ids(engine: LlamaEngine, question: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": question}])


def test_a_converted_lora_adapter_answers_as_peft_does(
    paths: Paths, tokenizer: Any, float_file: Path, gguf: Path, tmp_path: Path
) -> None:
    """A LoRA on every projection the converter maps (q and k need llama.cpp's row order),
    random and far from zero: greedy answers through llama.cpp equal PEFT's on the same
    float weights, and most differ from the base model's (the adapter is really applied)."""
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm(SOURCE, paths)
    torch.manual_seed(7)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        ),
        init_lora_weights=False,  # random A and B: the adapter changes every answer
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.3)  # changed answers, not gibberish
    peft_model.save_pretrained(str(tmp_path / "random"))
    engine = LlamaEngine(float_file, tokenizer, {"random": tmp_path / "random"}, lora_base=gguf)
    try:
        params = SamplingParams(max_tokens=12)
        changed = 0
        for question in PROMPTS:
            ids = chat_ids(engine, question)
            with torch.inference_mode():
                out = peft_model.generate(
                    input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False
                )
            expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            assert engine.generate(ids, "random", params).text == expected, question
            changed += engine.generate(ids, None, params).text != expected
        assert changed >= 2
    finally:
        engine.close()
    converted = lora_file(tmp_path / "random", gguf)
    assert lora_file(tmp_path / "random", gguf) == converted  # cached by content


def test_quantizations_are_made_once_and_found_by_content(gguf: Path, tmp_path: Path) -> None:
    """Each GGUF type is a file of that type, made once: asking again finds it (same file,
    untouched); a copy of the source elsewhere finds the same conversions."""
    import gguf as gguf_lib

    made = {}
    for quantization, expected in (("q8_0", "Q8_0"), ("q4_k_m", "Q4_K"), ("f16", "F16")):
        path = model_file(gguf, quantization)
        kinds = {t.tensor_type.name for t in gguf_lib.GGUFReader(path).tensors}
        assert expected in kinds, (quantization, kinds)
        made[quantization] = (path, path.stat().st_mtime_ns)
    copy = tmp_path / gguf.name
    copy.write_bytes(gguf.read_bytes())
    for quantization, (path, modified) in made.items():
        assert model_file(copy, quantization) == path
        assert path.stat().st_mtime_ns == modified
    assert model_file(gguf, "none") == gguf  # the file as it is


def test_a_cached_prefix_answers_as_the_whole_prompt_does(tokenizer: Any, float_file: Path) -> None:
    """Questions under one long system prompt: the second and later reuse its cells (the
    metrics count reused tokens) and answer exactly as an engine without a prefix cache."""
    system = "You are a helpful assistant for a bakery. " * 30
    questions = ["What do you sell?", "When do you open?", "Do you bake bread?"]
    metrics = ServingMetrics("prefix")
    cached = LlamaEngine(float_file, tokenizer, metrics=metrics)
    plain = LlamaEngine(float_file, tokenizer, prefix_cache_tokens=0)
    try:
        params = SamplingParams(max_tokens=10)
        for question in questions:
            ids = cached.encode_chat(
                [{"role": "system", "content": system}, {"role": "user", "content": question}]
            )
            assert cached.generate(ids, None, params).text == plain.generate(ids, None, params).text
        reused = metrics.value("tailor_serve_prefix_cache_tokens_total", result="reused")
        assert reused >= 2 * len(tokenizer(system).input_ids), reused
    finally:
        cached.close()
        plain.close()


def test_requests_beyond_the_kv_cells_wait_and_all_finish(tokenizer: Any, gguf: Path) -> None:
    """Cells for two requests at a time: four concurrent ones all finish (none fails for
    want of cells), never more than two running at once."""
    engine = LlamaEngine(gguf, tokenizer, context_window=128, kv_cells=128 * 2 - 1)
    engine.eos_ids = set()  # every answer runs to max_tokens: the reservations are exact
    try:
        results: list[Any] = []
        peak = 0

        def one(i: int) -> None:
            ids = chat_ids(engine, f"Count to {i + 3}.")
            results.append(
                engine.generate(ids, None, SamplingParams(max_tokens=256 - len(ids) - 60))
            )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, len(engine._rows))
            time.sleep(0.005)
        assert [r.finish_reason for r in results] == ["length"] * 4
        assert 1 <= peak <= 2
        assert engine.drain(5)
    finally:
        engine.close()
