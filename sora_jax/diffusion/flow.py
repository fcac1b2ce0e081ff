"""Rectified-flow training objective: the noise level sigma, the noisy input and the velocity target.

Owns sigma sampling (uniform, logit-normal, mode) with the resolution shift, interpolation, the
(masked) MSE loss, caption dropout for classifier-free guidance, and the sigma buckets of eval metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import choices

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

SIGMA_SAMPLINGS = choices.SIGMA_SAMPLINGS
# The mode density is monotone in u (a valid sigma map onto [0, 1]) only for scales in this range.
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def shift_sigma(sigma: ArrayLike, shift: ArrayLike) -> Array:
  """Resolution shift sigma' = s*sigma / (1 + (s-1)*sigma); fixes 0 and 1, s > 1 moves mass to noise.

  `shift` is a scalar or broadcasts against `sigma` (one shift per example when clip sizes differ).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  shift = jnp.asarray(shift, jnp.float32)
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shift_for_tokens(tokens_per_clip: ArrayLike, diffusion_config: Mapping[str, Any]) -> Array:
  """Training shift of a clip of `tokens_per_clip` patch tokens (SD3/Flux resolution-dependent shift).

  Linear in tokens between (base_shift_tokens, base_shift) and (max_shift_tokens, max_shift), held at
  the end values outside that range so long videos do not get an unbounded shift.
  """
  d = diffusion_config
  if d.max_shift_tokens <= d.base_shift_tokens:
    raise ValueError(
        f"diffusion.max_shift_tokens={d.max_shift_tokens} must be greater than "
        f"diffusion.base_shift_tokens={d.base_shift_tokens} to derive the shift from tokens per clip")
  tokens = jnp.asarray(tokens_per_clip, jnp.float32)
  fraction = (tokens - d.base_shift_tokens) / (d.max_shift_tokens - d.base_shift_tokens)
  fraction = jnp.clip(fraction, 0.0, 1.0)
  return d.base_shift + fraction * (d.max_shift - d.base_shift)


def final_shift_start(diffusion_config: Mapping[str, Any], num_steps: int) -> int | None:
  """First step trained with diffusion.final_shift (the last final_shift_fraction of num_steps), or None."""
  d = diffusion_config
  if d.final_shift <= 0:
    return None
  # The same step as the "wsd" cooldown's start (train/optimizer.py) for the same fraction.
  return int(num_steps) - max(round(float(d.final_shift_fraction) * int(num_steps)), 1)


def training_shift(diffusion_config: Mapping[str, Any], tokens_per_clip: ArrayLike | None = None,
                   step: ArrayLike | None = None, num_steps: int | None = None) -> Array:
  """The shift `sample_sigma` applies: derived from tokens per clip, or the fixed diffusion.shift.

  With diffusion.final_shift > 0 and the trainer's `step` (traced) and train.num_steps given, steps from
  `final_shift_start` on use final_shift instead: e.g. mostly high noise while the model learns the
  layout and motion prior, then the full range while the learning rate cools down.
  """
  d = diffusion_config
  if d.shift_from_tokens:
    if tokens_per_clip is None:
      raise ValueError(
          "diffusion.shift_from_tokens=True needs tokens_per_clip (patch tokens of each clip); got None")
    shift = shift_for_tokens(tokens_per_clip, d)
  else:
    shift = jnp.asarray(d.shift, jnp.float32)
  if step is None or num_steps is None:
    return shift
  start = final_shift_start(d, num_steps)
  if start is None:
    return shift
  return jnp.where(jnp.asarray(step) >= start, jnp.float32(d.final_shift), shift)


