"""sora_jax: pretraining text-to-video diffusion transformers (Wan2.1 family) in JAX/Flax.

Subpackages: model (DiT), diffusion (flow matching, samplers, training inputs), data (datasets,
prepare, pipeline), encoders (Wan VAE, umT5), parallel (mesh, sharding), train (trainer), evaluation
(val loss, samples, adherence), export (PyTorch formats), language (chat models, prompt extension),
main (the binaries; `python -m sora_jax.<name>` runs them).
"""

__version__ = "0.1.0"
