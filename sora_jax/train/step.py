"""The pure train step: flow-matching loss, gradient accumulation, AdamW, NaN skip, EMA.

Owns `make_train_step(model, config, optimizer)` -> `train_step(state, batch) -> (state, metrics)`;
no I/O, no flags, no Python state: every random draw derives from (state.rng, state.step), so a
step is reproducible bit for bit whatever mesh runs it and whenever it is resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sora_jax.diffusion import flow
from sora_jax.train import ema as ema_lib
from sora_jax.train import optimizer as optimizer_lib
from sora_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# Batch keys the model receives besides latents / text (packing); everything else is data bookkeeping.
_MODEL_KWARGS = ("segment_ids", "positions")


def tokens_per_clip(model_config: ml_collections.ConfigDict, latent_shape: tuple[int, ...]) -> int:
  """Patch tokens of one clip of latent shape [T, H, W, C] (the resolution shift depends on it)."""
  t, h, w = latent_shape[:3]
  pt, ph, pw = model_config.patch_size
  return (t // pt) * (h // ph) * (w // pw)


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
  """[B, ...] -> [A, B/A, ...] taking every A-th example, so each device's rows stay local."""

  def split(x: jax.Array) -> jax.Array:
    per_micro = x.shape[0] // num_micro
    return jnp.swapaxes(x.reshape(per_micro, num_micro, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds the pure step for `model` under `config`; jit it with the state's shardings."""
  diffusion = config.diffusion
  num_micro = int(config.train.grad_accum_steps)
  num_buckets = int(config.train.sigma_buckets)
  schedule = optimizer_lib.learning_rate_schedule(config)

  def micro_loss(params: Any, micro_batch: Batch, rng: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    latents = micro_batch["latents"].astype(jnp.float32)  # [b, T, H, W, C]
    text_embeds = micro_batch["text_embeds"].astype(jnp.float32)  # [b, L, D]
    batch_size = latents.shape[0]
    noise_rng, sigma_rng, caption_rng = jax.random.split(rng, 3)
    text_embeds = flow.drop_captions(caption_rng, text_embeds, diffusion.caption_dropout)
    noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
    sigma = flow.sample_sigma(
        sigma_rng, (batch_size,), diffusion,
        tokens_per_clip=tokens_per_clip(config.model, latents.shape[1:]))
    noisy = flow.interpolate(latents, noise, sigma)
    target = flow.velocity_target(latents, noise)
    timesteps = sigma * diffusion.num_train_timesteps
    extra = {key: micro_batch[key] for key in _MODEL_KWARGS if key in micro_batch}
    velocity = model.apply({"params": params}, noisy, timesteps, text_embeds, **extra)
    mask = micro_batch.get("loss_mask")
    loss = flow.loss(velocity, target, mask)
    # Per-example losses feed only the per-sigma-bucket metrics.
    per_example = jax.lax.stop_gradient(flow.loss(velocity, target, mask, reduce=False))
    return loss, (per_example, sigma)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    micro_batches = _split_micro_batches(batch, num_micro)
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)

    def accumulate(carry, inputs):
      grads_sum, loss_sum = carry
      micro_batch, index = inputs
      (loss, (per_example, sigma)), grads = grad_fn(
          state.params, micro_batch, jax.random.fold_in(step_rng, index))
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, loss_sum + loss), (per_example, sigma)

    (grads_sum, loss_sum), (per_example, sigma) = jax.lax.scan(
        accumulate, (zero_grads, jnp.zeros((), jnp.float32)),
        (micro_batches, jnp.arange(num_micro)))
    grads = jax.tree.map(lambda g: g / num_micro, grads_sum)
    loss = loss_sum / num_micro
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, new_params, state.params)
    opt_state = jax.tree.map(keep, new_opt_state, state.opt_state)
    ema = ema_lib.update(state.ema, params, apply=finite)

    skipped = jnp.logical_not(finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
        skipped_steps=state.skipped_steps + skipped,
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1).astype(jnp.int32))

    per_example = per_example.reshape(-1)
    bucket_loss_sum, bucket_count = flow.bucket_sums(
        jnp.where(jnp.isfinite(per_example), per_example, 0.0), sigma.reshape(-1), num_buckets)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(params),
        "lr": schedule(state.step),
        "skipped": skipped,
        "skipped_steps": new_state.skipped_steps,
        "nonfinite_run": new_state.nonfinite_run,
        "sigma_bucket_loss_sum": bucket_loss_sum,
        "sigma_bucket_count": bucket_count,
    }
    return new_state, metrics

  return train_step


def sigma_bucket_edges(num_buckets: int) -> list[tuple[float, float]]:
  """[(low, high), ...] of the sigma buckets the step's per-bucket sums use."""
  return [(i / num_buckets, (i + 1) / num_buckets) for i in range(num_buckets)]


def check_batch(batch: dict[str, Any], global_batch_size: int, num_micro: int) -> None:
  """Raises ValueError naming the key when a batch cannot feed the step."""
  for key in ("latents", "text_embeds"):
    if key not in batch:
      raise ValueError(f"batch has no {key!r}; expected keys latents [B,T,H,W,C] and text_embeds [B,L,D]")
  latents = batch["latents"]
  if latents.ndim != 5:
    raise ValueError(f"batch latents have shape {tuple(latents.shape)}; expected [B, T, H, W, C]")
  if latents.shape[0] != global_batch_size or global_batch_size % num_micro:
    raise ValueError(
        f"batch of {latents.shape[0]} clips; expected train.global_batch_size={global_batch_size} "
        f"divisible by train.grad_accum_steps={num_micro}")
