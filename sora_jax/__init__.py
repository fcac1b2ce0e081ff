"""sora_jax: pretraining text-to-video diffusion transformers (Wan2.1 family) in JAX/Flax.

Subpackages: model (DiT), diffusion (flow matching, samplers), data (datasets, pipeline),
parallel (mesh, sharding), train (trainer), export (PyTorch formats).
"""

__version__ = "0.1.0"
