"""Two denoising experts (Wan2.2 A14B): truncated sigma draws, one expert per step, the boundary switch."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sora_jax.configs import base

from sora_jax import config as config_lib
from sora_jax.diffusion import experts as experts_lib
from sora_jax.diffusion import flow
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import step as step_lib


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_truncated_sigma_is_the_density_on_one_side_of_the_boundary(sampling, shift):
  d = base.get_config().diffusion
  d.sigma_sampling, d.shift = sampling, shift
  full = np.asarray(flow.sample_sigma(jax.random.PRNGKey(0), (100_000,), d))
  high = np.asarray(flow.sample_sigma(jax.random.PRNGKey(1), (100_000,), d, sigma_range=(0.875, 1.0)))
  low_range = experts_lib.sigma_range("low", 0.875)
  low = np.asarray(flow.sample_sigma(jax.random.PRNGKey(2), (100_000,), d, sigma_range=low_range))
  assert high.min() >= 0.875 and low.max() < 0.875
  mass = float(flow.sigma_mass((0.875, 1.0), d, shift))
  np.testing.assert_allclose(mass, np.mean(full >= 0.875), atol=0.004)
  quantiles = [0.1, 0.5, 0.9]
  np.testing.assert_allclose(np.quantile(high, quantiles), np.quantile(full[full >= 0.875], quantiles),
                             atol=0.003)
  np.testing.assert_allclose(np.quantile(low, quantiles), np.quantile(full[full < 0.875], quantiles),
                             atol=0.01)


def _expert_config(tiny_train_config, **train):
  config = tiny_train_config
  config.model.experts = 2
  config.diffusion.boundary_ratio = 0.7
  config.train.update(global_batch_size=2, warmup_steps=0, ema_decays=(0.999,), **train)
  config_lib.validate(config)
  return config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b = config.train.global_batch_size
  return {"latents": rng.normal(size=(b, 4, 4, 4, 12)).astype(np.float32),
          "text_embeds": rng.normal(size=(b, config.data.text_len, config.model.text_dim)).astype(np.float32)}


def _steps(config, count, devices=1):
  mesh = mesh_lib.create_mesh(config, jax.devices()[:devices])
  trainable = step_lib.build(config, mesh)
  state = trainable.setup.init(jax.random.PRNGKey(0))
  first = jax.device_get(state)
  history = []
  with sharding_lib.mesh_context(mesh, trainable.rules):
    for index in range(count):
      before = jax.device_get(state.params)
      batch = jax.device_put(_batch(config, index), trainable.batch_sharding)
      state, metrics = trainable.train_step(state, batch)
      history.append((before, jax.device_get(state.params), jax.device_get(metrics)))
  return first, state, history


def _changed(before, after):
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after),
                                                       strict=True))


def test_each_step_trains_the_expert_of_its_sigmas_and_leaves_the_other(tiny_train_config):
  config = _expert_config(tiny_train_config, sigma_buckets=10)
  first, state, history = _steps(config, 8)
  assert set(first.params) == {"high", "low"} and _changed(first.params["high"], first.params["low"])
  assert set(first.opt_state) == {"high", "low"} and set(first.ema["0.999"]) == {"high", "low"}
  drawn = [int(metrics["expert"]) for _, _, metrics in history]
  assert set(drawn) == {0, 1}, drawn  # both experts train over a few steps
  for before, after, metrics in history:
    name = "high" if int(metrics["expert"]) == 0 else "low"
    other = "low" if name == "high" else "high"
    assert _changed(before[name], after[name]) and not _changed(before[other], after[other])
    counts = metrics["sigma_bucket_count"]  # buckets of width 0.1: the boundary 0.7 splits them
    high = 2 if name == "high" else 0
    assert counts[7:].sum() == high and counts[:7].sum() == 2 - high
  # Each expert's Adam counts its own updates; its schedule reads the run's step.
  adam = {name: int(state.opt_state[name][1][0].count) for name in ("high", "low")}
  assert adam == {"high": drawn.count(0), "low": drawn.count(1)}


def test_the_high_expert_is_drawn_with_the_mass_of_its_sigmas(tiny_train_config):
  config = _expert_config(tiny_train_config)
  batch = {key: jnp.asarray(value) for key, value in _batch(config).items()}
  shift, weights = step_lib.training_inputs.clip_shifts(batch, jnp.int32(0), config)
  mass = float(experts_lib.high_mass(config.diffusion, shift, weights))
  np.testing.assert_allclose(mass, float(flow.sigma_mass((0.7, 1.0), config.diffusion, 1.0)), rtol=1e-6)
  keys = jax.random.split(jax.random.PRNGKey(3), 4000)
  drawn = jax.vmap(lambda key: experts_lib.draw(key, ("high", "low"), mass))(keys)
  np.testing.assert_allclose(float(jnp.mean(drawn == 0)), mass, atol=0.02)


def test_a_frozen_expert_has_no_optimizer_state_and_never_moves(tiny_train_config):
  config = _expert_config(tiny_train_config, train_experts=("low",))
  first, state, history = _steps(config, 3)
  assert set(state.opt_state) == {"low"} and set(state.ema["0.999"]) == {"low"}
  assert not _changed(first.params["high"], state.params["high"])
  assert all(int(metrics["expert"]) == 1 for _, _, metrics in history)
  assert all(metrics["sigma_bucket_count"][7:].sum() == 0 for _, _, metrics in history)


def test_the_velocity_switches_experts_at_the_boundary_timestep():
  model = base.get_config().model
  model.experts = 2
  diffusion = base.get_config().diffusion
  diffusion.boundary_ratio = 0.875
  apply = lambda params, latents, timesteps, text: latents * params
  velocity = jax.jit(experts_lib.velocity_fn(apply, {"high": 2.0, "low": 3.0}, model, diffusion))
  ones = jnp.ones((2, 3))
  assert float(velocity(ones, jnp.full((2,), 875.0), None)[0, 0]) == 2.0
  assert float(velocity(ones, jnp.full((2,), 874.9), None)[0, 0]) == 3.0
  # Given frames' tokens at timestep 0 do not pull a high-noise call to the low expert.
  assert float(velocity(ones, jnp.asarray([[0.0, 990.0]]), None)[0, 0]) == 2.0


def test_expert_config_errors_name_the_field(tiny_train_config):
  config = tiny_train_config
  for field, value, message in (("model.experts", 3, "model.experts=3"),
                                ("diffusion.boundary_ratio", 1.0, "boundary_ratio=1.0"),
                                ("train.train_experts", ("mid",), "train.train_experts")):
    bad = config_lib.from_json(config.to_dict())
    bad.model.experts = 2
    group, key = field.split(".")
    bad[group][key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad)




def test_host_held_expert_state_trains_the_same_and_stays_on_the_host(tiny_train_config):
  config = _expert_config(tiny_train_config)
  config.mesh.ici = (1, 2, 1, 1)
  _, reference, reference_history = _steps(config, 4, devices=2)
  config.train.host_state = ("opt_state", "ema")
  _, state, history = _steps(config, 4, devices=2)
  assert [int(m["expert"]) for *_, m in history] == [int(m["expert"]) for *_, m in reference_history]
  np.testing.assert_allclose([float(m["loss"]) for *_, m in history],
                             [float(m["loss"]) for *_, m in reference_history], rtol=1e-6)
  kinds = lambda tree: {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}
  assert kinds(state.opt_state) == kinds(state.ema) == {"pinned_host"} and kinds(state.params) == {"device"}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.ema), jax.device_get(reference.ema))


@pytest.mark.slow
def test_the_expert_switch_holds_one_experts_working_state_on_a_tpu():
  """The A14B's layer shape compiled for a v5p-8: a second expert costs its weights and host-held state,
  and less than its weights again in temporaries (the switch runs one expert's step, not two)."""
  import os

  from sora_jax import tpu_fit

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5p-8")
  reports = {}
  for experts in (1, 2):
    config = config_lib.load(os.path.join(repo, "configs", "wan2_2_t2v_a14b.py"))
    config.model.update(num_layers=2, experts=experts)
    config.train.update(global_batch_size=4, grad_accum_steps=1)
    config.data.update(buckets=((17, 480, 832),), image_buckets=(), image_ratio=0.0)
    reports[experts] = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  one, two = reports[1], reports[2]
  weights = one.state_gib["params"]
  np.testing.assert_allclose(two.state_gib["params"], 2 * weights, rtol=1e-6)
  for part in ("opt_state (host)", "ema (host)"):
    np.testing.assert_allclose(two.state_gib[part], 2 * one.state_gib[part], rtol=1e-6)
  # Only the drawn expert's moments and EMA visit the device.
  assert two.temp_gib - one.temp_gib < weights, (one.temp_gib, two.temp_gib, weights)
