"""Checkpoint evaluation: validation loss on a fixed sigma grid, sample media, prompt adherence.

Library code behind the `sora_jax.eval` and `sora_jax.sample` binaries; reads no flags.
"""
