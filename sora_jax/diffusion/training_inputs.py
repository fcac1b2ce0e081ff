"""What a training step feeds the model: noise, sigma and caption dropout for a micro-batch.

Owns the preparation of bucketed and packed micro-batches (the noisy input's parts, per-clip and
per-token sigma, dropped captions, given frames, clip weights, token counts) and the loss of a
micro-batch with its per-clip parts (`losses`); sora_jax/train/step.py composes them with the model
and the update. Pure functions of (batch, rng, step, config), tested without a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax import config as config_lib
from sora_jax import patches
from sora_jax.diffusion import conditioning, flow

Batch = dict[str, jax.Array]
SOURCE = "source"  # a mixture's batch key: each clip's source (sora_jax.data.pipeline.SOURCE)


def bucketed(micro_batch: Batch, rng: jax.Array, step: jax.Array, config: ml_collections.ConfigDict,
             sigma_range: tuple[float, float] | None = None) -> dict[str, jax.Array]:
  """Inputs of a bucketed micro-batch (latents [b, T, H, W, C], text_embeds [b, L, D]): one sigma per
  clip (within `sigma_range` when given: one expert's); with train.condition_prob, some clips keep
  their first frames clean and out of the loss."""
  diffusion, num_steps = config.diffusion, int(config.train.num_steps)
  condition_prob = float(config.train.condition_prob)
  condition_frames = tuple(config.train.condition_frames)
  latents = micro_batch["latents"].astype(jnp.float32)  # [b, T, H, W, C]
  text_embeds = micro_batch["text_embeds"].astype(jnp.float32)  # [b, L, D]
  batch_size = latents.shape[0]
  clip_tokens = patches.num_tokens(latents.shape[1:], config.model.patch_size)
  noise_rng, sigma_rng, caption_rng = jax.random.split(rng, 3)
  sigma = flow.sample_sigma(sigma_rng, (batch_size,), diffusion, tokens_per_clip=clip_tokens, step=step,
                            num_steps=num_steps, sigma_range=sigma_range)
  inputs = {
      "latents": latents,
      "noise": jax.random.normal(noise_rng, latents.shape, jnp.float32),
      "sigma": sigma,  # [b]
      "token_sigma": sigma,
      "cell_sigma": sigma,
      "text_embeds": flow.drop_captions(caption_rng, text_embeds,
                                        caption_dropout(config, micro_batch, batch_size)),
      "clip_weights": jnp.ones((batch_size,), jnp.float32),
      "num_tokens": jnp.asarray(batch_size * clip_tokens, jnp.float32),
  }
  if condition_prob > 0 and conditioning.applies_to(latents.shape[1], condition_frames):
    # Given frames (image-to-video, extension): clean input at timestep 0, no loss on their cells.
    # The draw folds in a constant, so the noise, sigma and captions match an unconditioned run.
    given = conditioning.draw_given_frames(
        jax.random.fold_in(rng, 0x6976), batch_size, condition_prob, condition_frames)
    given_cells = conditioning.cell_mask(given, latents.shape[1])  # [b, T, 1, 1, 1]
    given_tokens = conditioning.token_mask(given, latents.shape[1:], config.model.patch_size)
    inputs["cell_sigma"] = jnp.where(given_cells, 0.0, sigma[:, None, None, None, None])
    inputs["token_sigma"] = conditioning.token_timesteps(sigma, given_tokens)  # [b, N]
    inputs["loss_mask"] = jnp.logical_not(given_cells)
    inputs["num_tokens"] = jnp.sum(jnp.logical_not(given_tokens)).astype(jnp.float32)
  return inputs


def caption_dropout(config: ml_collections.ConfigDict, micro_batch: Batch,
                    num_clips: int) -> float | jax.Array:
  """diffusion.caption_dropout, or each clip's [num_clips] when a mixture's sources set their own."""
  default = float(config.diffusion.caption_dropout)
  table = [default if source.caption_dropout is None else source.caption_dropout
           for source in config_lib.data_sources(config.data)]
  if SOURCE not in micro_batch:
    return table[0] if len(table) == 1 else default  # one source: its own rate, if it sets one
  if all(prob == default for prob in table):
    return default
  return jnp.asarray(table, jnp.float32)[micro_batch[SOURCE].reshape(num_clips)]


def packed(micro_batch: Batch, rng: jax.Array, step: jax.Array, config: ml_collections.ConfigDict,
           sigma_range: tuple[float, float] | None = None) -> dict[str, jax.Array]:
  """Inputs of a packed micro-batch (latents [b, N, P] with segment_ids, segment_grid, loss_mask): one
  sigma per segment (clip) spread over its tokens, caption dropout per segment."""
  diffusion, num_steps = config.diffusion, int(config.train.num_steps)
  latents = micro_batch["latents"].astype(jnp.float32)  # [b, N, P]
  segment_ids = micro_batch["segment_ids"]  # [b, N], 0 = padding
  segment_grid = micro_batch["segment_grid"]  # [b, S, 3]
  text_embeds = micro_batch["text_embeds"].astype(jnp.float32)  # [b, S*L, D]
  batch_size, num_segments = segment_grid.shape[:2]
  noise_rng, sigma_rng, caption_rng = jax.random.split(rng, 3)
  segment_tokens = jnp.prod(segment_grid, axis=-1)  # [b, S]
  sigma = flow.sample_sigma(
      sigma_rng, (batch_size, num_segments), diffusion,
      tokens_per_clip=jnp.maximum(segment_tokens, 1), step=step, num_steps=num_steps,
      sigma_range=sigma_range)
  token_sigma = jnp.take_along_axis(sigma, jnp.maximum(segment_ids - 1, 0), axis=1)  # [b, N]
  # Caption dropout per clip: view the S text slots of a row as S separate captions.
  text_len = text_embeds.shape[1] // num_segments
  per_clip_text = text_embeds.reshape(batch_size * num_segments, text_len, -1)
  dropped = flow.drop_captions(caption_rng, per_clip_text,
                               caption_dropout(config, micro_batch, batch_size * num_segments))
  return {
      "latents": latents,
      "noise": jax.random.normal(noise_rng, latents.shape, jnp.float32),
      "sigma": sigma,  # [b, S]
      "token_sigma": token_sigma,
      "cell_sigma": token_sigma,
      "text_embeds": dropped.reshape(text_embeds.shape),
      "clip_weights": (segment_tokens > 0).astype(jnp.float32),
      "num_tokens": jnp.sum(micro_batch["loss_mask"].astype(jnp.float32)),
  }


def clip_shifts(batch: Batch, step: jax.Array,
                config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(training shift, weight) of every clip slot of a whole step's batch: one clip per row of a
  bucketed batch; per segment of packed rows, weight 0 for an empty slot."""
  num_steps = int(config.train.num_steps)
  if "segment_ids" in batch:
    tokens = jnp.prod(batch["segment_grid"], axis=-1).reshape(-1)
    shift = flow.training_shift(config.diffusion, jnp.maximum(tokens, 1), step, num_steps)
    return jnp.broadcast_to(shift, tokens.shape), (tokens > 0).astype(jnp.float32)
  latents = batch["latents"]
  tokens = patches.num_tokens(latents.shape[1:], config.model.patch_size)
  shift = flow.training_shift(config.diffusion, tokens, step, num_steps)
  return jnp.broadcast_to(shift, latents.shape[:1]), jnp.ones(latents.shape[:1], jnp.float32)


def packed_clip_losses(velocity: jax.Array, target: jax.Array, loss_mask: jax.Array,
                       segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Mean squared error of each clip of packed rows [b, S] over its valid tokens (0 for an empty slot)."""
  valid = loss_mask > 0
  token_error = jnp.where(valid, jnp.mean(jnp.square(velocity - target), axis=-1), 0.0)  # [b, N]
  one_hot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.float32)
  error_sum = jnp.einsum("bn,bns->bs", token_error, one_hot)
  token_count = jnp.einsum("bn,bns->bs", valid.astype(jnp.float32), one_hot)
  return error_sum / jnp.maximum(token_count, 1.0)


def losses(velocity: jax.Array, target: jax.Array, micro_batch: Batch,
           inputs: Batch) -> tuple[jax.Array, jax.Array]:
  """(the micro-batch's loss, each clip's loss without gradient) for the per-sigma metrics.

  Packed rows: the mean of the clips' own losses (weighted by `clip_weights`, so empty slots count
  nothing), as in a bucketed batch, so that a clip of many tokens weighs no more than an image packed
  beside it. Bucketed: the mean squared error over every cell the loss covers (`loss_mask` leaves out
  given frames).
  """
  if "segment_ids" in micro_batch:
    per_clip = packed_clip_losses(velocity, target, micro_batch["loss_mask"], micro_batch["segment_ids"],
                                  inputs["sigma"].shape[1])
    weights = inputs["clip_weights"]
    loss = jnp.sum(per_clip * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return loss, jax.lax.stop_gradient(per_clip)
  mask = inputs.get("loss_mask")
  if mask is not None:
    return (flow.loss(velocity, target, mask),
            flow.loss(jax.lax.stop_gradient(velocity), target, mask, reduce=False))
  squared_error = jax.lax.stop_gradient(jnp.square(velocity - target))
  return flow.loss(velocity, target), jnp.mean(squared_error.reshape(squared_error.shape[0], -1), axis=-1)
