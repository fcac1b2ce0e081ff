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

A, B = "lora_a", "lora_b"  # adapter parameters beside a projection's kernel: [*in, r] and [r, *out]
ADAPTERS = (A, B)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections carry adapters, of which rank, at which scale (alpha / rank)."""

  rank: int
  alpha: float
  targets: tuple[str, ...]

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
  return LoraSpec(rank, alpha if alpha > 0 else float(rank), tuple(train.lora_targets))


def path_name(module_path: Sequence[str]) -> str:
  """`blocks/attn1/to_q` for a module path, the same for scanned blocks and unscanned `blocks_<i>`."""
  return "/".join("blocks" if re.fullmatch(r"blocks_\d+", part) else part for part in module_path)


def init_a(rng: jax.Array, fan_in: int, rank: int, dtype: Any) -> jax.Array:
  """A [fan_in, rank] as PEFT initialises it (kaiming-uniform with a = sqrt(5): U(±1/sqrt(fan_in)))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rng, (fan_in, rank), dtype, -bound, bound)



def _nested(items: list[tuple[tuple[str, ...], Any]]) -> dict:
  tree: dict = {}
  for keys, value in items:
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def _items(tree: Mapping) -> list[tuple[tuple[str, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: not isinstance(x, Mapping))[0]
  return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def split(params: Mapping) -> tuple[dict, dict]:
  """(frozen weights, adapters) of a parameter tree with adapters: two nested dicts of its leaves."""
  frozen, adapters = [], []
  for keys, leaf in _items(params):
    (adapters if keys[-1] in ADAPTERS else frozen).append((keys, leaf))
  return _nested(frozen), _nested(adapters)


def combine(frozen: Mapping, adapters: Mapping) -> dict:
  """The parameter tree the adapted model reads: `split`'s inverse."""
  return _nested(_items(frozen) + _items(adapters))


def adapted_modules(params: Mapping) -> set[tuple[str, ...]]:
  """Key paths of the modules that carry adapters in `params`."""
  return {keys[:-1] for keys, _ in _items(params) if keys[-1] in ADAPTERS}


def has_adapters(params: Mapping) -> bool:
  return any(keys[-1] in ADAPTERS for keys, _ in _items(params))


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
  frozen, adapters = split(params)
  merged = []
  adapted = {keys[:-1]: None for keys, _ in _items(adapters)}
  for module in adapted:
    node = adapters
    for key in module:
      node = node[key]
    kernel_node = frozen
    for key in module:
      kernel_node = kernel_node[key]
    kernel = kernel_node["kernel"]
    updated = kernel.astype(jnp.float32) + delta(node[A], node[B], kernel.shape, scale)
    merged.append((module + ("kernel",), updated.astype(kernel.dtype)))
  kept = [(keys, leaf) for keys, leaf in _items(frozen) if keys[:-1] not in adapted or keys[-1] != "kernel"]
  return _nested(kept + merged)
