"""Installs sora_jax, its console scripts and the optional extras."""

from setuptools import setup

setup(
    name="sora_jax",
    license="Apache-2.0",
    version="0.1.0",
    description="Pretraining text-to-video diffusion transformers (Wan2.1 family) in JAX",
    python_requires=">=3.11",
    packages=[
        "sora_jax",
        "sora_jax.configs",
        "sora_jax.model",
        "sora_jax.diffusion",
        "sora_jax.data",
        "sora_jax.parallel",
        "sora_jax.train",
        "sora_jax.export",
        "sora_jax.evaluation",
        "sora_jax.encoders",
    ],
    # configs/ lives at the top of the repository (launch lines say --config=configs/NAME.py) and is
    # importable as sora_jax.configs so config files can share configs/base.py from any directory.
    package_dir={"sora_jax.configs": "configs"},
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
    ],
    extras_require={
        "test": [
            "pytest>=8.3",
            "pytest-xdist>=3.6",
            "chex>=0.1.90",
            "hypothesis>=6.100",
            "ruff>=0.8",
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
        ],
    },
    entry_points={
        "console_scripts": [
            "sora-train=sora_jax.train.__main__:run",
            "sora-eval=sora_jax.eval:run",
            "sora-sample=sora_jax.sample:run",
            "sora-prepare=sora_jax.prepare:run",
            "sora-export=sora_jax.export.__main__:run",
            "sora-compile=sora_jax.compile:run",
            "sora-recaption=sora_jax.recaption:run",
            "sora-demo=sora_jax.demo:run",
            "sora-synthetic=sora_jax.data.synthetic:run",
        ],
    },
)