def sample_sigma(
    rng: Array,
    shape: tuple[int, ...],
    diffusion_config: Mapping[str, Any],
    tokens_per_clip: ArrayLike | None = None,
    step: ArrayLike | None = None,
    num_steps: int | None = None,
    sigma_range: tuple[float, float] | None = None,
) -> Array:
  """Draws noise levels sigma in [0, 1] of `shape` (e.g. [B], or [B, N] per token) as float32.

  The density is diffusion.sigma_sampling; the shift (fixed, or from `tokens_per_clip`, a scalar or
  an array broadcasting against `shape`; diffusion.final_shift once `step` reaches its start) is
  applied after drawing. `sigma_range` (low, high): the same density truncated to that range (one
  denoising expert's noise levels), drawn exactly by inverting its distribution function.
  """
  d = diffusion_config
  shape = tuple(shape)
  if sigma_range is not None:
    shift = training_shift(d, tokens_per_clip, step, num_steps)
    low, high = (jnp.float32(bound) for bound in sigma_range)
    q_low, q_high = (_base_cdf(unshift_sigma(bound, shift), d) for bound in (low, high))
    q = q_low + (q_high - q_low) * jax.random.uniform(rng, shape, jnp.float32)
    return jnp.clip(shift_sigma(_base_quantile(q, d), shift), low, high)
  if d.sigma_sampling == "uniform":
    sigma = jax.random.uniform(rng, shape, jnp.float32)
  elif d.sigma_sampling == "logit_normal":
    # SD3 logit-normal: sigmoid of N(m, s); concentrates training on intermediate noise levels.
    sigma = jax.nn.sigmoid(d.logit_mean + d.logit_std * jax.random.normal(rng, shape, jnp.float32))
  elif d.sigma_sampling == "mode":
    uniform = jax.random.uniform(rng, shape, jnp.float32)
    sigma = mode_sigma(uniform, d.mode_scale)
  else:
    raise ValueError(f"diffusion.sigma_sampling={d.sigma_sampling!r}; expected one of {SIGMA_SAMPLINGS}")
  sigma = shift_sigma(sigma, training_shift(d, tokens_per_clip, step, num_steps))
  # Float rounding in the sigmoid / shift must not leave the unit interval the loss weights assume.
  return jnp.clip(sigma, 0.0, 1.0)


def unshift_sigma(sigma: ArrayLike, shift: ArrayLike) -> Array:
  """The inverse of `shift_sigma`: the unshifted sigma that `shift` maps onto `sigma`."""
  sigma = jnp.asarray(sigma, jnp.float32)
  shift = jnp.asarray(shift, jnp.float32)
  return sigma / (shift - (shift - 1.0) * sigma)


def _mode_inverse(sigma: Array, scale: float, iterations: int = 40) -> Array:
  """u with mode_sigma(u) = sigma, by bisection (mode_sigma falls monotonically from 1 to 0)."""
  low, high = jnp.zeros_like(sigma), jnp.ones_like(sigma)

  def halve(_, bounds):
    low, high = bounds
    middle = 0.5 * (low + high)
    above = mode_sigma(middle, scale) > sigma
    return jnp.where(above, middle, low), jnp.where(above, high, middle)

  low, high = jax.lax.fori_loop(0, iterations, halve, (low, high))
  return 0.5 * (low + high)


def _base_cdf(sigma: Array, d: Mapping[str, Any]) -> Array:
  """P(unshifted sigma <= `sigma`) under diffusion.sigma_sampling."""
  sigma = jnp.clip(sigma, 0.0, 1.0)
  if d.sigma_sampling == "uniform":
    return sigma
  if d.sigma_sampling == "logit_normal":
    logit = jnp.log(sigma) - jnp.log1p(-sigma)
    return jax.scipy.special.ndtr((logit - d.logit_mean) / d.logit_std)
  if d.sigma_sampling == "mode":
    return 1.0 - _mode_inverse(sigma, d.mode_scale)
  raise ValueError(f"diffusion.sigma_sampling={d.sigma_sampling!r}; expected one of {SIGMA_SAMPLINGS}")


def _base_quantile(q: Array, d: Mapping[str, Any]) -> Array:
  """The unshifted sigma at probability `q` of diffusion.sigma_sampling (the inverse of `_base_cdf`)."""
  if d.sigma_sampling == "uniform":
    return q
  if d.sigma_sampling == "logit_normal":
    return jax.nn.sigmoid(d.logit_mean + d.logit_std * jax.scipy.special.ndtri(q))
  if d.sigma_sampling == "mode":
    return mode_sigma(1.0 - q, d.mode_scale)
  raise ValueError(f"diffusion.sigma_sampling={d.sigma_sampling!r}; expected one of {SIGMA_SAMPLINGS}")


