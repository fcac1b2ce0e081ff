"""Tests of the flow samplers: schedules and every step against diffusers, CFG, exactness, determinism.

The parity tests drive diffusers' schedulers (configured as Wan's pipeline ships them) and our jitted
loop with the same nonlinear velocity function, written once in jax and once in torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import samplers

LATENT_SHAPE = (2, 3, 4, 4, 2)  # [B, T, H, W, C], tiny
TEXT_SHAPE = (2, 5, 6)  # [B, L, D]
# (steps, shift): warm-up/final-order edge cases (1-3 steps), Wan's 480p / 720p shifts, 50 steps.
STEP_SHIFTS = [(1, 3.0), (2, 5.0), (3, 1.0), (10, 3.0), (10, 5.0), (50, 1.0), (50, 3.0), (50, 5.0)]


def velocity_jax(latents, timesteps, text_embeds):
  """A fixed nonlinear field of latents, timestep and text (stands in for the DiT)."""
  time = (timesteps.astype(jnp.float32) / 1000.0).reshape((-1,) + (1,) * (latents.ndim - 1))
  text = text_embeds.mean(axis=(1, 2)).reshape(time.shape)
  return jnp.tanh(0.8 * latents + jnp.sin(3.0 * time * latents)) - 0.5 * latents + text * time


def velocity_torch(latents, timesteps, text_embeds):
  import torch

  time = (timesteps.to(torch.float32) / 1000.0).reshape((-1,) + (1,) * (latents.ndim - 1))
  text = text_embeds.mean(dim=(1, 2)).reshape(time.shape)
  return torch.tanh(0.8 * latents + torch.sin(3.0 * time * latents)) - 0.5 * latents + text * time


def wan_scheduler(sampler, shift):
  """The scheduler Wan2.1's diffusers pipeline runs (scheduler_config.json of Wan-AI/*-Diffusers)."""
  from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

  if sampler == "euler":
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  return UniPCMultistepScheduler(
      num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
      solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
      final_sigmas_type="zero", timestep_spacing="linspace", beta_schedule="linear")


def diffusers_trajectory(scheduler, steps, noise, cond, uncond, guidance_scale):
  """The Wan pipeline's denoising loop: latents after every scheduler step, and the model timesteps."""
  import torch

  scheduler.set_timesteps(steps)
  scheduler.set_begin_index(0)
  latents = torch.from_numpy(noise)
  cond, uncond = torch.from_numpy(cond), torch.from_numpy(uncond)
  trajectory = []
  for timestep in scheduler.timesteps:
    timesteps = timestep.expand(latents.shape[0])
    velocity = velocity_torch(latents, timesteps, cond)
    if guidance_scale > 1.0:
      velocity_uncond = velocity_torch(latents, timesteps, uncond)
      velocity = velocity_uncond + guidance_scale * (velocity - velocity_uncond)
    latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    trajectory.append(latents.numpy())
  return np.stack(trajectory)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
  cond = rng.standard_normal(TEXT_SHAPE).astype(np.float32)
  uncond = rng.standard_normal(TEXT_SHAPE).astype(np.float32)
  return noise, cond, uncond


@pytest.mark.torch
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.5])
def test_schedule_equals_diffusers(sampler, steps, shift):
  scheduler = wan_scheduler(sampler, shift)
  scheduler.set_timesteps(steps)
  np.testing.assert_array_equal(samplers.sigma_schedule(sampler, steps, shift), scheduler.sigmas.numpy())
  np.testing.assert_array_equal(
      samplers.model_timesteps(sampler, steps, shift), scheduler.timesteps.numpy().astype(np.float32))


@pytest.mark.torch
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize(("steps", "shift"), STEP_SHIFTS)
def test_every_step_equals_diffusers(sampler, steps, shift):
  noise, cond, uncond = inputs()
  # Guidance on for most cases (Wan samples with 5.0), off for the rest to cover the plain path.
  guidance_scale = 1.0 if steps == 10 and shift == 3.0 else 5.0
  expected = diffusers_trajectory(wan_scheduler(sampler, shift), steps, noise, cond, uncond, guidance_scale)
  final, trajectory = samplers.sample(
      velocity_jax, noise, sampler=sampler, steps=steps, shift=shift, guidance_scale=guidance_scale,
      cond=cond, uncond=uncond, return_intermediates=True)
  assert trajectory.shape == (steps, *LATENT_SHAPE)
  np.testing.assert_allclose(trajectory, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(final, trajectory[-1])


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (4, 3.0), (25, 5.0)])
def test_straight_flow_is_integrated_exactly(sampler, steps, shift):
  """For one data point the flow is a straight line (constant velocity); both solvers land on it."""
  noise, _, _ = inputs(1)
  data = np.random.default_rng(2).standard_normal(LATENT_SHAPE).astype(np.float32)
  straight = lambda latents, timesteps, text_embeds: jnp.broadcast_to(noise - data, latents.shape)
  final, trajectory = samplers.sample(
      straight, noise, sampler=sampler, steps=steps, shift=shift, return_intermediates=True)
  np.testing.assert_allclose(final, data, atol=2e-5)
  sigmas = samplers.sigma_schedule(sampler, steps, shift)[1:, None, None, None, None, None]
  np.testing.assert_allclose(trajectory, (1 - sigmas) * data + sigmas * noise, atol=2e-5)


