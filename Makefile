# sora_jax: the README's commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_run
# CPU JAX: one process per test worker; torch's reference kernels share the same 2 cores.
PYTEST_WORKERS ?= 2

.PHONY: install test test-all test-gpu lint demo bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[test,torch,tpu]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow and not gpu" -n $(PYTEST_WORKERS) --dist loadfile tests

test-all: install
	$(PY) -m pytest -q -m "not gpu" -n $(PYTEST_WORKERS) --dist loadfile tests

# On a host with an NVIDIA GPU and jax's CUDA plugin: cudnn attention and bf16 steps (tests/test_gpu.py).
test-gpu: install
	JAX_PLATFORMS=cuda XLA_FLAGS= $(PY) -m pytest -q -m gpu tests

lint: install
	$(VENV)/bin/ruff check sora_jax configs tests bench experiments

demo: install
	$(PY) -m sora_jax.demo --config=configs/demo.py --out=$(DEMO_DIR)

bench: install
	$(PY) bench/data_pipeline.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
