"""Denoising experts (Wan2.2 A14B): which DiT owns which noise levels, and applying the right one.

With model.experts = 2 a run holds two DiTs of one shape as a parameter tree {"high": ..., "low": ...}:
"high" denoises sigma >= diffusion.boundary_ratio (diffusers' `transformer`), "low" the rest
(`transformer_2`). Owns the expert names, their sigma ranges, the expert a training step draws, and
the velocity function that switches experts at the boundary as `WanPipeline` does (one expert runs
per call: the other sits in a branch of `lax.cond` that is not taken).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import choices
from sora_jax.diffusion import flow

HIGH, LOW = choices.EXPERTS


def names(model_config: Mapping[str, Any]) -> tuple[str, ...]:
  """The expert names of a model config: () for one DiT, ("high", "low") for two."""
  return choices.EXPERTS if int(model_config.experts) == 2 else ()


def trained(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The experts this run updates, in EXPERTS order (() for a one-DiT run)."""
  chosen = set(config.train.train_experts)
  return tuple(name for name in names(config.model) if name in chosen)


def frozen(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The experts this run holds but does not update."""
  return tuple(name for name in names(config.model) if name not in trained(config))


def sigma_range(name: str, boundary_ratio: float) -> tuple[float, float]:
  """[low, high] of the sigmas an expert owns: high noise from the boundary up, low noise below it."""
  boundary = float(boundary_ratio)
  if name == HIGH:
    return boundary, 1.0
  # The largest float32 below the boundary: a sigma exactly at it belongs to the high-noise expert.
  return 0.0, float(np.nextafter(np.float32(boundary), np.float32(0.0)))


def boundary_timestep(diffusion_config: Mapping[str, Any]) -> float:
  """The timestep from which the high-noise expert denoises (WanPipeline's boundary_timestep)."""
  return float(diffusion_config.boundary_ratio) * float(diffusion_config.num_train_timesteps)


def draw(rng: jax.Array, candidates: tuple[str, ...], high_mass: jax.Array) -> jax.Array:
  """Index into `candidates` of the expert a step trains: "high" with probability `high_mass` (the
  sigma density's mass above the boundary) when both are candidates, else the one there is."""
  if len(candidates) == 1:
    return jnp.zeros((), jnp.int32)
  high = jax.random.uniform(rng, (), jnp.float32) < high_mass
  return jnp.where(high, candidates.index(HIGH), candidates.index(LOW)).astype(jnp.int32)


def high_mass(diffusion_config: Mapping[str, Any], shift: jax.Array, weights: jax.Array) -> jax.Array:
  """The weighted mean over clips (one `shift` each) of the sigma density's mass above the boundary."""
  mass = flow.sigma_mass(sigma_range(HIGH, diffusion_config.boundary_ratio), diffusion_config, shift)
  mass = jnp.broadcast_to(mass, weights.shape)
  return jnp.sum(mass * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def velocity_fn(apply: Callable[..., jax.Array], params: Any, model_config: Mapping[str, Any],
                diffusion_config: Mapping[str, Any]) -> Callable[..., jax.Array]:
  """(latents, timesteps, text_embeds, **kw) -> velocity of the DiT (or expert) that owns the timesteps.

  `apply(params, latents, timesteps, text_embeds, **kw)` runs one DiT. With experts, the call's largest
  timestep picks the expert (every example of a sampler or eval call shares one noise level; given
  frames' tokens sit at timestep 0 and do not count).
  """
  if not names(model_config):
    return lambda *args, **kwargs: apply(params, *args, **kwargs)
  boundary = boundary_timestep(diffusion_config)

  def velocity(latents, timesteps, text_embeds, **kwargs):
    run = lambda expert: lambda: apply(params[expert], latents, timesteps, text_embeds, **kwargs)
    return jax.lax.cond(jnp.max(timesteps) >= boundary, run(HIGH), run(LOW))

  return velocity


def per_expert(model_config: Mapping[str, Any], make: Callable[[str | None], Any]) -> Any:
  """make(None) for one DiT; {name: make(name)} for each expert."""
  experts = names(model_config)
  return {name: make(name) for name in experts} if experts else make(None)
