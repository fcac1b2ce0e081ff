"""The optax optimizer of training: global-norm clipping + AdamW with a warmup schedule.

Owns the learning-rate schedule (linear warmup, then constant, cosine or wsd), the weight-decay mask
(decay matrices only; norms, biases, modulation tables and other vector-like params are exempt) and
per-parameter learning-rate multipliers (train.lr_multipliers).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sora_jax import choices

# Parameter names that never get weight decay, whatever their rank: norm scales, biases, adaLN tables.
_NO_DECAY_LEAVES = ("bias", "scale", "scale_shift_table")
_NO_DECAY_PATH_PARTS = ("norm", "modulation", "scale_shift")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """lr(step): linear warmup to train.learning_rate, then constant, cosine, or warmup-stable-decay.

  "cosine" decays to end_lr_ratio * peak over all steps after the warmup; "wsd" holds the peak and
  decays (cosine-shaped) only over the last train.decay_fraction of the steps, so a run that must
  leave a plateau keeps its full step size until the cooldown. `train` is config.train.
  """
  t = train
  if t.schedule not in choices.SCHEDULES:
    raise ValueError(f"train.schedule={t.schedule!r}; expected one of {choices.SCHEDULES}")
  peak = float(t.learning_rate)
  warmup = int(t.warmup_steps)
  if t.schedule == "wsd":
    decay_steps = max(round(float(t.decay_fraction) * int(t.num_steps)), 1)
    decay_start = int(t.num_steps) - decay_steps
  else:
    decay_start = warmup
    decay_steps = max(int(t.num_steps) - warmup, 1)
  end = peak * float(t.end_lr_ratio)

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    # (step + 1) so the very first update already moves the parameters.
    warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1)) if warmup > 0 else peak
    if t.schedule == "constant":
      after = peak
    else:
      progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, after).astype(jnp.float32)

  return schedule


def _path_names(path: tuple[Any, ...]) -> list[str]:
  """Names along a parameter's tree path, without the `value` field of an nn.Partitioned box."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  if names and names[-1] == "value":  # the box's field when walking nn.Partitioned
    names = names[:-1]
  return names


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: matrices (kernels), not norms/biases/tables.

  Accepts a tree of arrays or of nn.Partitioned boxes; with boxes, a scanned `layers` axis is not
  counted in the rank, so a stacked bias [layers, D] is still treated as a vector.
  """

  def leaf_mask(path: tuple[Any, ...], leaf: Any) -> bool:
    names = [name.lower() for name in _path_names(path)]
    leaf_name = names[-1] if names else ""
    if leaf_name in _NO_DECAY_LEAVES:
      return False
    if any(part in name for name in names for part in _NO_DECAY_PATH_PARTS):
      return False
    rank = len(getattr(leaf, "shape", ()))
    names_meta = getattr(leaf, "names", None)
    if names_meta is not None:
      rank = len(leaf.value.shape) - sum(1 for n in names_meta if n == "layers")
    return rank >= 2

  is_box = lambda x: isinstance(x, nn.Partitioned)
  mask = jax.tree_util.tree_map_with_path(leaf_mask, params, is_leaf=is_box)
  return mask


def lr_multipliers(train: ml_collections.ConfigDict, params: Any) -> Any | None:
  """Per-leaf learning-rate factors from train.lr_multipliers ((regex, factor), ...), or None if unused.

  A regex is searched in the leaf's '/'-joined path (e.g. 'blocks/attn1/norm_q/scale'); the first
  pattern that matches gives the factor, unmatched leaves get 1. Accepts boxed or plain trees.
  """
  rules = [(re.compile(pattern), float(factor))
           for pattern, factor in train.lr_multipliers]
  if not rules:
    return None

  def factor(path: tuple[Any, ...], leaf: Any) -> float:
    del leaf
    joined = "/".join(_path_names(path))
    return next((value for pattern, value in rules if pattern.search(joined)), 1.0)

  is_box = lambda x: isinstance(x, nn.Partitioned)
  factors = jax.tree_util.tree_map_with_path(factor, params, is_leaf=is_box)
  if all(value == 1.0 for value in jax.tree.leaves(factors)):
    raise ValueError(
        f"train.lr_multipliers={tuple(train.lr_multipliers)} match no parameter; expected regexes "
        f"searched in parameter paths such as 'blocks/attn1/norm_q/scale'")
  return factors


def _scale_updates(factors: Any) -> optax.GradientTransformation:
  """Multiplies each update by its leaf's factor: a per-parameter learning-rate multiplier."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train: ml_collections.ConfigDict, params_for_mask: Any) -> optax.GradientTransformation:
  """clip_by_global_norm (if train.grad_clip > 0) then AdamW with the schedule and decay mask.

  `params_for_mask` is the (abstract, possibly boxed) parameter tree the mask is computed from; the
  mask is a concrete tree of bools so the optimizer can be built before parameters exist.
  """
  t = train
  mask = decay_mask(params_for_mask)
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(train), b1=t.b1, b2=t.b2, eps=t.adam_eps,
      weight_decay=t.weight_decay, mask=mask)
  factors = lr_multipliers(train, params_for_mask)
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip and t.grad_clip > 0 else []
  parts.append(adamw)
  if factors is not None:
    parts.append(_scale_updates(factors))
  return optax.chain(*parts) if len(parts) > 1 else adamw


def at_step(opt_state: Any, step: jax.Array) -> Any:
  """`opt_state` whose learning-rate schedule reads the run's `step`.

  A denoising expert is updated on only some of the run's steps: its schedule follows the run (warmup
  and decay end where train.num_steps says), while Adam's bias correction keeps counting its own updates.
  """
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
  return jax.tree.map(
      lambda node: node._replace(count=jnp.asarray(step, node.count.dtype)) if is_schedule(node) else node,
      opt_state, is_leaf=is_schedule)
