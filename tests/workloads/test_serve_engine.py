"""The generation engine's mechanics on a tiny random-init Llama (built from a config, with
the builtin tokenizer): int8 quantization that keeps LoRA in float, mixed-adapter batches,
queue limits, cancellation, stop sequences; the clear error for nf4 without a GPU; and the
``python -m tailor.workloads.serving.app`` entry point as a real process. What the answers say
is tested with the real model in test_serve.py."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tailor.api.common import ModelSource
from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import Paths, ServedAdapter
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_tokenizer
from tailor.workloads.serving.app import main as serve_main
from tailor.workloads.serving.engine.base import Chunk, QueueFull, SamplingParams
from tailor.workloads.serving.engine.builtin import Engine
from tailor.workloads.serving.engine.loading import load_model, quantize_int8_dynamic
from tailor.workloads.serving.engine.scheduler import GenerationRequest
from tests.workloads.helpers import free_port, tiny_llama_config, wait_until_ready

pytestmark = pytest.mark.workloads


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    paths = Paths(artifacts=str(tmp_path_factory.mktemp("artifacts")))
    return load_tokenizer(ModelSource(builtin="smollm2-135m-instruct"), paths)


def tiny_peft_model(tokenizer: Any, folder: Path) -> tuple[Any, dict[str, str]]:
    """A 2-layer random Llama with two random (non-zero) LoRA adapters, saved and reloaded
    the way the server loads them."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(tokenizer, max_position_embeddings=256)

    def fresh() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    for seed, name in enumerate(("a", "b")):
        base = fresh()
        torch.manual_seed(100 + seed)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(str(folder / name))
    peft_model = PeftModel.from_pretrained(fresh(), str(folder / "a"), adapter_name="adapter_0")
    peft_model.load_adapter(str(folder / "b"), adapter_name="adapter_1")
    return peft_model.eval(), {"a": "adapter_0", "b": "adapter_1"}


@pytest.fixture
def engine(tokenizer: Any, tmp_path: Path) -> Iterator[Engine]:
    model, adapters = tiny_peft_model(tokenizer, tmp_path)
    engine = Engine(model, tokenizer, adapters, max_batch_size=4, max_queue=8)
    engine.eos_ids = set()  # random weights: never stop early, so lengths are exact
    yield engine
    engine.close()


