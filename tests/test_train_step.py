"""The pure train step and its parts: schedule, decay mask, EMA, NaN skip, no retrace, mesh invariance."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sora_jax.model.dit import DiT
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import ema as ema_lib
from sora_jax.train import optimizer as optimizer_lib
from sora_jax.train import state as state_lib
from sora_jax.train import step as step_lib


def _batches(config, count, seed=0):
  rng = np.random.default_rng(seed)
  b = config.train.global_batch_size
  text_shape = (b, config.data.text_len, config.model.text_dim)
  return [{"latents": rng.normal(size=(b, 4, 4, 4, 12)).astype(np.float32),
           "text_embeds": rng.normal(size=text_shape).astype(np.float32)}
          for _ in range(count)]


def _run_steps(config, devices, batches, wrap_step=None):
  """Losses and final state of len(batches) steps on a mesh over `devices`."""
  mesh = mesh_lib.create_mesh(config, devices)
  trainable = step_lib.build(config, mesh)
  rules, setup, jitted = trainable.rules, trainable.setup, trainable.train_step
  state = setup.init(jax.random.PRNGKey(config.train.seed))
  batch_sharding = trainable.batch_sharding
  if wrap_step is not None:
    step_fn = wrap_step(step_lib.make_train_step(trainable.model, config, trainable.optimizer))
    jitted = jax.jit(step_fn, in_shardings=(setup.shardings, batch_sharding),
                     out_shardings=(setup.shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,),
                     compiler_options=state_lib.compiler_options(config.train))
  history = []
  with sharding_lib.mesh_context(mesh, rules):
    for batch in batches:
      state, metrics = jitted(state, jax.device_put(batch, batch_sharding))
      history.append(jax.device_get(metrics))
  return history, state, setup


# ---------------------------------------------------------------- schedule, mask, EMA


def test_schedule_warmup_then_cosine(tiny_train_config):
  tiny_train_config.train.update(learning_rate=1.0, warmup_steps=4, num_steps=14, schedule="cosine",
                                 end_lr_ratio=0.1)
  schedule = optimizer_lib.learning_rate_schedule(tiny_train_config.train)
  lrs = [float(schedule(step)) for step in range(16)]
  np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
  np.testing.assert_allclose(lrs[14], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[9], 0.1 + 0.9 * 0.5, rtol=1e-6)  # half way through the decay
  tiny_train_config.train.schedule = "constant"
  constant = optimizer_lib.learning_rate_schedule(tiny_train_config.train)
  assert float(constant(3)) == 1.0 and float(constant(100)) == 1.0


def test_schedule_wsd_holds_the_peak_until_its_cooldown(tiny_train_config):
  tiny_train_config.train.update(learning_rate=1.0, warmup_steps=2, num_steps=20, schedule="wsd",
                                 decay_fraction=0.25, end_lr_ratio=0.1)
  schedule = optimizer_lib.learning_rate_schedule(tiny_train_config.train)
  lrs = [float(schedule(step)) for step in range(22)]
  np.testing.assert_allclose(lrs[:2], [0.5, 1.0], rtol=1e-6)
  assert lrs[2:16] == [1.0] * 14  # stable until the last 5 of 20 steps
  assert all(a > b for a, b in zip(lrs[15:20], lrs[16:21], strict=True))
  np.testing.assert_allclose(lrs[20:], [0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(lrs[16], 0.1 + 0.9 * 0.5 * (1 + np.cos(0.2 * np.pi)), rtol=1e-6)


def test_decay_mask_spares_norms_biases_and_tables(tiny_train_config):
  model = DiT(config=tiny_train_config.model)
  boxed = state_lib.abstract_params(model, tiny_train_config)
  mask = {jax.tree_util.keystr(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(optimizer_lib.decay_mask(boxed))[0]}
  decayed = {k for k, v in mask.items() if v}
  spared = {k for k, v in mask.items() if not v}
  assert all(k.endswith("['kernel']") for k in decayed), decayed
  assert any("['ffn']" in k for k in decayed) and any("['attn1']['to_q']" in k for k in decayed)
  for k in spared:
    assert ("bias" in k or "scale" in k or "norm" in k), k
  assert "['blocks']['scale_shift_table']" in spared  # stacked [layers, 6, D] table
  assert "['blocks']['ffn']['proj_in']['bias']" in spared  # stacked [layers, F] bias


def test_adamw_does_not_decay_masked_params(tiny_train_config):
  tiny_train_config.train.update(weight_decay=0.5, learning_rate=0.1, warmup_steps=0, grad_clip=0.0)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  optimizer = optimizer_lib.make_optimizer(tiny_train_config.train, params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5)
  np.testing.assert_array_equal(new["dense"]["bias"], 1.0)


def test_lr_multipliers_scale_matching_updates(tiny_train_config):
  tiny_train_config.train.update(weight_decay=0.0, learning_rate=0.01, warmup_steps=0, grad_clip=1.0,
                                 lr_multipliers=(("norm_[qk]", 10.0), ("proj", 0.5)))
  params = {"attn": {"norm_q": {"scale": jnp.ones((3,))}, "norm_k": {"scale": jnp.ones((3,))}},
            "proj": {"kernel": jnp.ones((2, 2))}, "other": {"kernel": jnp.ones((2, 2))}}
  optimizer = optimizer_lib.make_optimizer(tiny_train_config.train, params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  # Adam's first step moves every parameter by lr (times its multiplier).
  np.testing.assert_allclose(updates["attn"]["norm_q"]["scale"], -0.1, rtol=1e-4)
  np.testing.assert_allclose(updates["attn"]["norm_k"]["scale"], -0.1, rtol=1e-4)
  np.testing.assert_allclose(updates["proj"]["kernel"], -0.005, rtol=1e-4)
  np.testing.assert_allclose(updates["other"]["kernel"], -0.01, rtol=1e-4)


def test_lr_multipliers_on_the_model_tree(tiny_train_config):
  tiny_train_config.train.lr_multipliers = (("attn1/norm_[qk]", 10.0),)
  boxed = state_lib.abstract_params(DiT(config=tiny_train_config.model), tiny_train_config)
  multipliers = optimizer_lib.lr_multipliers(tiny_train_config.train, boxed)
  factors = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(multipliers)[0]}
  boosted = sorted(k for k, v in factors.items() if v == 10.0)
  assert boosted == ["['blocks']['attn1']['norm_k']['scale']", "['blocks']['attn1']['norm_q']['scale']"]
  assert all(v in (1.0, 10.0) for v in factors.values())
  tiny_train_config.train.lr_multipliers = ()
  assert optimizer_lib.lr_multipliers(tiny_train_config.train, boxed) is None


def test_lr_multipliers_matching_nothing_is_an_error(tiny_train_config):
  tiny_train_config.train.lr_multipliers = (("no_such_param", 3.0),)
  with pytest.raises(ValueError, match="no_such_param.*match no parameter"):
    optimizer_lib.make_optimizer(tiny_train_config.train, {"dense": {"kernel": jnp.ones((2, 2))}})


def test_ema_update_and_skip():
  params = {"w": jnp.full((3,), 2.0)}
  ema = ema_lib.init({"w": jnp.zeros((3,))}, (0.9, 0.99))
  assert sorted(ema) == ["0.9", "0.99"]
  updated = ema_lib.update(ema, params)
  np.testing.assert_allclose(updated["0.9"]["w"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(updated["0.99"]["w"], 0.02, rtol=1e-5)
  held = ema_lib.update(ema, params, apply=jnp.asarray(False))
  np.testing.assert_array_equal(held["0.9"]["w"], 0.0)


# ---------------------------------------------------------------- the step on the DiT


def test_nonfinite_batches_skip_the_update_and_count(tiny_train_config):
  batches = _batches(tiny_train_config, 4)
  batches[1]["latents"][0, 0, 0, 0, 0] = np.nan
  batches[2]["text_embeds"][:] = np.inf
  history, state, _ = _run_steps(tiny_train_config, jax.devices()[:1], batches)
  assert [int(m["skipped"]) for m in history] == [0, 1, 1, 0]
  assert [int(m["nonfinite_run"]) for m in history] == [0, 1, 2, 0]
  assert int(state.skipped_steps) == 2 and int(state.step) == 4
  assert np.isnan(float(history[1]["loss"])) and not np.isfinite(float(history[2]["loss"]))
  # Skipped steps leave the parameters bit-identical; the next good step moves them again.
  norms = [float(m["param_norm"]) for m in history]
  assert norms[0] == norms[1] == norms[2] != norms[3]
  # Params, optimizer moments and EMA stay finite.
  for tree in (state.params, state.opt_state, state.ema):
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_final_shift_moves_the_sigmas_of_the_last_steps(tiny_train_config):
  # shift 1000 puts every clip in the top sigma bucket, final shift 0.001 in the bottom one.
  config = tiny_train_config
  config.train.num_steps = 4
  config.diffusion.update(shift=1000.0, final_shift=0.001, final_shift_fraction=0.5)
  history, _, _ = _run_steps(config, jax.devices()[:1], _batches(config, 4))
  batch = config.train.global_batch_size
  top = [float(m["sigma_bucket_count"][-1]) for m in history]
  bottom = [float(m["sigma_bucket_count"][0]) for m in history]
  assert top == [batch, batch, 0, 0] and bottom == [0, 0, batch, batch]


def test_accumulation_without_retrace(tiny_train_config):
  # Fresh batches of the same shape must reuse the compiled step (a retrace would raise here).
  tiny_train_config.train.grad_accum_steps = 2
  wrap = lambda fn: chex.assert_max_traces(fn, n=1)
  history, state, _ = _run_steps(tiny_train_config, jax.devices()[:4], _batches(tiny_train_config, 3),
                                 wrap_step=wrap)
  assert int(state.step) == 3
  losses = [float(m["loss"]) for m in history]
  assert all(np.isfinite(losses)) and len(set(losses)) == 3
  for metrics in history:
    assert float(metrics["num_clips"]) == 8  # both micro-batches counted
    assert float(metrics["sigma_bucket_count"].sum()) == 8


_REFERENCE_LOSSES = {}


@pytest.mark.parametrize("ici,backend", [
    ((1, 4, 1, 2), "xla"), ((8, 1, 1, 1), "xla"), ((1, 2, 4, 1), "ring"), ((1, 4, 2, 1), "all_to_all")],
    ids=["fsdp4_tensor2", "data8", "fsdp2_context4_ring", "fsdp4_context2_all_to_all"])
def test_sharded_loss_matches_one_device(tiny_train_config, ici, backend):
  tiny_train_config.diffusion.caption_dropout = 0.5  # exercise every random draw of the step
  batches = _batches(tiny_train_config, 3)
  if "one_device" not in _REFERENCE_LOSSES:  # shared by all parametrizations
    reference, _, _ = _run_steps(tiny_train_config, jax.devices()[:1], batches)
    _REFERENCE_LOSSES["one_device"] = [float(m["loss"]) for m in reference]
  tiny_train_config.mesh.ici = ici
  tiny_train_config.model.attention_backend = backend
  sharded, state, _ = _run_steps(tiny_train_config, jax.devices(), batches)
  np.testing.assert_allclose([float(m["loss"]) for m in sharded], _REFERENCE_LOSSES["one_device"],
                             rtol=1e-5, atol=1e-6)
  # Parameters really are sharded on the 8-device mesh.
  kernel = state.params["blocks"]["ffn"]["proj_in"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  if ici[1] == 4:
    assert not kernel.sharding.is_fully_replicated


def test_boxed_tree_has_logical_names(tiny_train_config):
  model = DiT(config=tiny_train_config.model)
  boxed = state_lib.abstract_params(model, tiny_train_config)
  boxes = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)


def test_packed_batch_step(tiny_train_config):
  from sora_jax.data import packing

  tiny_train_config.data.packing = True
  tiny_train_config.data.token_budget = 48
  tiny_train_config.data.max_segments = 3
  tiny_train_config.train.global_batch_size = 2
  rng = np.random.default_rng(0)
  text_len, text_dim = tiny_train_config.data.text_len, tiny_train_config.model.text_dim
  arrays = packing.empty_rows(2, 48, 1 * 2 * 2 * 12, 3, text_len, text_dim)
  clip = lambda frames: (rng.normal(size=(frames, 4, 4, 12)).astype(np.float32),
                         rng.normal(size=(text_len, text_dim)).astype(np.float32))
  packing.fill_row(arrays, 0, [clip(4), clip(4)], (1, 2, 2))  # 16 + 16 tokens, 16 padding
  packing.fill_row(arrays, 1, [clip(4), clip(1), clip(2)], (1, 2, 2))  # 16 + 4 + 8 tokens
  history, state, _ = _run_steps(tiny_train_config, jax.devices()[:2], [arrays, arrays])
  for metrics in history:
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
    assert float(metrics["num_clips"]) == 5  # one sigma per packed clip, padding slots excluded
    assert float(metrics["sigma_bucket_count"].sum()) == 5
    assert float(metrics["num_tokens"]) == 32 + 28
  assert float(history[0]["loss"]) != float(history[1]["loss"])  # the update moved the model


def test_host_held_state_trains_the_same_and_checkpoints(tiny_train_config, tmp_path):
  from sora_jax.train import checkpoint as checkpoint_lib

  tiny_train_config.mesh.ici = (1, 4, 1, 1)
  tiny_train_config.train.ema_decays = (0.9,)
  batches = _batches(tiny_train_config, 3)
  reference, reference_state, _ = _run_steps(tiny_train_config, jax.devices()[:4], batches)
  tiny_train_config.train.host_state = ("ema", "opt_state")
  tiny_train_config.model.remat_policy = "offload"
  history, state, setup = _run_steps(tiny_train_config, jax.devices()[:4], batches)
  np.testing.assert_allclose([float(m["loss"]) for m in history], [float(m["loss"]) for m in reference],
                             rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.ema), jax.device_get(reference_state.ema))
  kinds = lambda tree: {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}
  assert kinds(state.ema) == kinds(state.opt_state) == {"pinned_host"}
  assert kinds(state.params) == {"device"}
  # A checkpoint restores onto the host-held shardings (and the arrays stay sharded there).
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  assert checkpointer.save(3, state)
  checkpointer.wait()
  restored, step = checkpointer.restore_latest(setup.abstract_state, setup.shardings)
  checkpointer.close()
  assert step == 3 and kinds(restored.ema) == {"pinned_host"}
  kernel = restored.opt_state[1][0].mu["blocks"]["ffn"]["proj_in"]["kernel"]
  assert not kernel.sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state),
               jax.device_get(state.opt_state))


def test_unknown_host_state_part_is_refused(tiny_train_config):
  from sora_jax import config as config_lib

  tiny_train_config.train.host_state = ("params",)
  with pytest.raises(config_lib.ConfigError, match=r"train.host_state=\('params',\); expected"):
    config_lib.validate(tiny_train_config)


def test_spike_guard_skips_an_outlier_gradient_and_counts_it(tiny_train_config):
  tiny_train_config.train.update(spike_sigmas=4.0, spike_warmup_steps=4, grad_clip=0.0)
  batches = _batches(tiny_train_config, 7, seed=3)
  batches[5] = {k: v * (100.0 if k == "latents" else 1.0) for k, v in batches[5].items()}
  def wrap(step_fn):
    def wrapped(state, batch):
      new_state, metrics = step_fn(state, batch)
      unchanged = jax.tree.map(lambda a, b: jnp.all(a == b), new_state.params, state.params)
      return new_state, {**metrics, "params_unchanged": jnp.all(jnp.stack(jax.tree.leaves(unchanged)))}
    return wrapped

  history, state, _ = _run_steps(tiny_train_config, jax.devices()[:1], batches, wrap_step=wrap)
  spikes = [int(m["spike"]) for m in history]
  assert spikes == [0, 0, 0, 0, 0, 1, 0]
  assert bool(history[5]["params_unchanged"]) and not bool(history[6]["params_unchanged"])
  assert int(history[5]["spike_steps"]) == 1 and int(history[5]["skipped_steps"]) == 1
  assert int(history[5]["nonfinite_run"]) == 0  # a spike does not count towards a rollback
  assert int(state.grad_norm_stats[0]) == 6  # the skipped step stays out of the statistics
  tiny_train_config.train.spike_sigmas = 0.0  # off: the same batch is applied
  history, _, _ = _run_steps(tiny_train_config, jax.devices()[:1], batches, wrap_step=wrap)
  assert [int(m["spike"]) for m in history] == [0] * 7 and not bool(history[5]["params_unchanged"])


# ---------------------------------------------------------------- given frames (image-to-video)


def _spied_step(config, batch):
  """One step of `config` on `batch` -> (what the DiT saw: noisy input, timesteps, velocity; metrics)."""
  mesh = mesh_lib.create_mesh(config, jax.devices()[:1])
  trainable = step_lib.build(config, mesh)
  seen = {}

  def record(noisy, timesteps, velocity):
    seen.update(noisy=np.asarray(noisy), timesteps=np.asarray(timesteps), velocity=np.asarray(velocity))

  class Spy:
    def apply(self, variables, noisy, timesteps, text_embeds, **extra):
      velocity = trainable.model.apply(variables, noisy, timesteps, text_embeds, **extra)
      jax.debug.callback(record, noisy, timesteps, velocity)
      return velocity

  step = jax.jit(step_lib.make_train_step(Spy(), config, trainable.optimizer))
  state = trainable.setup.init(jax.random.PRNGKey(0))
  with sharding_lib.mesh_context(mesh, trainable.rules):
    _, metrics = step(state, jax.device_put(batch, trainable.batch_sharding))
  jax.effects_barrier()
  return seen, jax.device_get(metrics)


@pytest.mark.parametrize("prob, choices", [(1.0, (1,)), (0.5, (1, 2))])
def test_given_frames_stay_clean_at_timestep_zero_and_out_of_the_loss(tiny_train_config, prob, choices):
  config = tiny_train_config
  batch = _batches(config, 1)[0]
  plain, _ = _spied_step(config, batch)
  config.train.update(condition_prob=prob, condition_frames=choices)
  seen, metrics = _spied_step(config, batch)

  latents = batch["latents"]  # [B, 4, 4, 4, 12]; patch (1, 2, 2): 4 tokens per latent frame
  batch_size, frames = latents.shape[:2]
  timesteps = seen["timesteps"]
  assert plain["timesteps"].shape == (batch_size,) and timesteps.shape == (batch_size, frames * 4)
  per_frame = timesteps.reshape(batch_size, frames, 4)
  given = (per_frame == 0).all(axis=2).sum(axis=1)  # given latent frames per clip
  counts = {int(k) for k in given}
  assert counts <= {0, *choices} and (counts == {1} if prob == 1.0 else len(counts) > 1), given
  sigma = plain["timesteps"] / 1000.0  # the draw leaves noise, sigma and captions as without it
  total, weight = 0.0, 0
  for clip in range(batch_size):
    k = int(given[clip])
    assert (per_frame[clip, :k] == 0).all() and np.allclose(per_frame[clip, k:], 1000 * sigma[clip])
    np.testing.assert_array_equal(seen["noisy"][clip, :k], latents[clip, :k])  # clean, bit for bit
    np.testing.assert_array_equal(seen["noisy"][clip, k:], plain["noisy"][clip, k:])
    noise = (seen["noisy"][clip, k:] - (1 - sigma[clip]) * latents[clip, k:]) / sigma[clip]
    error = np.square(seen["velocity"][clip, k:] - (noise - latents[clip, k:]))
    total, weight = total + error.sum(), weight + error.size
  np.testing.assert_allclose(float(metrics["loss"]), total / weight, rtol=1e-4)


def test_given_frame_settings_are_checked(tiny_train_config):
  from sora_jax import config as config_lib

  config = tiny_train_config  # video bucket of 4 latent frames, patch (1, 2, 2)
  for update, message in [
      (dict(condition_prob=1.5), r"train.condition_prob=1.5; expected a probability in \[0, 1\]"),
      (dict(condition_prob=0.5, condition_frames=()), r"train.condition_frames=\(\); expected positive"),
      (dict(condition_prob=0.5, condition_frames=(0,)), "expected positive latent frame counts"),
      (dict(condition_prob=0.5, condition_frames=(4,)), r"no video bucket has more than 4 latent frames"),
  ]:
    trial = config.copy_and_resolve_references()
    trial.train.update(update)
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(trial)
  packed = config.copy_and_resolve_references()
  packed.train.condition_prob = 0.5
  packed.data.update(packing=True, token_budget=64)
  with pytest.raises(config_lib.ConfigError, match="not supported in packed rows"):
    config_lib.validate(packed)
  config.train.update(condition_prob=0.5, condition_frames=(1, 3))
  config_lib.validate(config)


def test_packed_loss_is_the_mean_of_per_clip_losses(tiny_train_config):
  """Clips of 16, 4 and 8 tokens packed beside each other weigh the same in the loss."""
  from sora_jax.data import packing

  config = tiny_train_config
  config.data.update(packing=True, token_budget=48, max_segments=3)
  config.train.global_batch_size = 1
  rng = np.random.default_rng(3)
  text_len, text_dim = config.data.text_len, config.model.text_dim
  arrays = packing.empty_rows(1, 48, 1 * 2 * 2 * 12, 3, text_len, text_dim)
  clip = lambda frames: (rng.normal(size=(frames, 4, 4, 12)).astype(np.float32),
                         rng.normal(size=(text_len, text_dim)).astype(np.float32))
  packing.fill_row(arrays, 0, [clip(4), clip(1), clip(2)], (1, 2, 2))  # 16 + 4 + 8 tokens, 20 padding
  seen, metrics = _spied_step(config, arrays)
  latents, segment_ids = arrays["latents"][0], arrays["segment_ids"][0]
  sigma = seen["timesteps"][0] / 1000.0  # per token: each clip's sigma on its tokens
  per_clip = []
  for segment in (1, 2, 3):
    tokens = segment_ids == segment
    s = sigma[tokens][:, None]
    noise = (seen["noisy"][0, tokens] - (1 - s) * latents[tokens]) / s
    per_clip.append(np.mean(np.square(seen["velocity"][0, tokens] - (noise - latents[tokens]))))
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(per_clip), rtol=1e-4)
  token_weighted = sum(e * n for e, n in zip(per_clip, (16, 4, 8), strict=True)) / 28
  assert abs(np.mean(per_clip) - token_weighted) > 1e-3 * np.mean(per_clip)  # the two differ here
