"""Parity of the JAX Wan2.2 VAE (residual blocks, 2x2 patches, 48 channels) with diffusers' AutoencoderKLWan.

A small random diffusers model of the Wan2.2 kind (`is_residual=True, patch_size=2`, compression 4x16x16)
is saved and loaded back through `wan_vae.load`: encode, decode, tiles and the chunked time loop are
compared with it as the Wan2.1 VAE's are in test_wan_vae.py.
"""

import numpy as np
import pytest
from helpers import from_torch_video, perturb_vae, relative_error, to_torch_video, uniform_video

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sora_jax.encoders import wan_vae, wan_vae_network  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(1)

TOLERANCE = 1e-4  # what the Wan2.1 VAE meets: max abs error relative to the reference's max abs value
Z = 48


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  model = diffusers.AutoencoderKLWan(
      base_dim=16, decoder_base_dim=24, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
      temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
      out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
      latents_mean=rng.normal(0, 0.5, Z).round(4).tolist(),
      latents_std=rng.uniform(0.5, 2.0, Z).round(4).tolist()).eval()
  perturb_vae(model)
  directory = str(tmp_path_factory.mktemp("wan22_vae"))
  model.save_pretrained(directory)
  return model, directory


@pytest.fixture(scope="module")
def vae(reference):
  return wan_vae.load(reference[1])


def _reference_encode(model, video):
  with torch.no_grad():
    latents = from_torch_video(model.encode(to_torch_video(video)).latent_dist.mode())
  mean, std = (np.asarray(model.config[k], np.float32) for k in ("latents_mean", "latents_std"))
  return (latents - mean) / std


def _reference_decode(model, raw_latents):
  with torch.no_grad():
    return from_torch_video(model.decode(to_torch_video(raw_latents)).sample)


def test_the_config_is_wan22(vae):
  assert vae.config.version == "Wan2.2" and vae.spatial_factor == 16 and vae.temporal_factor == 4
  assert vae.latent_channels == Z and vae.latent_shape(9, 32, 48) == (3, 2, 3, Z)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 9, 32, 48), (1, 13, 48, 32), (2, 5, 32, 32)],
                         ids=["1-frame", "9-frames-non-square", "13-frames-portrait", "batch-2"])
def test_encode_matches_diffusers(reference, vae, shape):
  video = uniform_video(*shape, 3)
  latents = vae.encode(video)
  assert latents.shape == (shape[0], *vae.latent_shape(shape[1], shape[2], shape[3]))
  assert relative_error(latents, _reference_encode(reference[0], video)) < TOLERANCE


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (1, 3, 2, 3), (1, 4, 3, 2), (2, 2, 2, 2)],
                         ids=["1-latent", "3-latents", "4-latents-portrait", "batch-2"])
def test_decode_matches_diffusers(reference, vae, shape):
  latents = np.random.default_rng(1).standard_normal((*shape, Z)).astype(np.float32)
  raw = latents * vae.latents_std + vae.latents_mean
  expected = _reference_decode(reference[0], raw)
  assert np.mean(np.abs(expected) < 1) > 0.01, "the reference decode should not be all clipped"
  video = vae.decode(latents)
  assert video.shape == (shape[0], 1 + 4 * (shape[1] - 1), 16 * shape[2], 16 * shape[3], 3)
  assert relative_error(video, expected) < TOLERANCE


def test_chunks_are_causal_and_compile_once(reference):
  vae = wan_vae.load(reference[1])
  clip = uniform_video(1, 17, 32, 32, 3)
  short, long = vae.encode(clip[:, :9]), vae.encode(clip)
  np.testing.assert_allclose(long[:, :3], short, atol=1e-5)
  videos = {frames: vae.decode(long[:, :frames]) for frames in (3, 5)}
  np.testing.assert_allclose(videos[5][:, :9], videos[3], atol=1e-5)
  assert vae.compiled_programs() == {"encode_first": 1, "encode_step": 1, "decode_first": 1, "decode_step": 1}


def test_tiles_match_diffusers_tiles(reference, vae):
  """diffusers tiles the Wan2.2 encoder's input in patch units and blends the decoder's output in patch
  space: 32 / 16 here is 64 / 32 pixels per encoder tile and 32 / 16 pixels per decoder tile."""
  model, directory = reference
  tiled = wan_vae.load(directory, tile_sample_size=32, tile_sample_stride=16)
  video = uniform_video(1, 5, 96, 128, 3, seed=2)
  latents = np.random.default_rng(3).standard_normal((1, 2, 4, 5, Z)).astype(np.float32)
  raw = latents * vae.latents_std + vae.latents_mean
  model.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)
  try:
    expected = (_reference_encode(model, video), _reference_decode(model, raw))
  finally:
    model.disable_tiling()
  flat = (_reference_encode(model, video), _reference_decode(model, raw))
  got = (tiled.encode(video), tiled.decode(latents))
  for what, ours, theirs, untiled in zip(("encode", "decode"), got, expected, flat, strict=True):
    assert np.abs(theirs - untiled).max() > 0, what  # the tiles change diffusers' output
    assert relative_error(ours, theirs) < TOLERANCE, what


def test_patchify_is_diffusers_and_unpatchify_inverts_it():
  from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

  x = np.random.default_rng(0).standard_normal((1, 2, 4, 6, 3)).astype(np.float32)
  ours = np.asarray(wan_vae_network.patchify(x, 2))
  theirs = from_torch_video(patchify(to_torch_video(x), patch_size=2))
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(np.asarray(wan_vae_network.unpatchify(ours, 2)), x)


def test_shortcuts_are_diffusers():
  from diffusers.models.autoencoders.autoencoder_kl_wan import AvgDown3D, DupUp3D

  x = np.random.default_rng(0).standard_normal((1, 3, 4, 6, 8)).astype(np.float32)
  down = np.asarray(wan_vae_network.avg_down(x, 16, 2, 2))
  expected = from_torch_video(AvgDown3D(8, 16, 2, 2)(to_torch_video(x)))
  np.testing.assert_allclose(down, expected, rtol=1e-6, atol=1e-6)
  for first in (False, True):
    up = np.asarray(wan_vae_network.dup_up(x, 4, 2, 2, first))
    expected = from_torch_video(DupUp3D(8, 4, 2, 2)(to_torch_video(x), first_chunk=first))
    np.testing.assert_array_equal(up, expected)


def test_config_checks_name_the_field():
  base = {"_class_name": "AutoencoderKLWan", "z_dim": 4, "latents_mean": [0.0] * 4,
          "latents_std": [1.0] * 4, "is_residual": True, "patch_size": 2, "scale_factor_spatial": 16}
  assert wan_vae.WanVAEConfig.from_dict({**base, "in_channels": 12, "out_channels": 12}).spatial_factor == 16
  with pytest.raises(wan_vae.WanVAEError, match="in_channels=3, out_channels=3 with patch_size=2; expected"):
    wan_vae.WanVAEConfig.from_dict(base)
  with pytest.raises(wan_vae.WanVAEError, match="scale_factor_spatial=8 but .* downsample by 16"):
    wan_vae.WanVAEConfig.from_dict({**base, "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 8})
