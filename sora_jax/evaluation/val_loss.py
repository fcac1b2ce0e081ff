"""Validation loss of a checkpoint on the held-out split, on a fixed grid of noise levels.

Owns the deterministic protocol: the same examples (seeded pipeline order), the same noise per
example (seeded by its index) and every example at every sigma of the grid, so a checkpoint always
scores the same numbers and checkpoints of one run are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.diffusion import experts as experts_lib
from sora_jax.diffusion import flow, samplers
from sora_jax.parallel import sharding as sharding_lib


def sigma_grid(eval_config: ml_collections.ConfigDict) -> np.ndarray:
  """The fixed sigmas (bucket centres in (0, 1)) the loss is measured at: eval.sigma_grid of them."""
  return flow.sigma_grid(int(eval_config.sigma_grid))


def eval_batch_size(eval_config: ml_collections.ConfigDict, split: str, split_size: int, divisor: int) -> int:
  """eval.batch_size, shrunk for a held-out `split` smaller than it, as a multiple of `divisor`.

  `divisor` is what the global batch must divide by (mesh batch shards and processes with distinct rows).
  """
  wanted = min(int(eval_config.batch_size), int(eval_config.num_examples), split_size)
  batch_size = wanted // divisor * divisor
  if batch_size < 1:
    raise ValueError(
        f"split {split!r} has {split_size} clips; eval needs at least {divisor} (the "
        f"mesh's batch shards) at eval.batch_size={eval_config.batch_size}")
  return batch_size


def process_shard(mesh: jax.sharding.Mesh, rules: sharding_lib.LogicalRules) -> tuple[int, int]:
  """(index, count) of this process's slice of every eval batch (`sharding.process_batch_shard`)."""
  return sharding_lib.process_batch_shard(sharding_lib.batch_sharding(mesh, rules),
                                          sharding_lib.batch_size_divisor(mesh, rules))


def eval_batches(config: ml_collections.ConfigDict, data_dir: str, mesh: jax.sharding.Mesh,
                 mixture_source: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of the first eval.num_examples held-out clips, in global batches.

  The pipeline runs with seed eval.seed, so the examples and their order are the same every call. A
  mixture's source (`mixture_source`) keeps its own image share, as in training.
  """
  from sora_jax.data import pipeline, schema

  if config.data.packing:
    # The loss is scored per clip at fixed sigmas: held-out clips come in whole-clip batches even
    # when the run trained on packed rows (the model reads both layouts).
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.packing = False
  rules = sharding_lib.logical_rules(config.mesh)
  shard_index, shard_count = process_shard(mesh, rules)
  divisor = sharding_lib.batch_size_divisor(mesh, rules)
  split_size = len(schema.open_split(data_dir, config.data.eval_split))
  batch_size = eval_batch_size(config.eval, config.data.eval_split, split_size,
                               math.lcm(divisor, shard_count))
  iterator = pipeline.make_iterator(
      config, data_dir, config.data.eval_split, process_index=shard_index,
      process_count=shard_count, seed=int(config.eval.seed),
      batch_size_per_process=batch_size // shard_count, source_image_ratio=mixture_source)
  num_examples = min(int(config.eval.num_examples), split_size)
  for _ in range(max(1, math.ceil(num_examples / batch_size))):
    yield next(iterator)


def make_loss_fn(model, config: ml_collections.ConfigDict):
  """jit-able (params, latents [B, ...], text_embeds [B, L, D], noise, sigmas [G]) -> loss per sigma [G]."""
  num_train_timesteps = int(config.diffusion.num_train_timesteps)

  def loss_at(params, latents, text_embeds, noise, sigma):
    sigma_per_example = jnp.full((latents.shape[0],), sigma, jnp.float32)
    noisy = flow.interpolate(latents, noise, sigma_per_example)
    velocity = experts_lib.velocity_fn(lambda tree, *args: model.apply({"params": tree}, *args), params,
                                       config.model, config.diffusion)(
        noisy, sigma_per_example * num_train_timesteps, text_embeds)
    per_example = flow.loss(velocity, flow.velocity_target(latents, noise), reduce=False)
    return jnp.mean(per_example)

  def loss_per_sigma(params, latents, text_embeds, noise, sigmas):
    # One forward per sigma under lax.map: one compiled body, batch memory of one sigma at a time.
    return jax.lax.map(lambda sigma: loss_at(params, latents, text_embeds, noise, sigma), sigmas)

  return loss_per_sigma


def validation_loss(
    weight_sets: Mapping[str, Any],
    model,
    config: ml_collections.ConfigDict,
    batches: list[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
) -> dict[str, dict[str, Any]]:
  """{weight set: {"loss": mean over the grid, "loss_by_sigma": [G floats]}} on `batches` (numpy, local).

  Example i of the eval stream gets noise seeded by (eval.seed, i) whatever the batching or process
  split; every weight set sees the same inputs.
  """
  from sora_jax.data import pipeline

  rules = sharding_lib.logical_rules(config.mesh)
  sigmas = jnp.asarray(sigma_grid(config.eval))
  loss_fn = jax.jit(make_loss_fn(model, config), out_shardings=sharding_lib.replicated(mesh))
  shard_index, shard_count = process_shard(mesh, rules)
  totals = {name: np.zeros(len(sigmas), np.float64) for name in weight_sets}
  seed = int(config.eval.seed)
  for batch_index, local in enumerate(batches):
    local_size = local["latents"].shape[0]
    first = (batch_index * shard_count + shard_index) * local_size
    noise = np.asarray(samplers.seeded_noise(seed, tuple(local["latents"].shape), first_index=first))
    inputs = pipeline.to_global(
        {"latents": np.asarray(local["latents"], np.float32),
         "text_embeds": np.asarray(local["text_embeds"], np.float32), "noise": noise},
        mesh, sharding_lib.batch_sharding(mesh, rules))
    with sharding_lib.mesh_context(mesh, rules):
      for name, params in weight_sets.items():
        per_sigma = loss_fn(params, inputs["latents"], inputs["text_embeds"], inputs["noise"], sigmas)
        totals[name] += np.asarray(per_sigma.addressable_data(0), np.float64)
  results = {}
  for name, total in totals.items():
    by_sigma = total / max(len(batches), 1)
    results[name] = {"loss": float(by_sigma.mean()), "loss_by_sigma": [float(v) for v in by_sigma]}
  return results
