"""LoRA: low-rank adapters on the DiT's projections, and the trees a LoRA run splits its weights into.

Owns `LoraSpec` (rank, scale, which projections: train.lora_*), the adapter parameters' names and
initialisation as `DenseGeneral` creates them, the split of a parameter tree into frozen weights and
adapters (and back), and `merge`, which folds adapters into the weights they adapt (W + s·A·B), the
plain DiT that eval, sample and export read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

A, B = "lora_a", "lora_b"  # adapter parameters beside a projection's kernel: [*in, r] and [r, *out]
ADAPTERS = (A, B)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections carry adapters, of which rank, at which scale (alpha / rank)."""

  rank: int
  alpha: float
  targets: tuple[str, ...]
  # The frozen projection kernels are in host memory; each projection brings its own to the device
  # when it runs (a layer at a time under scan, again in the rematerialised backward).
  frozen_on_host: bool = False

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def adapts(self, module_path: Sequence[str]) -> bool:
    """Whether the projection at `module_path` (a flax module path) carries adapters."""
    return any(re.search(pattern, path_name(module_path)) for pattern in self.targets)


def spec_of(train: ml_collections.ConfigDict) -> LoraSpec | None:
  """The LoRA of train.lora_*, or None for a run that trains the whole DiT."""
  rank = int(train.lora_rank)
  if rank <= 0:
    return None
  alpha = float(train.lora_alpha)
  return LoraSpec(rank, alpha if alpha > 0 else float(rank), tuple(train.lora_targets),
                  frozen_on_host="frozen" in tuple(train.host_state))


def path_name(module_path: Sequence[str]) -> str:
  """`blocks/attn1/to_q` for a module path, the same for scanned blocks and unscanned `blocks_<i>`."""
  return "/".join("blocks" if re.fullmatch(r"blocks_\d+", part) else part for part in module_path)


def init_a(rng: jax.Array, fan_in: int, rank: int, dtype: Any) -> jax.Array:
  """A [fan_in, rank] as PEFT initialises it (kaiming-uniform with a = sqrt(5): U(±1/sqrt(fan_in)))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rng, (fan_in, rank), dtype, -bound, bound)



def split(params: Mapping) -> tuple[dict, dict]:
  """(frozen weights, adapters) of a parameter tree with adapters: two nested dicts of its leaves."""
  flat = traverse_util.flatten_dict(params)
  frozen = {keys: leaf for keys, leaf in flat.items() if keys[-1] not in ADAPTERS}
  adapters = {keys: leaf for keys, leaf in flat.items() if keys[-1] in ADAPTERS}
  return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(adapters)


def combine(frozen: Mapping, adapters: Mapping) -> dict:
  """The parameter tree the adapted model reads: `split`'s inverse."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                       **traverse_util.flatten_dict(adapters)})


def adapted_modules(params: Mapping) -> set[tuple[str, ...]]:
  """Key paths of the modules that carry adapters in `params`."""
  return {keys[:-1] for keys in traverse_util.flatten_dict(params) if keys[-1] in ADAPTERS}


def delta(a: jax.Array, b: jax.Array, kernel_shape: Sequence[int], scale: float) -> jax.Array:
  """scale · A·B in the kernel's shape: A [*lead, *in, r], B [*lead, r, *out] (lead: scanned layers)."""
  lead = a.ndim - 1 + b.ndim - 1 - len(kernel_shape)
  fan_in = math.prod(a.shape[lead:-1])
  fan_out = math.prod(b.shape[lead + 1:])
  a2 = a.reshape(*a.shape[:lead], fan_in, a.shape[-1]).astype(jnp.float32)
  b2 = b.reshape(*b.shape[:lead], b.shape[lead], fan_out).astype(jnp.float32)
  return (scale * jnp.matmul(a2, b2)).reshape(tuple(kernel_shape))


def merge(params: Mapping, scale: float) -> dict:
  """The plain DiT parameters of an adapted tree: every adapted kernel W becomes W + scale·A·B (in
  W's dtype), and the adapters are gone."""
  flat = traverse_util.flatten_dict(params)
  for module in adapted_modules(params):
    kernel = flat[(*module, "kernel")]
    updated = kernel.astype(jnp.float32) + delta(flat[(*module, A)], flat[(*module, B)], kernel.shape, scale)
    flat[(*module, "kernel")] = updated.astype(kernel.dtype)
  return traverse_util.unflatten_dict({keys: leaf for keys, leaf in flat.items() if keys[-1] not in ADAPTERS})
