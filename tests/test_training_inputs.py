"""What the train step feeds the model (sora_jax/diffusion/training_inputs.py), without a model."""

import jax
import jax.numpy as jnp
import numpy as np
from sora_jax.configs import tiny

from sora_jax.diffusion import training_inputs


def _bucketed_batch(batch=4, frames=4):
  rng = np.random.default_rng(0)
  return {"latents": jnp.asarray(rng.normal(size=(batch, frames, 4, 4, 12)), jnp.float32),
          "text_embeds": jnp.asarray(rng.normal(size=(batch, 5, 64)), jnp.float32)}


def test_bucketed_inputs_give_one_sigma_per_clip_and_given_frames_change_nothing_else():
  config = tiny.get_config()
  batch = _bucketed_batch()
  plain = training_inputs.bucketed(batch, jax.random.key(3), jnp.asarray(7), config)
  assert plain["sigma"].shape == (4,) and "loss_mask" not in plain
  assert float(plain["num_tokens"]) == 4 * 4 * 2 * 2  # clips x (1, 2, 2)-patch tokens
  assert plain["noise"].shape == batch["latents"].shape
  again = training_inputs.bucketed(batch, jax.random.key(3), jnp.asarray(7), config)
  np.testing.assert_array_equal(plain["noise"], again["noise"])

  config.train.condition_prob, config.train.condition_frames = 1.0, (2,)
  given = training_inputs.bucketed(batch, jax.random.key(3), jnp.asarray(7), config)
  for key in ("noise", "sigma", "text_embeds"):
    np.testing.assert_array_equal(given[key], plain[key])
  cells = np.broadcast_to(np.asarray(given["cell_sigma"]), (4, 4, 1, 1, 1))[..., 0, 0, 0]
  np.testing.assert_array_equal(cells[:, :2], 0.0)
  np.testing.assert_array_equal(cells[:, 2:], np.repeat(np.asarray(plain["sigma"])[:, None], 2, 1))
  mask = np.broadcast_to(np.asarray(given["loss_mask"]), (4, 4, 1, 1, 1))[..., 0, 0, 0]
  assert not mask[:, :2].any() and mask[:, 2:].all()
  assert given["token_sigma"].shape == (4, 16) and float(given["num_tokens"]) == 4 * 2 * 4
  np.testing.assert_array_equal(given["token_sigma"][:, :8], 0.0)


def test_packed_inputs_spread_each_clips_sigma_over_its_tokens():
  config = tiny.get_config()
  segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  batch = {
      "latents": jnp.ones((2, 6, 48), jnp.float32),
      "segment_ids": segment_ids,
      "segment_grid": jnp.asarray([[[1, 1, 3], [1, 1, 2]], [[1, 2, 3], [0, 0, 0]]], jnp.int32),
      "loss_mask": (segment_ids > 0).astype(jnp.float32),
      "text_embeds": jnp.ones((2, 2 * 5, 64), jnp.float32),
  }
  inputs = training_inputs.packed(batch, jax.random.key(0), jnp.asarray(0), config)
  sigma, token_sigma = np.asarray(inputs["sigma"]), np.asarray(inputs["token_sigma"])
  assert sigma.shape == (2, 2) and token_sigma.shape == (2, 6)
  np.testing.assert_array_equal(token_sigma[0, :3], sigma[0, 0])
  np.testing.assert_array_equal(token_sigma[0, 3:5], sigma[0, 1])
  np.testing.assert_array_equal(token_sigma[1], sigma[1, 0])
  np.testing.assert_array_equal(inputs["clip_weights"], [[1.0, 1.0], [1.0, 0.0]])
  assert float(inputs["num_tokens"]) == 11


def test_packed_clip_losses_are_each_clips_mean_over_its_valid_tokens():
  rng = np.random.default_rng(1)
  velocity, target = rng.normal(size=(1, 6, 3)), rng.normal(size=(1, 6, 3))
  segment_ids = np.asarray([[1, 1, 2, 2, 2, 0]])
  losses = training_inputs.packed_clip_losses(
      jnp.asarray(velocity), jnp.asarray(target), jnp.asarray(segment_ids > 0), jnp.asarray(segment_ids), 3)
  error = np.mean((velocity - target) ** 2, axis=-1)[0]
  np.testing.assert_allclose(losses[0], [error[:2].mean(), error[2:5].mean(), 0.0], rtol=1e-6)


def test_losses_weigh_each_packed_clip_once_and_cover_what_the_mask_covers():
  rng = np.random.default_rng(2)
  velocity, target = jnp.asarray(rng.normal(size=(1, 6, 3))), jnp.asarray(rng.normal(size=(1, 6, 3)))
  segment_ids = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  packed = {"segment_ids": segment_ids, "loss_mask": segment_ids > 0}
  inputs = {"sigma": jnp.zeros((1, 3)), "clip_weights": jnp.asarray([[1.0, 1.0, 0.0]])}
  loss, per_clip = training_inputs.losses(velocity, target, packed, inputs)
  error = np.mean((np.asarray(velocity) - np.asarray(target)) ** 2, axis=-1)[0]
  np.testing.assert_allclose(per_clip[0], [error[:2].mean(), error[2:5].mean(), 0.0], rtol=1e-6)
  # The mean of the two clips' losses, not of their five tokens.
  np.testing.assert_allclose(loss, (error[:2].mean() + error[2:5].mean()) / 2, rtol=1e-6)

  clips_v, clips_t = velocity.reshape(2, 3, 3), target.reshape(2, 3, 3)
  loss, per_clip = training_inputs.losses(clips_v, clips_t, {}, {})
  squared = (np.asarray(clips_v) - np.asarray(clips_t)) ** 2
  np.testing.assert_allclose(per_clip, squared.reshape(2, -1).mean(-1), rtol=1e-6)
  np.testing.assert_allclose(loss, squared.mean(), rtol=1e-6)
  mask = jnp.asarray([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])[..., None] * jnp.ones((2, 3, 3))
  loss, per_clip = training_inputs.losses(clips_v, clips_t, {}, {"loss_mask": mask})
  masked, covered = squared * np.asarray(mask), np.asarray(mask)
  np.testing.assert_allclose(per_clip, masked.sum((1, 2)) / covered.sum((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(loss, masked.sum() / covered.sum(), rtol=1e-6)
