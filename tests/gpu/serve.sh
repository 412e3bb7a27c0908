#!/usr/bin/env bash
# Serving on a GPU: vLLM with two LoRA adapters, alone and behind Tailor's gateway, at
# concurrency 1, 16 and 64 (tests/bench/bench_gateway.py; goal: the gateway costs <= 5% of
# vLLM's own tokens/s at 64). Needs a CUDA GPU, vLLM importable by $VLLM_PY (default: the
# same Python) and the model in $MODEL (a folder or a Hub repo reachable from here); the
# adapters are trained on the spot (a few steps each) so nothing has to be downloaded.
#   MODEL=/models/SmolLM2-135M-Instruct tests/gpu/serve.sh
# VLLM_ARGS adds vLLM flags (e.g. "--attention-backend TRITON_ATTN"), BENCH_ARGS replaces the
# benchmark's sizes, LOG_DIR keeps vLLM's log there.
# Prints the table, then checks that the running vLLM exports every metric the serving
# dashboard's vLLM row reads; exit status non-zero when something fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-$PY}
MODEL=${MODEL:?set MODEL to the base model folder (Hugging Face format)}
PORT=${PORT:-8001}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -lt 1 ]; then
  echo "no CUDA GPU visible: this check needs one" >&2
  exit 2
fi
if ! "$VLLM_PY" -c 'import vllm' 2>/dev/null; then
  echo "vLLM is not importable by $VLLM_PY: pip install vllm (or set VLLM_PY)" >&2
  exit 2
fi
WORK=$(mktemp -d)
LOG=${LOG_DIR:-$WORK}/vllm.log
BENCH_ARGS=${BENCH_ARGS:---prompts 256 --max-tokens 128}
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$PY" - "$MODEL" "$WORK" <<'PYTHON'
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model_dir, work = sys.argv[1], sys.argv[2]
for seed, name in enumerate(("pirate", "robot")):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(f"{work}/{name}")
PYTHON
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL" --served-model-name bench --host 127.0.0.1 --port "$PORT" \
  --tensor-parallel-size "$GPUS" --enable-prefix-caching --enable-lora --max-loras 8 \
  --max-lora-rank 16 --lora-modules "bench/pirate=$WORK/pirate" "bench/robot=$WORK/robot" \
  ${VLLM_ARGS:-} > "$LOG" 2>&1 &
VLLM_PID=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break
  kill -0 "$VLLM_PID" 2>/dev/null || break  # vLLM exited: its log says why
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/models" || { tail -50 "$LOG"; exit 1; }
echo
"$PY" -c 'import torch; print("GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
"$PY" -c 'import vllm; print("vLLM", vllm.__version__)' 2>/dev/null || true
"$PY" tests/bench/bench_gateway.py --upstream-url "http://127.0.0.1:$PORT" --model bench \
  --model-dir "$MODEL" --concurrency 1,16,64 $BENCH_ARGS
echo
echo "adapters in place through vLLM's runtime API (what a ModelDeployment's gateway does):"
"$PY" - "http://127.0.0.1:$PORT" "$WORK" <<'PYTHON'
import sys, httpx
from tailor.api.workloads import UpstreamEngineConfig
from tailor.workloads.serving.engine.upstream import UpstreamEngine
url, work = sys.argv[1], sys.argv[2]
engine = UpstreamEngine(UpstreamEngineConfig(url=url, model="bench", load_adapters=True), None, [], 2048)
def served():
    return sorted(m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"])
engine.load_adapter("extra", f"{work}/pirate")
assert "bench/extra" in served(), served()
engine.load_adapter("extra", f"{work}/robot")  # retrained: a new name first, then the old goes
assert "bench/extra@2" in served() and "bench/extra" not in served(), served()
engine.unload_adapter("extra")
assert not any(m.startswith("bench/extra") for m in served()), served()
print("  load, replace and unload: ok;", served())
PYTHON
echo
echo "vLLM metrics the serving dashboard's vLLM row reads:"
"$PY" - "http://127.0.0.1:$PORT" <<'PYTHON'
import sys, httpx
from tailor.observability.dashboards import vllm_metric_names
text = httpx.get(f"{sys.argv[1]}/metrics").text
exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
missing = vllm_metric_names() - exposed
assert not missing, f"the running vLLM does not export {sorted(missing)}"
print("  all exported:", ", ".join(sorted(vllm_metric_names())))
PYTHON