def test_schedules_decrease_from_noise_to_data_and_shift_spends_steps_at_high_noise():
  for sampler in samplers.SAMPLERS:
    plain = samplers.sigma_schedule(sampler, 10, 1.0)
    shifted = samplers.sigma_schedule(sampler, 10, 5.0)
    for sigmas in (plain, shifted):
      assert sigmas.shape == (11,) and sigmas.dtype == np.float32
      assert sigmas[-1] == 0.0 and 0.999 <= sigmas[0] <= 1.0 and np.all(np.diff(sigmas) < 0)
    assert np.all(shifted[1:-1] > plain[1:-1])
  # UniPC's model timesteps are diffusers' int64 values: 1000*sigma truncated.
  timesteps = samplers.model_timesteps("unipc", 4, 1.0)
  np.testing.assert_array_equal(timesteps, [999.0, 750.0, 500.0, 250.0])


def test_guidance_is_one_batched_call_of_cond_and_uncond():
  noise, cond, uncond = inputs()
  seen_batches = []

  def recording(latents, timesteps, text_embeds):
    seen_batches.append((latents.shape[0], timesteps.shape, text_embeds.shape[0]))
    return velocity_jax(latents, timesteps, text_embeds)

  guided = samplers.sample(recording, noise, sampler="euler", steps=1, shift=1.0, guidance_scale=4.0,
                           cond=cond, uncond=uncond)
  assert seen_batches == [(4, (4,), 4)]  # traced once: one model call of 2B per step
  timesteps = jnp.full((2,), 1000.0)
  velocity_cond = velocity_jax(noise, timesteps, cond)
  velocity_uncond = velocity_jax(noise, timesteps, uncond)
  # One Euler step from sigma 1 to 0: latents = noise - v.
  expected = noise - (velocity_uncond + 4.0 * (velocity_cond - velocity_uncond))
  np.testing.assert_allclose(guided, expected, rtol=1e-6, atol=1e-6)
  # No uncond given: the null text is zeros, as caption dropout trains it.
  zero_uncond = samplers.sample(velocity_jax, noise, sampler="euler", steps=1, shift=1.0,
                                guidance_scale=4.0, cond=cond)
  explicit = samplers.sample(velocity_jax, noise, sampler="euler", steps=1, shift=1.0,
                             guidance_scale=4.0, cond=cond, uncond=np.zeros_like(cond))
  np.testing.assert_array_equal(zero_uncond, explicit)


def test_model_sees_the_schedule_timesteps():
  noise, cond, _ = inputs()
  for sampler in samplers.SAMPLERS:
    seen = []
    record = lambda timesteps, seen=seen: seen.append(np.asarray(timesteps))

    def recording(latents, timesteps, text_embeds, record=record):
      jax.debug.callback(record, timesteps)
      return velocity_jax(latents, timesteps, text_embeds)

    jax.block_until_ready(samplers.sample(recording, noise, sampler=sampler, steps=5, shift=3.0, cond=cond))
    expected = samplers.model_timesteps(sampler, 5, 3.0)
    np.testing.assert_array_equal(np.stack(seen), np.repeat(expected[:, None], 2, axis=1))


def test_sampling_inside_an_outer_jit_with_traced_params():
  noise, cond, uncond = inputs()

  @jax.jit
  def generate(scale, noise, cond, uncond):
    velocity = lambda latents, timesteps, text_embeds: scale * velocity_jax(latents, timesteps, text_embeds)
    return samplers.sample(velocity, noise, sampler="unipc", steps=6, shift=3.0, guidance_scale=3.0,
                           cond=cond, uncond=uncond)

  direct = samplers.sample(velocity_jax, noise, sampler="unipc", steps=6, shift=3.0, guidance_scale=3.0,
                           cond=cond, uncond=uncond)
  np.testing.assert_allclose(generate(jnp.float32(1.0), noise, cond, uncond), direct, rtol=1e-6, atol=1e-6)


def test_seeded_sampling_is_deterministic_and_per_example():
  noise = samplers.seeded_noise(7, LATENT_SHAPE)
  np.testing.assert_array_equal(noise, samplers.seeded_noise(7, LATENT_SHAPE))
  assert not np.array_equal(noise, samplers.seeded_noise(8, LATENT_SHAPE))
  assert noise.shape == LATENT_SHAPE and noise.dtype == jnp.float32
  # Example b's noise depends only on (seed, index): the same in a batch of 1 or of 2.
  np.testing.assert_array_equal(samplers.seeded_noise(7, (1, *LATENT_SHAPE[1:]), first_index=1)[0], noise[1])
  _, cond, uncond = inputs()
  kwargs = dict(sampler="unipc", steps=4, shift=3.0, guidance_scale=5.0, cond=cond, uncond=uncond)
  first = samplers.sample(velocity_jax, noise, **kwargs)
  second = samplers.sample(velocity_jax, samplers.seeded_noise(7, LATENT_SHAPE), **kwargs)
  np.testing.assert_array_equal(first, second)