def test_int8_quantizes_base_linears_and_keeps_lora_float(tokenizer: Any, tmp_path: Path) -> None:
    model, _ = tiny_peft_model(tokenizer, tmp_path)
    ids = torch.tensor([tokenizer("hello world, how are you").input_ids] * 3)
    names = ["adapter_0", "adapter_1", "__base__"]
    with torch.inference_mode():
        before = model(input_ids=ids, adapter_names=names).logits[:, -1]
    quantize_int8_dynamic(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(layer.base_layer, dynamic)
    mlp = model.base_model.model.model.layers[0].mlp
    assert isinstance(mlp.up_proj, dynamic)
    assert type(mlp.down_proj) is torch.nn.Linear  # reads outlier activations: kept float
    assert type(layer.lora_A["adapter_0"]) is torch.nn.Linear
    assert layer.lora_A["adapter_0"].weight.dtype == torch.float32
    with torch.inference_mode():
        after = model(input_ids=ids, adapter_names=names).logits[:, -1]
    similarity = torch.nn.functional.cosine_similarity(before, after, dim=-1)
    assert similarity.min() > 0.99, similarity  # close, per adapter, after quantization
    assert not torch.allclose(after[0], after[2])  # adapters still change the output


def test_mixed_adapter_batch_and_exact_lengths(engine: Engine) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
    outputs: dict[str | None, queue.SimpleQueue[Chunk]] = {}
    for adapter in ("a", "b", None):
        outputs[adapter] = queue.SimpleQueue()
        engine.submit(
            prompt, adapter, SamplingParams(max_tokens=5 + len(outputs)), outputs[adapter].put
        )
    finals = {}
    for adapter, chunks in outputs.items():
        while (chunk := chunks.get(timeout=60)).finish_reason is None:
            pass
        finals[adapter] = chunk
    assert [finals[a].completion_tokens for a in ("a", "b", None)] == [6, 7, 8]
    assert {f.finish_reason for f in finals.values()} == {"length"}
    assert all(f.device_seconds > 0 for f in finals.values())
    texts = {a: engine.generate(prompt, a, SamplingParams(max_tokens=6)).text for a in finals}
    assert len(set(texts.values())) == 3  # each adapter (and the base) differs
    with pytest.raises(KeyError):
        engine.submit(prompt, "missing", SamplingParams(), lambda chunk: None)


def test_a_poisoned_request_fails_alone_and_the_batch_keeps_going(engine: Engine) -> None:
    """A request that breaks the forward pass in a prefill it shares with others (a token
    id beyond the embedding table: one ``submit`` refuses, put in the queue directly here,
    as a fault nothing checks would be) fails by itself; the requests admitted with it and
    the one already running all finish."""
    prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
    running: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
    engine.submit(prompt, "a", SamplingParams(max_tokens=40), running.put)
    assert running.get(timeout=60).finish_reason is None  # decoding in the batch
    outputs: list[queue.SimpleQueue[Chunk]] = [queue.SimpleQueue() for _ in range(3)]
    poisoned = [*prompt[:-1], engine.vocab_size + 7]
    with engine._cv:  # admitted together: one prefill of the three
        for out, ids in zip(outputs, (prompt, poisoned, prompt), strict=True):
            engine._waiting.append(GenerationRequest(ids, None, SamplingParams(max_tokens=4), out.put))  # fmt: skip
        engine._cv.notify()

    def last(chunks: queue.SimpleQueue[Chunk]) -> Chunk:
        while (chunk := chunks.get(timeout=60)).finish_reason is None:
            pass
        return chunk

    good, bad, other = (last(out) for out in outputs)
    assert (bad.finish_reason, bad.error) == ("error", "generation failed")
    assert good.finish_reason == other.finish_reason == "length"
    assert good.completion_tokens == other.completion_tokens == 4
    assert last(running).finish_reason == "length"
    # and the engine refuses such a prompt up front (the gateway answers 400)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(poisoned, None, SamplingParams(), lambda chunk: None)


def test_stop_sequence_is_cut_and_never_streamed(engine: Engine) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
    free = engine.generate(prompt, None, SamplingParams(max_tokens=12)).text
    stop = free[4:7]
    assert len(stop) == 3
    chunks: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
    engine.submit(prompt, None, SamplingParams(max_tokens=12, stop=(stop,)), chunks.put)
    pieces = []
    while True:
        chunk = chunks.get(timeout=60)
        pieces.append(chunk.text)
        if chunk.finish_reason:
            break
    text = "".join(pieces)
    assert chunk.finish_reason == "stop"
    assert text == free[: free.index(stop)]


def test_queue_limit_and_cancellation(engine: Engine) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
    long = SamplingParams(max_tokens=200)
    engine.max_batch_size, engine.max_queue = 1, 2
    running: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
    first = engine.submit(prompt, None, long, running.put)
    running.get(timeout=60)  # admitted and generating: the batch is full
    waiting = [engine.submit(prompt, None, long, lambda chunk: None) for _ in range(2)]
    with pytest.raises(QueueFull):
        engine.submit(prompt, None, long, lambda chunk: None)
    for request in waiting:
        request.cancel()
    first.cancel()
    while (chunk := running.get(timeout=60)).finish_reason is None:
        pass
    assert chunk.finish_reason == "cancelled" and chunk.completion_tokens < 200


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
    runs = [
        engine.generate(prompt, "a", SamplingParams(max_tokens=8, temperature=1.0, seed=seed))
        for seed in (7, 7, 8)
    ]
    assert runs[0].text == runs[1].text != runs[2].text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nf4_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "quantization": "nf4",
            "resources": {"gpus": 1},
        }
    )
    with pytest.raises(WorkloadError) as error:
        load_model(spec, [], Paths(artifacts=str(tmp_path)))
    assert error.value.reason == "QuantizationNeedsGPU"
    assert "int8" in error.value.message


