"""Exponential moving averages of the parameters, one tree per decay.

Owns the EMA tree layout ({"0.999": params-like tree, ...}, keyed by the decay as written in the
config so checkpoints and `--ema=0.999` in the export binary name the same thing) and its update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def decay_key(decay: float) -> str:
  """The EMA tree name of a decay: its shortest float repr, e.g. 0.999 -> "0.999"."""
  return repr(float(decay))


def init(params: Any, decays: Sequence[float]) -> dict[str, Any]:
  """One copy of the parameters per decay (copies, so donation of params cannot alias them)."""
  return {decay_key(d): jax.tree.map(jnp.copy, params) for d in decays}


def update(ema: dict[str, Any], params: Any, apply: jax.Array | bool = True) -> dict[str, Any]:
  """ema <- decay * ema + (1 - decay) * params for every tree; unchanged where `apply` is False."""
  updated = {}
  for key, tree in ema.items():
    decay = float(key)

    def mix(average: jax.Array, value: jax.Array, decay: float = decay) -> jax.Array:
      new = average + (1.0 - decay) * (value.astype(average.dtype) - average)
      return jnp.where(apply, new, average)

    updated[key] = jax.tree.map(mix, tree, params)
  return updated