def sigma_mass(sigma_range: tuple[ArrayLike, ArrayLike], diffusion_config: Mapping[str, Any],
               shift: ArrayLike) -> Array:
  """The probability that a training sigma (density diffusion.sigma_sampling, then `shift`, a scalar or
  one per clip) falls in [low, high]."""
  low, high = sigma_range
  cdf = lambda bound: _base_cdf(unshift_sigma(bound, shift), diffusion_config)
  return cdf(high) - cdf(low)


def mode_sigma(uniform: ArrayLike, scale: float) -> Array:
  """SD3 mode sampling: sigma = 1 - u - scale*(cos^2(pi*u/2) - 1 + u), a map of u in [0, 1] onto [0, 1].

  scale > 0 favours mid-range sigma, scale < 0 the ends; scale = 0 is uniform.
  """
  low, high = MODE_SCALE_RANGE
  if not low <= scale <= high:
    raise ValueError(f"diffusion.mode_scale={scale} must lie in [{low}, {high:.4f}] for a monotone density")
  uniform = jnp.asarray(uniform, jnp.float32)
  return 1.0 - uniform - scale * (jnp.cos(0.5 * jnp.pi * uniform) ** 2 - 1.0 + uniform)


def timesteps_from_sigma(sigma: ArrayLike, num_train_timesteps: int = 1000) -> Array:
  """Model timestep = num_train_timesteps * sigma (Wan / diffusers convention), float32."""
  return jnp.asarray(sigma, jnp.float32) * num_train_timesteps


def _expand_like(sigma: Array, target: Array) -> Array:
  """Appends trailing unit axes so a [B] or [B, N] sigma broadcasts against `target`."""
  if sigma.ndim > target.ndim:
    raise ValueError(
        f"sigma of shape {sigma.shape} has more axes than the latents {target.shape}; expected a "
        f"scalar, [B] or a per-token prefix of the latent shape")
  return sigma.reshape(sigma.shape + (1,) * (target.ndim - sigma.ndim))


def interpolate(latents: ArrayLike, noise: ArrayLike, sigma: ArrayLike) -> Array:
  """Noisy input x_sigma = (1 - sigma)*x0 + sigma*noise; sigma is a scalar, [B] or a leading prefix.

  Exact at the ends: sigma = 0 returns the latents, sigma = 1 the noise.
  """
  latents = jnp.asarray(latents)
  noise = jnp.asarray(noise)
  if latents.shape != noise.shape:
    raise ValueError(f"latents {latents.shape} and noise {noise.shape} must have the same shape")
  sigma = _expand_like(jnp.asarray(sigma, jnp.float32), latents)
  noisy = (1.0 - sigma) * latents.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
  return noisy.astype(jnp.promote_types(latents.dtype, jnp.float32))


def velocity_target(latents: ArrayLike, noise: ArrayLike) -> Array:
  """Regression target d x_sigma / d sigma = noise - x0 (what the model's velocity predicts)."""
  return jnp.asarray(noise, jnp.float32) - jnp.asarray(latents, jnp.float32)