def test_bad_arguments_are_named():
  noise, cond, _ = inputs()
  with pytest.raises(ValueError, match="sampler='ddim'"):
    samplers.sigma_schedule("ddim", 10, 3.0)
  with pytest.raises(ValueError, match="steps=0"):
    samplers.sigma_schedule("euler", 0, 3.0)
  with pytest.raises(ValueError, match="shift=0"):
    samplers.sigma_schedule("euler", 10, 0.0)
  with pytest.raises(ValueError, match="needs cond"):
    samplers.sample(velocity_jax, noise, sampler="euler", steps=2, shift=1.0, guidance_scale=2.0)
  with pytest.raises(ValueError, match="batch"):
    samplers.sample(velocity_jax, noise, sampler="euler", steps=2, shift=1.0, cond=cond[:1])
  with pytest.raises(ValueError, match="positive batch"):
    samplers.seeded_noise(0, ())


def test_sampling_the_dit_with_guidance_compiles_the_model_once(tiny_train_config):
  from sora_jax.model.dit import DiT

  model_config = tiny_train_config.model
  model = DiT(config=model_config)
  latent_shape = (2, 2, 4, 4, model_config.in_channels)
  text_embeds = jax.random.normal(jax.random.key(1), (2, 3, model_config.text_dim))
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros(latent_shape), jnp.zeros((2,)), text_embeds)
  params = variables["params"]
  traces = []

  @jax.jit
  def generate(params, noise, cond):
    def velocity_fn(latents, timesteps, text):
      traces.append(latents.shape)
      return model.apply({"params": params}, latents, timesteps, text)

    return samplers.sample(velocity_fn, noise, sampler="unipc", steps=3, shift=3.0, guidance_scale=4.0,
                           cond=cond)

  noise = samplers.seeded_noise(0, latent_shape)
  latents = generate(params, noise, text_embeds)
  assert latents.shape == latent_shape and bool(jnp.all(jnp.isfinite(latents)))
  assert traces == [(4, *latent_shape[1:])]  # one traced model call of batch 2B for all steps
  np.testing.assert_array_equal(generate(params, noise, text_embeds), latents)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_given_frames_stay_as_given_and_their_tokens_see_timestep_zero(sampler):
  """Image-to-video / extension: clip 0 is given its first latent frame, clip 1 its first two."""
  from sora_jax.diffusion import conditioning

  noise, cond, uncond = inputs()  # latents [2, 3, 4, 4, 2]; patch (1, 2, 2): 4 tokens per frame
  given_latents = jax.random.normal(jax.random.key(5), LATENT_SHAPE)
  given_frames = jnp.asarray([1, 2], jnp.int32)
  cells = conditioning.cell_mask(given_frames, LATENT_SHAPE[1])
  tokens = conditioning.token_mask(given_frames, LATENT_SHAPE[1:], (1, 2, 2))
  seen = []

  def recording(latents, timesteps, text_embeds):
    jax.debug.callback(lambda t: seen.append(np.asarray(t)), timesteps)
    velocity = velocity_jax(latents, timesteps.mean(axis=1), text_embeds)
    return velocity.at[:, 0].set(100.0)  # a model that would move the given frames if allowed

  common = dict(sampler=sampler, steps=4, shift=3.0, guidance_scale=2.0, cond=cond, uncond=uncond)
  out = samplers.sample(recording, noise, given_latents=given_latents, given_cells=cells,
                        given_tokens=tokens, **common)
  jax.effects_barrier()
  np.testing.assert_array_equal(out[0, :1], given_latents[0, :1])  # bit for bit
  np.testing.assert_array_equal(out[1, :2], given_latents[1, :2])
  assert np.all(np.isfinite(out)) and not np.allclose(out[0, 1:], given_latents[0, 1:])
  expected = samplers.model_timesteps(sampler, 4, 3.0)
  for step, timesteps in enumerate(seen):  # [2B, N]: cond and uncond halves
    assert timesteps.shape == (4, 12)
    per_frame = timesteps.reshape(4, 3, 4)
    for row, k in enumerate([1, 2, 1, 2]):
      assert (per_frame[row, :k] == 0).all() and (per_frame[row, k:] == expected[step]).all()
  plain = samplers.sample(velocity_jax, noise, **common)
  assert not np.allclose(out, plain)
  with pytest.raises(ValueError, match="together"):
    samplers.sample(recording, noise, given_latents=given_latents, **common)