def test_missing_adapter_fails_before_loading(tmp_path: Path) -> None:
    spec = ModelDeploymentSpec.model_validate({"baseModel": {"builtin": "smollm2-135m-instruct"}})
    adapter = ServedAdapter(name="support", path=str(tmp_path / "nothing"))
    with pytest.raises(WorkloadError, match="support") as error:
        load_model(spec, [adapter], Paths(artifacts=str(tmp_path)))
    assert error.value.reason == "AdapterNotFound"


def serve_process(tmp_path: Path, **run: Any) -> subprocess.Popen[str]:
    spec = {
        "spec": {"baseModel": {"builtin": "smollm2-135m-instruct"}},
        "servedName": "proc",
        "owner": {"kind": "ModelDeployment", "namespace": "test", "name": "proc"},
        "paths": {"artifacts": str(tmp_path)},
        "host": "127.0.0.1",
        **run,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [
        sys.executable,
        "-m",
        "tailor.workloads.serving.app",
        "--spec",
        str(tmp_path / "spec.json"),
    ]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def test_entry_point_serves_then_stops_on_sigterm(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    process = serve_process(tmp_path, port=port, metricsPort=metrics_port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process)
        body = {"model": "proc", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'tailor_serve_ready{deployment="proc"} 1.0' in scraped
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code in (0, -signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises


def test_entry_point_exits_2_for_a_missing_adapter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = {
        "spec": {"baseModel": {"builtin": "smollm2-135m-instruct"}},
        "servedName": "proc",
        "adapters": [{"name": "support", "path": str(tmp_path / "missing")}],
        "owner": {"kind": "ModelDeployment", "namespace": "test", "name": "proc"},
        "paths": {"artifacts": str(tmp_path)},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert serve_main(["--spec", str(tmp_path / "spec.json")]) == 2
    assert "AdapterNotFound" in caplog.text and "support" in caplog.text
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "port": "eighty"}))
    assert serve_main(["--spec", str(tmp_path / "spec.json")]) == 2
    assert "port" in caplog.text


BOUNDED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "digit": {"type": "integer", "minimum": 0, "maximum": 9},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["ok", "digit", "color"],
    "additionalProperties": False,
}


def test_a_random_model_answers_valid_json_under_a_schema_and_free_rows_are_untouched(
    engine: Engine,
) -> None:
    """Random weights have no idea of JSON: whatever they prefer, a row with a schema only
    samples what keeps it valid (greedy and sampled, batched with free rows), and ends when
    the object is complete."""
    import jsonschema

    from tailor.workloads.serving.engine.grammar import FormatError, format_key

    engine.eos_ids = set(_real_eos(engine))  # the grammar ends answers with a stop token
    prompt = engine.encode_chat([{"role": "user", "content": "a colour, please"}])
    key = format_key("json_schema", BOUNDED)
    chunks: list[queue.SimpleQueue[Chunk]] = []
    for i in range(6):
        chunks.append(queue.SimpleQueue())
        params = SamplingParams(
            max_tokens=64,
            temperature=0.0 if i % 2 else 1.0,
            seed=i,
            response_format=key if i < 4 else None,  # two free rows share the batch
        )
        engine.submit(prompt, "a" if i % 3 == 0 else None, params, chunks[-1].put)
    answers = []
    for sink in chunks:
        parts = []
        while (chunk := sink.get(timeout=120)).finish_reason is None:
            parts.append(chunk.text)
        answers.append(("".join(parts) + chunk.text, chunk.finish_reason))
    for text, reason in answers[:4]:
        assert reason == "stop", (text, reason)
        jsonschema.validate(json.loads(text), BOUNDED)
    for text, _ in answers[4:]:  # the same random model, free: not JSON of the schema
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(text), BOUNDED)
    anything = engine.generate(
        prompt, None, SamplingParams(max_tokens=48, response_format=format_key("json_object"))
    )
    if anything.finish_reason == "stop":  # (a random model may still be mid-object at 48)
        assert isinstance(json.loads(anything.text), dict)
    with pytest.raises(FormatError, match="not a valid JSON Schema"):
        format_key("json_schema", {"type": "objekt"})


