# sora_jax: the README's commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_run
# CPU JAX: one process per test worker; torch's reference kernels share the same 2 cores.
PYTEST_WORKERS ?= 2

.PHONY: install test test-all test-gpu lint demo bench bench-docs clean

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

# Every benchmark that runs on this CPU host, each rewriting its results file and its docs section
# (hours on 2 cores: run it on an otherwise idle machine). The GPU step (bench/gpu_step.py) needs a GPU.
R := bench/results
bench-docs: install
	$(PY) bench/data_pipeline.py --write_docs
	$(PY) bench/bucket_reads.py --write_bucket_docs
	$(PY) bench/train_step.py --json=$(R)/train_step_cpu.json --write_docs
	$(PY) bench/step_profile.py --json=$(R)/step_profile_cpu.json --write_docs
	$(PY) bench/cpu_roofline.py --out_json=$(R)/cpu_roofline.json --write_docs
	$(PY) bench/cpu_attention.py --out_json=$(R)/cpu_attention.json --write_docs
	$(PY) bench/cpu_reductions.py --out_json=$(R)/cpu_reductions.json --write_docs
	$(PY) bench/vae.py --variant=wan2.1 --json=$(R)/vae_cpu.json --write_docs
	$(PY) bench/vae.py --variant=wan2.2 --json=$(R)/vae_wan22_cpu.json --write_docs
	$(PY) bench/vae_flops.py $(R)/vae_flops_480x832.json --write_docs
	$(PY) bench/eval_scores.py --out_json=$(R)/eval_scores_cpu.json --write_docs
	$(PY) bench/model_flops.py --out_json=$(R)/model_flops.json --write_docs
	$(PY) bench/packing.py --out=$(R)/packing_cpu.json --write_docs
	$(PY) bench/fault_figures.py --out=$(R)/fault_figures.json --write_docs
	$(PY) bench/tpu_fit.py --out=$(R)/tpu_fit.json --write_docs
	$(PY) bench/tpu_fit.py --configs=wan2_2_ti2v_5b --resolutions=720p121 --topologies=v5p-8,v5p-64 \
	    --limit=256 --out=$(R)/tpu_fit_wan22.json --write_docs
	$(PY) bench/tpu_fit.py --configs=wan2_2_t2v_a14b --resolutions=720p --topologies=v5p-8,v5p-128 \
	    --limit=256 --out=$(R)/tpu_fit_a14b.json --write_docs
	$(PY) bench/tpu_fit.py --study=targets --write_docs
	$(PY) bench/tpu_fit.py --study=backends --write_docs
	$(PY) bench/tpu_fit.py --study=memory --write_docs
	$(PY) bench/tpu_fit.py --study=recipe --write_docs
	$(PY) bench/tpu_fit.py --study=lora --write_docs
	$(PY) bench/tpu_fit.py --study=sparse --write_docs
	$(PY) bench/tpu_fit.py --study=eval --write_docs
	$(PY) bench/lora_step.py --write_docs
	$(PY) bench/sparse_attention_speed.py --write_docs
	$(PY) bench/sparse_attention_quality.py --write_docs  # about an hour: 12 short training runs
	$(PY) bench/gpu_step.py --from_results=$(R)/gpu_step_h200.json --write_docs
	$(PY) bench/demo_docs.py --write_docs  # from the kept demo_run/demo_summary.json ($(R)/demo_cpu.json)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