def loss(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, reduce: bool = True) -> Array:
  """Mean squared error over valid elements, in float32.

  `mask` (bool or 0/1, broadcastable to `pred`, e.g. [B, N, 1] for packed padding) marks valid
  elements. reduce=True gives the mean over every valid element of the batch (a scalar); reduce=False
  gives one mean per example ([B], the first axis), 0 for an example with no valid element.
  """
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  if pred.shape != target.shape:
    raise ValueError(f"prediction {pred.shape} and target {target.shape} must have the same shape")
  squared_error = jnp.square(pred - target)
  if mask is None:
    weights = jnp.ones_like(squared_error)
  else:
    mask = jnp.asarray(mask)
    try:
      weights = jnp.broadcast_to(mask.astype(jnp.float32), squared_error.shape)
    except ValueError as error:
      raise ValueError(f"loss mask of shape {mask.shape} does not broadcast to {pred.shape}") from error
    # where() rather than a product: a NaN in a padded element must not leak into the loss.
    squared_error = jnp.where(weights > 0, squared_error, 0.0)
  if reduce:
    return jnp.sum(squared_error * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  axes = tuple(range(1, squared_error.ndim))
  return jnp.sum(squared_error * weights, axis=axes) / jnp.maximum(jnp.sum(weights, axis=axes), 1.0)


def drop_captions(
    rng: Array, text_embeds: ArrayLike, prob: float | ArrayLike, null_embeds: ArrayLike | None = None
) -> Array:
  """Replaces each example's text_embeds [B, L, D] by the null text with probability `prob` (one
  for all, or [B]: each example's own).

  The null text is zeros (Wan's padded empty caption) unless `null_embeds` ([L, D] or [B, L, D],
  e.g. the encoded empty string) is given; sampling then uses the same null text as `uncond`.
  """
  text_embeds = jnp.asarray(text_embeds)
  if text_embeds.ndim != 3:
    raise ValueError(f"text_embeds of shape {text_embeds.shape} must be [B, L, D]")
  if isinstance(prob, int | float):
    if not 0.0 <= prob <= 1.0:
      raise ValueError(f"caption dropout probability {prob} must lie in [0, 1]")
  else:
    prob = jnp.reshape(jnp.asarray(prob, jnp.float32), (text_embeds.shape[0], 1, 1))
  if null_embeds is None:
    null_embeds = jnp.zeros_like(text_embeds)
  null_embeds = jnp.asarray(null_embeds, text_embeds.dtype)
  if null_embeds.shape not in (text_embeds.shape, text_embeds.shape[1:]):
    raise ValueError(
        f"null_embeds of shape {null_embeds.shape} must be [L, D] = {text_embeds.shape[1:]} or "
        f"[B, L, D] = {text_embeds.shape}")
  drop = jax.random.bernoulli(rng, prob, (text_embeds.shape[0], 1, 1))
  return jnp.where(drop, jnp.broadcast_to(null_embeds, text_embeds.shape), text_embeds)


def sigma_bucket(sigma: ArrayLike, num_buckets: int) -> Array:
  """Index in [0, num_buckets) of equal-width sigma buckets over [0, 1] (sigma = 1 is the last), int32."""
  if num_buckets < 1:
    raise ValueError(f"num_buckets={num_buckets} must be >= 1")
  sigma = jnp.asarray(sigma, jnp.float32)
  return jnp.clip(jnp.floor(sigma * num_buckets), 0, num_buckets - 1).astype(jnp.int32)


def sigma_grid(num_buckets: int) -> np.ndarray:
  """Centres (i + 0.5) / num_buckets of the sigma buckets: the fixed sigmas eval measures loss at."""
  if num_buckets < 1:
    raise ValueError(f"num_buckets={num_buckets} must be >= 1")
  return ((np.arange(num_buckets, dtype=np.float64) + 0.5) / num_buckets).astype(np.float32)


def bucket_sums(values: ArrayLike, sigma: ArrayLike, num_buckets: int,
                weights: ArrayLike | None = None) -> tuple[Array, Array]:
  """Per-sigma-bucket (sum of weight * value, sum of weight) of per-example `values` at noise levels
  `sigma` (same shape; weights default to 1). A non-finite value counts as 0, so one diverged example
  cannot poison its bucket's running sum.

  Sums and counts (not means) so they add across steps and hosts before dividing.
  """
  values = jnp.asarray(values, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  if values.shape != sigma.shape:
    raise ValueError(f"values {values.shape} and sigma {sigma.shape} must have the same shape")
  weights = jnp.ones_like(values) if weights is None else jnp.asarray(weights, jnp.float32)
  buckets = sigma_bucket(sigma, num_buckets).reshape(-1)
  weights = weights.reshape(-1)
  values = jnp.where(jnp.isfinite(values), values, 0.0).reshape(-1)
  sums = jax.ops.segment_sum(values * weights, buckets, num_segments=num_buckets)
  counts = jax.ops.segment_sum(weights, buckets, num_segments=num_buckets)
  return sums, counts
