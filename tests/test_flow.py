"""Tests of the flow-matching objective: sigma densities and shift, interpolation, loss, caption dropout.

Property tests (hypothesis) over shapes and values; tiny arrays only.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sora_jax.configs import base

from sora_jax.diffusion import flow

# Few distinct shapes: every new shape compiles again, values vary freely.
FAST = settings(max_examples=10, deadline=None)


def diffusion_config(**overrides):
  config = base.get_config().diffusion
  for name, value in overrides.items():
    config[name] = value
  return config


shapes = st.sampled_from([(1,), (5,), (2, 3), (2, 2, 3)])
shifts = st.floats(0.1, 10.0)
unit = st.floats(0.0, 1.0)


@FAST
@given(shape=shapes, sampling=st.sampled_from(flow.SIGMA_SAMPLINGS), shift=shifts, seed=st.integers(0, 2**31))
def test_sample_sigma_lies_in_unit_interval_with_requested_shape(shape, sampling, shift, seed):
  config = diffusion_config(sigma_sampling=sampling, shift=shift, logit_std=2.0)
  sigma = flow.sample_sigma(jax.random.key(seed), shape, config)
  assert sigma.shape == shape and sigma.dtype == jnp.float32
  assert bool(jnp.all((sigma >= 0.0) & (sigma <= 1.0)))


def test_logit_normal_median_and_uniform_mean():
  rng = jax.random.key(0)
  logit = flow.sample_sigma(rng, (20000,), diffusion_config(logit_mean=0.5, logit_std=1.0))
  # The median of sigmoid(N(m, s)) is sigmoid(m).
  assert abs(float(jnp.median(logit)) - 1 / (1 + math.exp(-0.5))) < 0.01
  uniform = flow.sample_sigma(rng, (20000,), diffusion_config(sigma_sampling="uniform"))
  assert abs(float(jnp.mean(uniform)) - 0.5) < 0.01


def test_mode_density_with_zero_scale_is_uniform_and_positive_scale_favours_the_middle():
  u = jnp.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(flow.mode_sigma(u, 0.0), 1.0 - u, atol=1e-6)
  sigma = flow.sample_sigma(jax.random.key(1), (20000,), diffusion_config(sigma_sampling="mode"))
  middle = float(jnp.mean((sigma > 0.25) & (sigma < 0.75)))
  assert middle > 0.55  # uniform would give 0.5
  with pytest.raises(ValueError, match="mode_scale"):
    flow.mode_sigma(u, 2.0)


def test_fixed_shift_moves_sigma_towards_noise():
  rng = jax.random.key(2)
  plain = flow.sample_sigma(rng, (4096,), diffusion_config(shift=1.0))
  shifted = flow.sample_sigma(rng, (4096,), diffusion_config(shift=3.0))
  np.testing.assert_allclose(shifted, flow.shift_sigma(plain, 3.0), atol=1e-6)
  assert float(jnp.mean(shifted)) > float(jnp.mean(plain)) + 0.1


@FAST
@given(sigma_a=unit, sigma_b=unit, shift=shifts)
def test_shift_is_monotone_and_fixes_the_ends(sigma_a, sigma_b, shift):
  low, high = sorted((sigma_a, sigma_b))
  assert float(flow.shift_sigma(low, shift)) <= float(flow.shift_sigma(high, shift)) + 1e-7
  assert float(flow.shift_sigma(0.0, shift)) == 0.0
  assert float(flow.shift_sigma(1.0, shift)) == pytest.approx(1.0, abs=1e-6)
  # Shifting by s then 1/s is the identity (the shift is a Moebius map with inverse shift 1/s).
  back = flow.shift_sigma(flow.shift_sigma(low, shift), 1.0 / shift)
  assert float(back) == pytest.approx(low, abs=1e-5)
  assert float(flow.shift_sigma(low, 1.0)) == pytest.approx(low, abs=1e-7)


def test_shift_from_tokens_interpolates_linearly_and_clamps():
  config = diffusion_config(shift_from_tokens=True, base_shift_tokens=256, max_shift_tokens=4096,
                            base_shift=1.0, max_shift=3.0)
  tokens = jnp.array([0, 256, 2176, 4096, 100000])
  np.testing.assert_allclose(flow.shift_for_tokens(tokens, config), [1.0, 1.0, 2.0, 3.0, 3.0], atol=1e-6)
  # Per-example shifts: the same uniform draw, shifted by each example's own shift.
  rng = jax.random.key(3)
  tokens = jnp.array([256, 4096])
  sigma = flow.sample_sigma(rng, (2,), config.copy_and_resolve_references(), tokens_per_clip=tokens)
  config.shift_from_tokens = False
  unshifted = flow.sample_sigma(rng, (2,), config)
  np.testing.assert_allclose(sigma, flow.shift_sigma(unshifted, jnp.array([1.0, 3.0])), atol=1e-6)


def test_shift_from_tokens_needs_tokens_and_a_valid_range():
  config = diffusion_config(shift_from_tokens=True)
  with pytest.raises(ValueError, match="tokens_per_clip"):
    flow.sample_sigma(jax.random.key(0), (2,), config)
  config.max_shift_tokens = config.base_shift_tokens
  with pytest.raises(ValueError, match="max_shift_tokens"):
    flow.shift_for_tokens(512, config)


def test_unknown_sigma_sampling_is_named():
  with pytest.raises(ValueError, match="sigma_sampling='beta'"):
    flow.sample_sigma(jax.random.key(0), (2,), diffusion_config(sigma_sampling="beta"))


@FAST
@given(batch_tokens=st.sampled_from([(1, 1), (2, 3)]), seed=st.integers(0, 1000))
def test_interpolation_endpoints_and_per_token_sigma(batch_tokens, seed):
  batch, tokens = batch_tokens
  latent_rng, noise_rng, sigma_rng = jax.random.split(jax.random.key(seed), 3)
  latents = jax.random.normal(latent_rng, (batch, tokens, 6))
  noise = jax.random.normal(noise_rng, (batch, tokens, 6))
  np.testing.assert_array_equal(flow.interpolate(latents, noise, jnp.zeros(batch)), latents)
  np.testing.assert_array_equal(flow.interpolate(latents, noise, jnp.ones(batch)), noise)
  # Per-token sigma [B, N] against token latents [B, N, D] (packing / Wan2.2-style timesteps).
  sigma = flow.sample_sigma(sigma_rng, (batch, tokens), diffusion_config())
  noisy = flow.interpolate(latents, noise, sigma)
  assert noisy.shape == latents.shape
  expected = (1 - sigma[..., None]) * latents + sigma[..., None] * noise
  np.testing.assert_allclose(noisy, expected, rtol=1e-6, atol=1e-6)


@FAST
@given(sigma=unit, seed=st.integers(0, 1000))
def test_velocity_target_is_the_derivative_of_the_path(sigma, seed):
  latent_rng, noise_rng = jax.random.split(jax.random.key(seed))
  latents = jax.random.normal(latent_rng, (2, 1, 2, 2, 3))
  noise = jax.random.normal(noise_rng, (2, 1, 2, 2, 3))
  path = lambda s: flow.interpolate(latents, noise, s * jnp.ones(2))
  _, derivative = jax.jvp(path, (jnp.float32(sigma),), (jnp.float32(1.0),))
  np.testing.assert_allclose(derivative, flow.velocity_target(latents, noise), rtol=1e-6, atol=1e-6)


def test_interpolate_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same shape"):
    flow.interpolate(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros(2))
  with pytest.raises(ValueError, match="more axes"):
    flow.interpolate(jnp.zeros((2,)), jnp.zeros((2,)), jnp.zeros((2, 3)))


@FAST
@given(shape=st.sampled_from([(1, 3), (2, 2, 3), (3, 1, 2, 2)]), seed=st.integers(0, 1000))
def test_loss_is_zero_for_the_exact_target_and_matches_the_mean(shape, seed):
  pred_rng, target_rng = jax.random.split(jax.random.key(seed))
  target = jax.random.normal(target_rng, shape)
  assert float(flow.loss(target, target)) == 0.0
  np.testing.assert_array_equal(flow.loss(target, target, reduce=False), np.zeros(shape[0]))
  pred = jax.random.normal(pred_rng, shape)
  squared = np.square(np.asarray(pred, np.float64) - np.asarray(target, np.float64))
  np.testing.assert_allclose(flow.loss(pred, target), squared.mean(), rtol=1e-5)
  per_example = squared.reshape(shape[0], -1).mean(axis=1)
  np.testing.assert_allclose(flow.loss(pred, target, reduce=False), per_example, rtol=1e-5)


def test_masked_loss_averages_valid_elements_only_and_ignores_nan_padding():
  pred = jnp.array([[[1.0, 1.0], [5.0, 5.0], [jnp.nan, jnp.nan]],
                    [[2.0, 2.0], [jnp.nan, 0.0], [3.0, 3.0]]])
  target = jnp.zeros_like(pred)
  mask = jnp.array([[[1], [1], [0]], [[1], [0], [0]]], bool)  # [B, N, 1] per-token padding
  # Valid squared errors: example 0 -> 1, 1, 25, 25; example 1 -> 4, 4.
  np.testing.assert_allclose(flow.loss(pred, target, mask), (1 + 1 + 25 + 25 + 4 + 4) / 6, rtol=1e-6)
  np.testing.assert_allclose(flow.loss(pred, target, mask, reduce=False), [13.0, 4.0], rtol=1e-6)
  empty = jnp.zeros((2, 3, 1), bool)
  np.testing.assert_array_equal(flow.loss(pred, target, empty, reduce=False), [0.0, 0.0])
  with pytest.raises(ValueError, match="does not broadcast"):
    flow.loss(pred, target, jnp.ones((3, 3)))


def test_drop_captions_replaces_whole_examples_with_the_null_text():
  text_embeds = jnp.ones((256, 3, 4))
  rng = jax.random.key(0)
  np.testing.assert_array_equal(flow.drop_captions(rng, text_embeds, 0.0), text_embeds)
  np.testing.assert_array_equal(flow.drop_captions(rng, text_embeds, 1.0), jnp.zeros_like(text_embeds))
  dropped = flow.drop_captions(rng, text_embeds, 0.25)
  per_example = jnp.sum(dropped, axis=(1, 2))
  assert set(np.unique(per_example).tolist()) <= {0.0, 12.0}  # all or nothing per caption
  assert 0.15 < float(jnp.mean(per_example == 0)) < 0.35
  null = jnp.full((3, 4), -2.0)
  explicit = flow.drop_captions(rng, text_embeds, 1.0, null_embeds=null)
  np.testing.assert_array_equal(explicit, jnp.broadcast_to(null, text_embeds.shape))
  with pytest.raises(ValueError, match="null_embeds"):
    flow.drop_captions(rng, text_embeds, 0.5, null_embeds=jnp.zeros((5, 4)))
  with pytest.raises(ValueError, match=r"\[B, L, D\]"):
    flow.drop_captions(rng, jnp.ones((3, 4)), 0.5)


@FAST
@given(num_buckets=st.sampled_from([1, 7, 10]), sigma=unit)
def test_sigma_buckets_cover_the_unit_interval(num_buckets, sigma):
  grid = flow.sigma_grid(num_buckets)
  assert grid.shape == (num_buckets,)
  np.testing.assert_array_equal(flow.sigma_bucket(grid, num_buckets), np.arange(num_buckets))
  bucket = int(flow.sigma_bucket(sigma, num_buckets))
  assert 0 <= bucket < num_buckets
  assert bucket / num_buckets <= sigma + 1e-6
  assert sigma < (bucket + 1) / num_buckets or bucket == num_buckets - 1


def test_bucket_sums_add_per_bucket():
  sums, counts = flow.bucket_sums(jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([0.05, 0.95, 0.08, 1.0]), 10)
  expected_sums = np.zeros(10)
  expected_sums[0], expected_sums[9] = 4.0, 6.0
  np.testing.assert_allclose(sums, expected_sums)
  np.testing.assert_allclose(counts, (expected_sums > 0) * 2.0)
  sums, counts = flow.bucket_sums(jnp.array([1.0, jnp.nan, 3.0]), jnp.array([0.05, 0.06, 0.95]), 10,
                                  weights=jnp.array([2.0, 1.0, 0.5]))
  assert float(sums[0]) == 2.0 and float(counts[0]) == 3.0  # the NaN adds its weight, not its value
  assert float(sums[9]) == 1.5 and float(counts[9]) == 0.5


def test_final_shift_takes_over_for_the_last_fraction_of_the_steps():
  config = diffusion_config(shift=5.0, final_shift=1.0, final_shift_fraction=0.25)
  assert flow.final_shift_start(config, 100) == 75
  assert flow.final_shift_start(diffusion_config(shift=5.0), 100) is None  # final_shift = 0: off
  rng = jax.random.key(3)
  early = flow.sample_sigma(rng, (4096,), config, step=jnp.asarray(74), num_steps=100)
  late = flow.sample_sigma(rng, (4096,), config, step=jnp.asarray(75), num_steps=100)
  np.testing.assert_array_equal(early, flow.sample_sigma(rng, (4096,), diffusion_config(shift=5.0)))
  np.testing.assert_array_equal(late, flow.sample_sigma(rng, (4096,), diffusion_config(shift=1.0)))
  assert float(jnp.mean(early > 0.8)) > 0.5 > float(jnp.mean(late > 0.8))
  # Without the trainer's step (e.g. tools drawing sigma outside training) the base shift applies.
  np.testing.assert_array_equal(flow.sample_sigma(rng, (4096,), config), early)
