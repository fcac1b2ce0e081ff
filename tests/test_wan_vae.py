"""Parity of the JAX Wan2.1 VAE (sora_jax/encoders/wan_vae*.py) with diffusers' AutoencoderKLWan.

A small random diffusers model (weights, norm gammas and biases moved off their init) is saved and loaded
back through `wan_vae.load`; encode / decode / tiling / the chunked time loop are compared with it.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import from_torch_video, perturb_vae, relative_error, to_torch_video, uniform_video

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sora_jax.encoders import wan_vae, wan_vae_convs  # noqa: E402
from sora_jax.files import safetensors_io  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(1)

TOLERANCE = 1e-4  # max abs error relative to the reference's max abs value


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(diffusers model, directory it is saved in): base_dim 16, so convs of 16 and 32 channels both run."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     attn_scales=[], temperal_downsample=[False, True, True]).eval()
  perturb_vae(model)
  directory = str(tmp_path_factory.mktemp("wan_vae"))
  model.save_pretrained(directory)
  return model, directory


@pytest.fixture(scope="module")
def vae(reference):
  return wan_vae.load(reference[1])


def _reference_encode(model, video, normalize=True):
  with torch.no_grad():
    latents = from_torch_video(model.encode(to_torch_video(video)).latent_dist.mode())
  if normalize:
    mean, std = (np.asarray(model.config[k], np.float32) for k in ("latents_mean", "latents_std"))
    latents = (latents - mean) / std
  return latents


def _reference_decode(model, raw_latents):
  with torch.no_grad():
    return from_torch_video(model.decode(to_torch_video(raw_latents)).sample)


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("shape,compare_frames", [
    ((1, 1, 16, 24), 1), ((1, 9, 16, 24), 9), ((1, 17, 16, 24), 17), ((1, 9, 16, 32), 9),
    ((2, 5, 16, 24), 5), ((1, 11, 16, 24), 9),
], ids=["1-frame", "9-frames", "17-frames", "non-square", "batch-2", "11-frames-cropped-to-9"])
def test_encode_matches_diffusers(reference, vae, shape, compare_frames):
  model, _ = reference
  video = uniform_video(*shape, 3)
  latents = vae.encode(video)
  expected = _reference_encode(model, video[:, :compare_frames])
  assert latents.dtype == np.float32
  assert latents.shape == (shape[0], *vae.latent_shape(shape[1], shape[2], shape[3]))
  assert relative_error(latents, expected) < TOLERANCE


@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (1, 3, 2, 3), (1, 5, 2, 3), (1, 3, 2, 4), (2, 2, 2, 3)],
                         ids=["1-latent", "3-latents", "5-latents", "non-square", "batch-2"])
def test_decode_matches_diffusers(reference, vae, shape):
  model, _ = reference
  latents = np.random.default_rng(1).standard_normal((*shape, 16)).astype(np.float32)
  raw = latents * vae.latents_std + vae.latents_mean
  expected = _reference_decode(model, raw)
  assert np.mean(np.abs(expected) < 1) > 0.01, "the reference decode should not be all clipped"
  video = vae.decode(latents)
  assert video.shape == (shape[0], 1 + 4 * (shape[1] - 1), 8 * shape[2], 8 * shape[3], 3)
  assert relative_error(video, expected) < TOLERANCE
  assert np.array_equal(vae.decode(raw, normalize=False), video)


def test_a_batch_of_the_local_device_count_runs_data_parallel(vae):
  import jax

  count = jax.local_device_count()
  assert count == 8  # conftest's fake devices: the batch below is split 8 ways
  video = uniform_video(count, 5, 16, 16, 3, seed=7)
  latents = vae.encode(video)
  params, put = vae._placed(count)
  assert put(video[:, :1]).sharding.num_devices == count
  assert len(jax.tree.leaves(params)[0].sharding.device_set) == count
  for index in (0, count - 1):
    np.testing.assert_allclose(latents[index], vae.encode(video[index:index + 1])[0], rtol=0, atol=1e-5)
  decoded = vae.decode(latents)
  np.testing.assert_allclose(decoded[-1], vae.decode(latents[-1:])[0], rtol=0, atol=1e-5)


def test_normalize_false_gives_the_raw_posterior_mean(reference, vae):
  video = uniform_video(1, 5, 16, 24, 3)
  raw = vae.encode(video, normalize=False)
  assert relative_error(raw, _reference_encode(reference[0], video, normalize=False)) < TOLERANCE
  np.testing.assert_allclose(vae.encode(video), (raw - vae.latents_mean) / vae.latents_std, rtol=1e-6)
  np.testing.assert_array_equal(vae.encode(jnp.asarray(video), normalize=False), raw)  # jax input too


def test_conv_methods_agree():
  """Every way `conv3x3x3` can compute (CPU picks some, other backends "direct") gives the same conv."""
  rng = np.random.default_rng(0)
  kernel = (rng.standard_normal((3, 3, 3, 24, 8)) / 25).astype(np.float32)
  for frames in (1, 2, 4):
    inputs = rng.standard_normal((2, frames + 2, 8, 6, 24)).astype(np.float32)
    direct = np.asarray(wan_vae_convs.conv3x3x3(inputs, kernel, "direct"))
    methods = ["stacked", "taps", "winograd"] if frames in (2, 4) else ["stacked", "taps"]
    for method in methods:
      got = np.asarray(wan_vae_convs.conv3x3x3(inputs, kernel, method))
      assert relative_error(got, direct) < 1e-5, (frames, method)


# ------------------------------------------------------------------------------- chunked time loop


def test_chunks_are_causal_and_compile_once(reference):
  vae = wan_vae.load(reference[1])  # fresh: counts start at zero
  clip = uniform_video(1, 33, 16, 24, 3)
  latents = {frames: vae.encode(clip[:, :frames]) for frames in (9, 17, 33)}
  # A latent frame depends only on the frames up to it: a longer clip's prefix encodes the same.
  np.testing.assert_allclose(latents[17][:, :3], latents[9], atol=1e-6)
  np.testing.assert_allclose(latents[33][:, :5], latents[17], atol=1e-6)
  videos = {frames: vae.decode(latents[33][:, :frames]) for frames in (3, 5, 9)}
  np.testing.assert_allclose(videos[5][:, :9], videos[3], atol=1e-6)
  np.testing.assert_allclose(videos[9][:, :17], videos[5], atol=1e-6)
  assert vae.compiled_programs() == {"encode_first": 1, "encode_step": 1, "decode_first": 1, "decode_step": 1}
  assert vae._encode_step._cache_size() == 1 and vae._decode_step._cache_size() == 1


# ------------------------------------------------------------------------------------------- tiling


def test_tiles_match_diffusers_tiles(reference, vae):
  model, directory = reference
  tiled = wan_vae.load(directory, tile_sample_size=32, tile_sample_stride=16)  # tiles 48x64 frames by default
  video = uniform_video(1, 5, 48, 64, 3, seed=2)
  latents = np.random.default_rng(3).standard_normal((1, 2, 6, 8, 16)).astype(np.float32)
  raw = latents * vae.latents_std + vae.latents_mean
  model.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)
  try:
    expected_tiled = (_reference_encode(model, video), _reference_decode(model, raw))
  finally:
    model.disable_tiling()
  expected_untiled = (_reference_encode(model, video), _reference_decode(model, raw))
  got_tiled = (tiled.encode(video), tiled.decode(latents))
  got_untiled = (vae.encode(video), vae.decode(latents))
  assert np.array_equal(tiled.encode(video, tile=True), got_tiled[0])
  for what, got, expected, got_flat, expected_flat in zip(
      ("encode", "decode"), got_tiled, expected_tiled, got_untiled, expected_untiled, strict=True):
    assert relative_error(got, expected) < TOLERANCE, what
    assert relative_error(got_flat, expected_flat) < TOLERANCE, what
    # Tiling changes the output; ours by no more than it changes diffusers'.
    seam = float(np.abs(expected - expected_flat).max())
    assert seam > 0, what
    assert float(np.abs(got - got_flat).max()) <= 1.5 * seam + 1e-5, what


def test_default_tiling_is_diffusers_size(vae):
  assert (vae.tile_sample_size, vae.tile_sample_stride) == ((256, 256), (192, 192))
  assert vae._use_tiles(None, 256, 256, 1) is False and vae._use_tiles(None, 264, 256, 1) is True
  assert vae._use_tiles(None, 32, 33, 8) is True and vae._use_tiles(False, 264, 256, 1) is False
  with pytest.raises(wan_vae.WanVAEError, match="multiples of 8"):
    wan_vae.WanVAE(vae.config, vae.params, tile_sample_size=36)


# ------------------------------------------------------------------------------ frames and shapes


def test_frame_policy(vae):
  assert vae.latent_shape(11, 16, 24) == (3, 2, 3, 16)
  assert vae.latent_shape(11, 16, 24, frame_policy="pad") == (4, 2, 3, 16)
  assert vae.latent_shape(13, 16, 24, frame_policy="error") == (4, 2, 3, 16)
  video = uniform_video(1, 11, 16, 24, 3)
  np.testing.assert_array_equal(vae.encode(video), vae.encode(video[:, :9]))
  padded = np.concatenate([video, video[:, -1:], video[:, -1:]], axis=1)
  np.testing.assert_array_equal(vae.encode(video, frame_policy="pad"), vae.encode(padded))
  with pytest.raises(wan_vae.WanVAEError, match="11 frames"):
    vae.encode(video, frame_policy="error")
  with pytest.raises(wan_vae.WanVAEError, match="frame_policy"):
    vae.encode(video, frame_policy="loop")


@pytest.mark.parametrize("shape", [(1, 9, 16, 24), (1, 9, 16, 24, 4), (1, 9, 20, 24, 3), (1, 0, 16, 24, 3)],
                         ids=["rank-4", "4-channels", "height-20", "no-frames"])
def test_encode_rejects_bad_video(vae, shape):
  with pytest.raises(wan_vae.WanVAEError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
    vae.encode(np.zeros(shape, np.float32))


def test_decode_rejects_bad_latents(vae):
  with pytest.raises(wan_vae.WanVAEError, match=r"\(1, 3, 2, 3, 8\)"):
    vae.decode(np.zeros((1, 3, 2, 3, 8), np.float32))
  with pytest.raises(wan_vae.WanVAEError, match=r"\(3, 2, 3, 16\)"):
    vae.decode(np.zeros((3, 2, 3, 16), np.float32))


def test_bfloat16_is_close(reference, vae):
  half = wan_vae.load(reference[1], dtype="bfloat16")
  assert half.params["encoder.conv_in.weight"].dtype == "bfloat16"
  assert half.params["encoder.norm_out.gamma"].dtype == np.float32
  video = uniform_video(1, 5, 16, 24, 3)
  latents = vae.encode(video)
  assert half.encode(video).dtype == np.float32
  assert relative_error(half.encode(video), latents) < 0.05
  assert relative_error(half.decode(latents), vae.decode(latents)) < 0.1


# ---------------------------------------------------------------------------------- config, loading


def test_config_refuses_attention_scales_and_inconsistent_fields():
  with pytest.raises(wan_vae.WanVAEError, match="attn_scales"):
    wan_vae.WanVAEConfig.from_dict({"attn_scales": [0.5]})
  with pytest.raises(wan_vae.WanVAEError, match="latents_mean"):
    wan_vae.WanVAEConfig.from_dict({"z_dim": 4})
  with pytest.raises(wan_vae.WanVAEError, match="in_channels=3, out_channels=3 with patch_size=2"):
    wan_vae.WanVAEConfig.from_dict({"patch_size": 2})
  assert wan_vae.WanVAEConfig.from_dict({}).version == "Wan2.1"


def _copy_checkpoint(source, target, *, drop=None, reshape=None, max_shard_bytes=None):
  """Rewrites `source`'s checkpoint into `target` (sharded with an index when max_shard_bytes is set)."""
  os.makedirs(target, exist_ok=True)
  with open(os.path.join(source, "config.json")) as f, open(os.path.join(target, "config.json"), "w") as g:
    g.write(f.read())
  reader = safetensors_io.Reader(source)
  specs = [spec for name, spec in reader.specs().items() if name != drop]
  if reshape:
    name, shape = reshape
    specs = [safetensors_io.TensorSpec(name, shape, s.dtype) if s.name == name else s for s in specs]
  load = lambda name: (np.zeros(reshape[1], reader.specs()[name].dtype) if reshape and name == reshape[0]
                       else reader.read(name))
  safetensors_io.write_sharded(target, specs, load, max_shard_bytes=max_shard_bytes or 10**12)


