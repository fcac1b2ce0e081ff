"""The pure train step: flow-matching loss, gradient accumulation, AdamW, NaN skip, EMA.

Owns `make_train_step(model, config, optimizer)` -> `train_step(state, batch) -> (state, metrics)`
and `build(config, mesh)`, the one assembly of model, optimizer, sharded state and jitted step.
The step does no I/O and keeps no Python state: every random draw derives from (state.rng,
state.step), so a step is reproducible bit for bit whatever mesh runs it and whenever it resumes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sora_jax import config as config_lib
from sora_jax.choices import EXPERTS
from sora_jax.diffusion import experts as experts_lib
from sora_jax.diffusion import flow, training_inputs
from sora_jax.model import lora as lora_lib
from sora_jax.train import ema as ema_lib
from sora_jax.train import optimizer as optimizer_lib
from sora_jax.train import state as state_lib
from sora_jax.train.state import TrainState

Batch = training_inputs.Batch
Metrics = dict[str, jax.Array]
# Batch keys the model receives besides latents / text (packing); everything else is data bookkeeping.
_MODEL_KWARGS = ("segment_ids", "positions", "text_segment_ids")
_EXPERT_DRAW = 0x6578  # folded into a step's key for its expert draw, apart from the micro-batches' keys


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
  """[B, ...] -> [A, B/A, ...] taking every A-th example, so each device's rows stay local."""

  def split(x: jax.Array) -> jax.Array:
    per_micro = x.shape[0] // num_micro
    return jnp.swapaxes(x.reshape(per_micro, num_micro, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def _spike_guard(stats: jax.Array, grad_norm: jax.Array, finite: jax.Array,
                 train: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(is this step a spike, updated stats) for train.spike_sigmas > 0; never a spike when it is 0.

  A spike is a finite gradient norm above mean + spike_sigmas * std of the norms of the applied steps
  so far (a running average that forgets with train.spike_decay), once train.spike_warmup_steps
  steps have been seen. Skipped steps do not enter the statistics, so a burst cannot raise its own bar.
  """
  sigmas = float(train.spike_sigmas)
  count, mean, mean_sq, spikes = stats[0], stats[1], stats[2], stats[3]
  std = jnp.sqrt(jnp.maximum(mean_sq - mean * mean, 0.0))
  spike = jnp.asarray(False)
  if sigmas > 0:
    spike = finite & (count >= int(train.spike_warmup_steps)) & (grad_norm > mean + sigmas * std)
  apply = finite & ~spike
  # The plain average over the first steps, then an exponential one (no start-up bias).
  weight = jnp.maximum(1.0 - float(train.spike_decay), 1.0 / (count + 1.0))
  new = jnp.stack([count + 1.0, mean + weight * (grad_norm - mean),
                   mean_sq + weight * (grad_norm * grad_norm - mean_sq), spikes + spike])
  kept = jnp.stack([count, mean, mean_sq, spikes + spike])
  return spike, jnp.where(apply, new, kept).astype(jnp.float32)


def make_train_step(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
) -> Callable[..., tuple[TrainState, Metrics]]:
  """Builds the pure step for `model` under `config`; jit it with the state's shardings.

  A LoRA run's step is `train_step(state, batch, frozen)`: state.params are the adapters, `frozen`
  the weights they adapt, which get no gradient. Bucketed batches: latents [B, T, H, W, C],
  text_embeds [B, L, D], one sigma per clip. Packed batches (with segment_ids): latents [B, N, P],
  one sigma per segment (clip) spread over its tokens, caption dropout per segment, loss over
  loss_mask.
  """
  diffusion = config.diffusion
  num_micro = int(config.train.grad_accum_steps)
  num_buckets = int(config.train.sigma_buckets)
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  host_state = tuple(config.train.host_state)
  # Host-held parts come in only for the update, after the backward pass has freed its activations.
  fetch = lambda part, tree: state_lib.on_device(tree) if part in host_state else tree
  # An expert's update returns its host-held trees to the host itself: both branches of the expert
  # switch must give every output in one memory space.
  store = lambda part, tree: state_lib.on_host(tree) if part in host_state else tree

  expert_names = experts_lib.trained(config)
  num_sources = max(1, len(config_lib.data_sources(config.data)))

  def micro_loss(params: Any, micro_batch: Batch, rng: jax.Array, step: jax.Array,
                 sigma_range: tuple[float, float] | None,
                 frozen: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    if frozen is not None:
      params = lora_lib.combine(frozen, params)
    prepare = training_inputs.packed if "segment_ids" in micro_batch else training_inputs.bucketed
    inputs = prepare(micro_batch, rng, step, config, sigma_range=sigma_range)
    latents, noise = inputs["latents"], inputs["noise"]
    noisy = flow.interpolate(latents, noise, inputs["cell_sigma"])
    target = flow.velocity_target(latents, noise)
    timesteps = flow.timesteps_from_sigma(inputs["token_sigma"], diffusion.num_train_timesteps)
    extra = {key: micro_batch[key] for key in _MODEL_KWARGS if key in micro_batch}
    velocity = model.apply({"params": params}, noisy, timesteps, inputs["text_embeds"], **extra)
    loss, per_clip = training_inputs.losses(velocity, target, micro_batch, inputs)
    bucket_sum, bucket_count = flow.bucket_sums(
        per_clip, inputs["sigma"], num_buckets, weights=inputs["clip_weights"])
    aux = {
        "sigma_bucket_loss_sum": bucket_sum,
        "sigma_bucket_count": bucket_count,
        "num_clips": jnp.sum(inputs["clip_weights"]),
        "num_tokens": inputs["num_tokens"],
    }
    if training_inputs.SOURCE in micro_batch:
      # A mixture: each source's clips and loss sum, for its own loss curve.
      one_hot = jax.nn.one_hot(micro_batch[training_inputs.SOURCE], num_sources, dtype=jnp.float32)
      one_hot = one_hot * inputs["clip_weights"][..., None]
      aux["source_loss_sum"] = jnp.einsum("...k,...->k", one_hot, per_clip)
      aux["source_clips"] = jnp.sum(one_hot.reshape(-1, num_sources), axis=0)
    return loss, aux

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def update(state: TrainState, batch: Batch, expert: str | None,
             frozen: Any = None) -> tuple[TrainState, Metrics]:
    """The step's update of one DiT, or of one expert (`expert`; the other's trees pass through)."""
    part = (lambda tree: tree) if expert is None else (lambda tree: tree[expert])
    put = (lambda tree, value: value) if expert is None else (lambda tree, value: {**tree, expert: value})
    sigma_range = None if expert is None else experts_lib.sigma_range(expert, diffusion.boundary_ratio)
    params = part(state.params)
    step_rng = jax.random.fold_in(state.rng, state.step)
    micro_batches = _split_micro_batches(batch, num_micro)
    zero_grads = jax.tree.map(jnp.zeros_like, params)  # folded away by XLA when num_micro == 1

    def accumulate(carry, inputs):
      grads_sum, loss_sum = carry
      micro_batch, index = inputs
      (loss, aux), grads = grad_fn(params, micro_batch, jax.random.fold_in(step_rng, index), state.step,
                                   sigma_range, frozen)
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, loss_sum + loss), aux

    if num_micro == 1:
      # No accumulation loop: one less while-loop for XLA to compile.
      (grads_sum, loss_sum), aux = accumulate(
          (zero_grads, jnp.zeros((), jnp.float32)),
          (jax.tree.map(lambda x: x[0], micro_batches), 0))
    else:
      (grads_sum, loss_sum), aux = jax.lax.scan(
          accumulate, (zero_grads, jnp.zeros((), jnp.float32)),
          (micro_batches, jnp.arange(num_micro)))
      aux = jax.tree.map(lambda x: jnp.sum(x, axis=0), aux)
    grads = jax.tree.map(lambda g: g / num_micro, grads_sum)
    loss = loss_sum / num_micro
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    spike, grad_norm_stats = _spike_guard(part(state.grad_norm_stats), grad_norm, finite, config.train)
    finite = finite & ~spike

    # Only this expert's host-held trees visit the device; the other's stay where they are.
    old_opt_state = fetch("opt_state", part(state.opt_state))
    if expert is not None:
      old_opt_state = optimizer_lib.at_step(old_opt_state, state.step)
    updates, new_opt_state = optimizer.update(grads, old_opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, old_opt_state)
    ema = ema_lib.update({key: fetch("ema", part(tree)) for key, tree in state.ema.items()}, params,
                         apply=finite)

    skipped = jnp.logical_not(finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=put(state.params, params),
        opt_state=put(state.opt_state, opt_state if expert is None else store("opt_state", opt_state)),
        ema={key: put(state.ema[key], tree if expert is None else store("ema", tree))
             for key, tree in ema.items()},
        skipped_steps=state.skipped_steps + skipped,
        # A spike is a finite step: it skips its update but does not count towards a rollback.
        nonfinite_run=jnp.where(finite | spike, 0, state.nonfinite_run + 1).astype(jnp.int32),
        grad_norm_stats=put(state.grad_norm_stats, grad_norm_stats))
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(params),
        "lr": schedule(state.step),
        "skipped": skipped,
        "skipped_steps": new_state.skipped_steps,
        "nonfinite_run": new_state.nonfinite_run,
        "spike": spike.astype(jnp.int32),
        "spike_steps": grad_norm_stats[3].astype(jnp.int32),
        **aux,
    }
    if expert is not None:
      metrics["expert"] = jnp.asarray(EXPERTS.index(expert), jnp.int32)
    return new_state, metrics

  def train_step(state: TrainState, batch: Batch, frozen: Any = None) -> tuple[TrainState, Metrics]:
    if not expert_names:
      return update(state, batch, None, frozen)
    # One expert per step, drawn by the sigma density's mass on each side of the boundary, so the
    # run sees the sigma distribution one DiT would; its clips draw sigmas of its range only.
    shift, weights = training_inputs.clip_shifts(batch, state.step, config)
    mass = experts_lib.high_mass(diffusion, shift, weights)
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _EXPERT_DRAW)
    index = experts_lib.draw(rng, expert_names, mass)
    branches = [functools.partial(update, expert=name) for name in expert_names]
    if len(branches) == 1:
      return branches[0](state, batch)
    return jax.lax.switch(index, branches, state, batch)

  return train_step


@dataclasses.dataclass(frozen=True)
class Trainable:
  """A config's model, optimizer, born-sharded state setup and jitted step on one mesh."""

  model: nn.Module
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: Any  # logical axis rules of config.mesh
  setup: state_lib.StateSetup
  batch_sharding: jax.sharding.NamedSharding
  # jitted, state donated; a LoRA run's takes the frozen weights third: train_step(state, batch, frozen)
  train_step: Callable[..., tuple[TrainState, Metrics]]
  frozen: state_lib.FrozenSetup | None = None  # a LoRA run's frozen weights

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the state carrying their shardings (for .lower without allocating)."""
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                        self.setup.abstract_state, self.setup.shardings)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainable:
  """config -> DiT -> AdamW (decay mask from the abstract params) -> state setup -> jitted step.

  The one assembly the trainer, the AOT compiler, benchmarks and tests share; nothing is allocated
  until `setup.init` runs or the step is called.
  """
  from sora_jax.model.dit import DiT  # deferred: the binaries refuse bad flags before model/ loads
  from sora_jax.parallel import sharding as sharding_lib

  rules = sharding_lib.logical_rules(config.mesh)
  model = DiT(config=config.model, lora=lora_lib.spec_of(config.train))
  with sharding_lib.mesh_context(mesh, rules):
    boxed_params = state_lib.abstract_params(model, config)
  if model.lora is not None and not jax.tree.leaves(boxed_params):
    raise ValueError(f"train.lora_targets={tuple(config.train.lora_targets)} match no projection of the "
                     "DiT; expected regexes of paths such as blocks/attn1/to_q, blocks/ffn/proj_in")
  optimizer = optimizer_lib.make_optimizer(config.train, boxed_params)
  setup = state_lib.setup_state(model, config, optimizer, mesh, rules)
  frozen = state_lib.frozen_setup(model, config, mesh, rules)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  in_shardings = (setup.shardings, batch_sharding) + ((frozen.shardings,) if frozen else ())
  train_step = jax.jit(
      make_train_step(model, config, optimizer),
      in_shardings=in_shardings,
      out_shardings=(setup.shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0,), compiler_options=state_lib.compiler_options(config.train))
  return Trainable(model=model, optimizer=optimizer, mesh=mesh, rules=rules, setup=setup,
                   batch_sharding=batch_sharding, train_step=train_step, frozen=frozen)
