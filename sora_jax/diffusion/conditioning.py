"""Given frames (image-to-video, video extension): which latent cells and tokens stay clean.

Owns the Wan2.2 TI2V scheme in sora_jax: the first k latent frames of a clip are the given frames,
kept at sigma 0 (their tokens see timestep 0 and are left out of the loss) while the rest is denoised.
Training draws k per clip (`train.condition_prob`, `train.condition_frames`); sampling re-imposes the
clean given latents after every solver step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sora_jax import patches


def enabled(train_config) -> bool:
  """Whether the run trains with given frames (train.condition_prob > 0)."""
  return float(train_config.condition_prob) > 0.0


def applies_to(latent_frames: int, choices: Sequence[int]) -> bool:
  """Whether clips of `latent_frames` latent frames can be conditioned: a frame must stay to denoise.

  Images (one latent frame) and clips no longer than the largest choice train as plain text-to-video.
  """
  return latent_frames > max(choices)


def draw_given_frames(rng: jax.Array, batch_size: int, prob: float, choices: Sequence[int]) -> jax.Array:
  """Given latent frames per clip [B] int32: 0 (text-to-video) with probability 1 - prob, else one of
  `choices` drawn uniformly."""
  use_rng, pick_rng = jax.random.split(rng)
  conditioned = jax.random.uniform(use_rng, (batch_size,)) < prob
  picked = jnp.asarray(tuple(choices), jnp.int32)[
      jax.random.randint(pick_rng, (batch_size,), 0, len(choices))]
  return jnp.where(conditioned, picked, 0).astype(jnp.int32)


def cell_mask(given_frames: jax.Array, latent_frames: int) -> jax.Array:
  """[B, T, 1, 1, 1] bool: the latent cells of the given frames (broadcasts against [B, T, H, W, C])."""
  frames = jnp.arange(latent_frames, dtype=jnp.int32)
  mask = frames[None, :] < jnp.asarray(given_frames, jnp.int32)[:, None]
  return mask[:, :, None, None, None]


def token_mask(given_frames: jax.Array, latent_shape: Sequence[int],
               patch_size: Sequence[int]) -> jax.Array:
  """[B, N] bool over patch tokens in (t, h, w) order: the tokens of the given frames.

  Given frame counts are multiples of the temporal patch size (config validation), so a token is
  either wholly given or wholly noisy.
  """
  grid_t, grid_h, grid_w = patches.grid(latent_shape, patch_size)
  tokens_per_frame = grid_h * grid_w
  token_frame = (jnp.arange(grid_t * tokens_per_frame, dtype=jnp.int32) // tokens_per_frame) * patch_size[0]
  return token_frame[None, :] < jnp.asarray(given_frames, jnp.int32)[:, None]


def token_timesteps(timesteps: jax.Array, given_tokens: jax.Array) -> jax.Array:
  """Per-token timesteps [B, N]: `timesteps` ([B] or a scalar) on noisy tokens, 0 on given ones."""
  timesteps = jnp.asarray(timesteps, jnp.float32)
  if timesteps.ndim == 1:
    timesteps = timesteps[:, None]
  return jnp.where(given_tokens, 0.0, timesteps)


def impose(latents: jax.Array, given_latents: jax.Array, given_cells: jax.Array) -> jax.Array:
  """`latents` with the given frames' cells replaced by their clean latents (same shape)."""
  return jnp.where(given_cells, given_latents.astype(latents.dtype), latents)