def test_load_sharded_checkpoint(reference, vae, tmp_path):
  _copy_checkpoint(reference[1], str(tmp_path), max_shard_bytes=100_000)
  assert os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
  sharded = wan_vae.load(str(tmp_path))
  assert sharded.params.keys() == vae.params.keys()
  for name, value in vae.params.items():
    np.testing.assert_array_equal(sharded.params[name], value)


def test_load_errors(reference, tmp_path):
  directory = reference[1]
  with pytest.raises(wan_vae.WanVAEError, match="does not exist"):
    wan_vae.load(str(tmp_path / "absent"))
  with pytest.raises(wan_vae.WanVAEError, match="config.json"):
    wan_vae.load(str(tmp_path))
  with open(os.path.join(directory, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  with pytest.raises(wan_vae.WanVAEError, match=f"{tmp_path}.*diffusion_pytorch_model"):
    wan_vae.load(str(tmp_path))
  missing = str(tmp_path / "missing")
  _copy_checkpoint(directory, missing, drop="decoder.up_blocks.1.upsamplers.0.time_conv.weight")
  with pytest.raises(wan_vae.WanVAEError,
                     match=rf"{missing} lacks 1 tensor.*time_conv.weight \[64, 32, 3, 1, 1\]"):
    wan_vae.load(missing)
  wrong = str(tmp_path / "wrong")
  _copy_checkpoint(directory, wrong, reshape=("decoder.conv_out.bias", (4,)))
  with pytest.raises(wan_vae.WanVAEError, match=r"decoder.conv_out.bias.*\[4\]; expected \[3\]"):
    wan_vae.load(wrong)
  with pytest.raises(wan_vae.WanVAEError, match="dtype"):
    wan_vae.load(directory, dtype="float16")


# ----------------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_model_matches_diffusers(tmp_path):
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan().eval()  # the Wan2.1 architecture, random weights
  perturb_vae(model)
  model.save_pretrained(str(tmp_path))
  vae = wan_vae.load(str(tmp_path))
  assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (16, 8, 4)
  video = uniform_video(1, 5, 64, 64, 3)
  latents = vae.encode(video)
  assert relative_error(latents, _reference_encode(model, video)) < TOLERANCE
  raw = latents * vae.latents_std + vae.latents_mean
  assert relative_error(vae.decode(latents), _reference_decode(model, raw)) < TOLERANCE


def test_the_export_entry_point_loads_the_vae(reference):
  from sora_jax.export import diffusers as hf

  model, directory = reference
  vae = hf.load_vae(directory)
  video = uniform_video(1, 5, 16, 24, 3, seed=11)
  latents = vae.encode(video)
  assert latents.shape == (1, 2, 2, 3, 16)
  assert relative_error(latents, _reference_encode(model, video)) < TOLERANCE
  assert vae.decode(latents).shape == (1, 5, 16, 24, 3)
