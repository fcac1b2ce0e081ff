"""Pixel VAE: exact space-to-depth inversion (numpy and jax), channel layout, and get_vae errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.config import load
from sora_jax.encoders import vae as vae_lib


def test_encode_decode_is_exact_numpy():
  vae = vae_lib.PixelVAE(2)
  pixels = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 8, 6, 3)).astype(np.float32)
  latents = vae.encode(pixels)
  assert latents.shape == (2, 3, 4, 3, 12) and latents.dtype == np.float32
  np.testing.assert_array_equal(vae.decode(latents), pixels)


def test_encode_decode_is_exact_under_jit():
  vae = vae_lib.PixelVAE(4)
  pixels = jax.random.uniform(jax.random.key(0), (1, 2, 8, 16, 3), minval=-1, maxval=1)
  latents = jax.jit(vae.encode)(pixels)
  assert latents.shape == (1, 2, 2, 4, 48)
  np.testing.assert_array_equal(np.asarray(jax.jit(vae.decode)(latents)), np.asarray(pixels))
  np.testing.assert_array_equal(np.asarray(latents), vae.encode(np.asarray(pixels)))
  assert isinstance(vae.decode(jnp.zeros((1, 1, 1, 1, 48))), jax.Array)


def test_channel_layout():
  vae = vae_lib.PixelVAE(2)
  pixels = np.zeros((1, 1, 2, 2, 3), np.float32)
  pixels[0, 0, 1, 0, 2] = 1.0  # dy=1, dx=0, blue
  latents = vae.encode(pixels)
  assert latents.shape == (1, 1, 1, 1, 12)
  assert np.flatnonzero(latents) == [(1 * 2 + 0) * 3 + 2]


def test_bad_shapes_are_named():
  vae = vae_lib.PixelVAE(2)
  with pytest.raises(vae_lib.VAEError, match=r"shape \(1, 1, 3, 4, 3\)"):
    vae.encode(np.zeros((1, 1, 3, 4, 3)))
  with pytest.raises(vae_lib.VAEError, match=r"expected \[B, F, H', W', 12\]"):
    vae.decode(np.zeros((1, 1, 2, 2, 16)))


def test_get_vae_from_configs():
  tiny = load("configs/tiny.py")
  vae = vae_lib.get_vae(tiny)
  assert vae.latent_channels == tiny.model.in_channels == 12
  assert vae.latent_shape(8, 32, 32) == (8, 16, 16, 12)
  with pytest.raises(vae_lib.VAEUnavailable, match="data.vae='wan' needs the Wan VAE weights"):
    vae_lib.get_vae(load("configs/wan_1_3b.py"))
  missing = load("configs/wan_1_3b.py")
  missing.data.pretrained = "/nonexistent/wan"
  with pytest.raises(ValueError, match="data.pretrained='/nonexistent/wan' is not a directory"):
    vae_lib.get_vae(missing)
  tiny.data.vae_temporal_factor = 4
  with pytest.raises(vae_lib.VAEError, match="vae_temporal_factor=4"):
    vae_lib.get_vae(tiny)