def _real_eos(engine: Engine) -> set[int]:
    from tailor.workloads.serving.engine.scheduler import eos_ids

    return eos_ids(engine.tokenizer, engine.model.generation_config.eos_token_id)


def test_adapters_load_and_unload_while_a_request_runs(tokenizer: Any, tmp_path: Path) -> None:
    """An engine started without adapters loads one while a base-model request is being
    generated (the request finishes with every token), serves it with the same output as
    a model loaded with it from the start, replaces it under the same name, and unloads
    it: new requests for it are refused, the one still running on it finishes."""
    from transformers import LlamaForCausalLM

    model, adapters = tiny_peft_model(tokenizer, tmp_path)
    reference = Engine(model, tokenizer, adapters, max_batch_size=4)
    reference.eos_ids = set()
    prompt = reference.encode_chat([{"role": "user", "content": "hi"}])
    expected = {
        a: reference.generate(prompt, a, SamplingParams(max_tokens=6)).text for a in adapters
    }
    base_expected = reference.generate(prompt, None, SamplingParams(max_tokens=6)).text
    reference.close()

    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_llama_config(tokenizer, max_position_embeddings=256)).eval()
    engine = Engine(plain, tokenizer, {}, max_batch_size=4)
    engine.eos_ids = set()
    try:
        long: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        engine.submit(prompt, None, SamplingParams(max_tokens=120), long.put)
        assert long.get(timeout=60).finish_reason is None  # it runs
        engine.load_adapter("a", str(tmp_path / "a"))
        assert engine.adapter_names == ["a"]
        assert engine.generate(prompt, "a", SamplingParams(max_tokens=6)).text == expected["a"]
        assert engine.generate(prompt, None, SamplingParams(max_tokens=6)).text == base_expected

        # replaced under the same name: new requests get the new weights
        engine.load_adapter("a", str(tmp_path / "b"))
        assert engine.generate(prompt, "a", SamplingParams(max_tokens=6)).text == expected["b"]

        on_a: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        engine.submit(prompt, "a", SamplingParams(max_tokens=40), on_a.put)
        assert on_a.get(timeout=60).finish_reason is None
        engine.unload_adapter("a")
        assert engine.adapter_names == []
        with pytest.raises(KeyError):
            engine.submit(prompt, "a", SamplingParams(), lambda chunk: None)
        for chunks, tokens in ((on_a, 40), (long, 120)):
            while (chunk := chunks.get(timeout=120)).finish_reason is None:
                pass
            assert (chunk.finish_reason, chunk.completion_tokens) == ("length", tokens)
        assert engine.generate(prompt, None, SamplingParams(max_tokens=6)).text == base_expected

        with pytest.raises(WorkloadError, match=r"adapter c at .*missing"):
            engine.load_adapter("c", str(tmp_path / "missing"))
        engine.load_adapter("b", str(tmp_path / "b"))  # the engine still loads and serves
        assert engine.generate(prompt, "b", SamplingParams(max_tokens=6)).text == expected["b"]
    finally:
        engine.close()


def test_a_shared_prompt_prefix_is_computed_once_and_answers_the_same(
    tokenizer: Any, tmp_path: Path
) -> None:
    """Prompts that start with the same system prompt and examples reuse its KV (per
    adapter) and answer exactly as an engine without the prefix cache; the metric counts
    the tokens reused."""
    from tailor.observability.serving import ServingMetrics

    model, adapters = tiny_peft_model(tokenizer, tmp_path)
    metrics = ServingMetrics("prefix")
    cached = Engine(model, tokenizer, adapters, max_batch_size=4, metrics=metrics)
    plain = Engine(model, tokenizer, adapters, max_batch_size=4, prefix_cache_tokens=0)
    for engine in (cached, plain):
        engine.eos_ids = set()
    system = "You answer questions about the Torch Hub. " * 8
    examples = [{"role": "user", "content": "Which model segments images?"},
                {"role": "assistant", "content": "deeplabv3_resnet50"}]  # fmt: skip
    try:
        for adapter in (None, "a", None, "a"):
            for question in ("Which model detects objects?", "Which model classifies audio?"):
                messages = [{"role": "system", "content": system}, *examples,
                            {"role": "user", "content": question}]  # fmt: skip
                prompt = cached.encode_chat(messages)
                params = SamplingParams(max_tokens=6)
                assert (
                    cached.generate(prompt, adapter, params).text
                    == plain.generate(prompt, adapter, params).text
                )
        reused = metrics.value("tailor_serve_prefix_cache_tokens_total", result="reused")
        computed = metrics.value("tailor_serve_prefix_cache_tokens_total", result="computed")
        # the first prompt per adapter is computed whole; the other three reuse the shared part
        assert reused > 3 * computed / 2, (reused, computed)
    finally:
        cached.close()
        plain.close()


def test_rows_that_join_and_leave_the_batch_answer_as_each_request_alone(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running batch's KV slab under churn: prompts longer and shorter than the batch's
    window join mid-decode (each is submitted when the one before it streams its second
    token), rows finish at different steps (their slots are refilled from the end), more
    requests than slots wait, and almost no spare room (``ROOM`` 2) forces the buffers to
    move often. Every answer equals the same request run alone, which equals
    transformers' ``generate``."""
    from tailor.workloads.serving.engine import kvcache

    monkeypatch.setattr(kvcache, "ROOM", 2)
    model, adapters = tiny_peft_model(tokenizer, tmp_path)
    engine = Engine(model, tokenizer, adapters, max_batch_size=4, max_queue=16,
                    prefix_cache_tokens=0)  # fmt: skip
    engine.eos_ids = set()
    lengths = [5, 40, 12, 60, 8, 30, 70, 3, 25]
    max_tokens = [20, 6, 15, 4, 18, 9, 12, 7, 10]
    which = [None, "a", None, "b", None, None, "a", None, "b"]
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(100, 5000, (n,), generator=generator).tolist() for n in lengths]
    outputs: list[queue.SimpleQueue[Chunk]] = [queue.SimpleQueue() for _ in prompts]
    seen = [0] * len(prompts)

    def sink(i: int) -> Any:
        def put(chunk: Chunk) -> None:
            outputs[i].put(chunk)
            seen[i] += 1
            if seen[i] == 2 and i + 1 < len(prompts):  # the next joins while this decodes
                submit(i + 1)

        return put

    def submit(i: int) -> None:
        engine.submit(prompts[i], which[i], SamplingParams(max_tokens=max_tokens[i]), sink(i))

    def text(chunks: queue.SimpleQueue[Chunk]) -> tuple[str, int]:
        parts = []
        while (chunk := chunks.get(timeout=120)).finish_reason is None:
            parts.append(chunk.text)
        return "".join(parts) + chunk.text, chunk.completion_tokens

    try:
        submit(0)
        together = [text(out) for out in outputs]
        alone = [
            engine.generate(p, a, SamplingParams(max_tokens=n), timeout=120)
            for p, a, n in zip(prompts, which, max_tokens, strict=True)
        ]
        assert [(c.text, c.completion_tokens) for c in alone] == together
        assert [n for _, n in together] == max_tokens
        with torch.inference_mode(), model.disable_adapter():
            for prompt, adapter, n, (got, _) in zip(prompts, which, max_tokens, together, strict=True):  # fmt: skip
                if adapter is None:
                    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n,
                                         do_sample=False, eos_token_id=None)  # fmt: skip
                    assert got == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    finally:
        engine.close()
