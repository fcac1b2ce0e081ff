"""Wan2.2 A14B's two experts on a random-weight pipeline directory of its kind (transformer/ +
transformer_2/, boundary_ratio in model_index.json): sampling equals diffusers' WanPipeline with both
experts, and import -> export gives back the same tensors in diffusers' layout."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from pipeline_helpers import make_pipeline  # noqa: E402
from sora_jax.configs import base  # noqa: E402

from sora_jax.encoders import text_encoder as text_encoder_lib  # noqa: E402
from sora_jax.evaluation import sampling  # noqa: E402
from sora_jax.export import pretrained  # noqa: E402
from sora_jax.files import layout, safetensors_io  # noqa: E402
from sora_jax.model.dit import DiT  # noqa: E402
from sora_jax.offline import conversion, pipeline_export  # noqa: E402
from sora_jax.train import run_weights  # noqa: E402

pytestmark = pytest.mark.torch
CAPTIONS = ["a red ball rolls across a green field", "waves break on a sandy beach at dusk",
            "a small boat drifts on a calm blue lake", "snow falls over a quiet dark forest"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  return make_pipeline(str(tmp_path_factory.mktemp("a14b_pipeline")), CAPTIONS, experts=True)


def test_two_expert_sampling_matches_diffusers_wan_pipeline(pipeline):
  config = pretrained.pipeline_config(pipeline)
  assert config.model.experts == 2 and config.diffusion.boundary_ratio == 0.875
  assert (config.diffusion.guidance_scale, config.diffusion.guidance_scale_2) == (4.0, 3.0)
  config.data.text_len = 16
  params = pretrained.load_params(pipeline, config.model)
  assert set(params) == {"high", "low"}
  settings = sampling.SampleSettings.from_config(config, num_frames=5, height=32, width=32, steps=6,
                                                 seed=0, encode_empty_negative=True)
  sampler = sampling.Sampler(DiT(config.model), config, settings, conversion.local_mesh())
  cond, uncond = sampling.encode_prompts(text_encoder_lib.get_text_encoder(config), [CAPTIONS[2]], "",
                                         encode_empty_negative=True)
  noise = np.random.default_rng(1).standard_normal((1, *sampler.shape)).astype(np.float32)
  ours = sampler.latents(params, cond, uncond, noise=noise)[0]
  # Only the high-noise expert, for contrast: the switch must change the result.
  only_high = sampler.latents({"high": params["high"], "low": params["high"]}, cond, uncond, noise=noise)[0]

  as_torch = lambda array: torch.from_numpy(np.ascontiguousarray(array))
  scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=settings.shift, num_train_timesteps=1000)
  scheduler.set_timesteps(6)
  switch = [float(t) >= 875 for t in scheduler.timesteps]
  assert any(switch) and not all(switch)  # the run crosses the boundary
  load = lambda name: diffusers.WanTransformer3DModel.from_pretrained(os.path.join(pipeline, name))
  reference = diffusers.WanPipeline(
      tokenizer=None, text_encoder=None,
      vae=diffusers.AutoencoderKLWan.from_pretrained(os.path.join(pipeline, "vae")),
      transformer=load("transformer"), transformer_2=load("transformer_2"), boundary_ratio=0.875,
      scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=settings.shift, num_train_timesteps=1000))
  with torch.no_grad():
    theirs = reference(prompt_embeds=as_torch(cond), negative_prompt_embeds=as_torch(uncond), height=32,
                       width=32, num_frames=5, num_inference_steps=6, guidance_scale=4.0,
                       guidance_scale_2=3.0, latents=as_torch(np.moveaxis(noise, -1, 1)),
                       output_type="latent").frames
  theirs = np.moveaxis(theirs[0].numpy(), 0, -1)
  error = np.abs(ours - theirs).max() / np.abs(theirs).max()
  print(f"A14B two-expert latents max relative error {error:.2e}")
  assert error < 1e-4, error
  assert np.abs(only_high - theirs).max() / np.abs(theirs).max() > 100 * max(error, 1e-6)


def _tensors(directory):
  reader = safetensors_io.Reader(directory, prefix=layout.DIFFUSERS_WEIGHTS)
  return {name: reader.read(name) for name in reader.specs()}


def test_import_then_export_gives_back_both_experts_exactly(pipeline, tmp_path):
  workdir = str(tmp_path / "imported")
  config = conversion.import_weights(pipeline, "diffusers", workdir, base.get_config())
  assert config.model.experts == 2 and config.diffusion.boundary_ratio == 0.875
  assert run_weights.saved_weight_sets(workdir, 0) == ["raw", "ema_0.999"]
  out = str(tmp_path / "exported")
  result = conversion.export_checkpoint(workdir, out, fmt="diffusers", ema=0.999)
  assert sorted(os.listdir(out)) == ["transformer", "transformer_2"]
  for name in ("transformer", "transformer_2"):
    source, exported = _tensors(os.path.join(pipeline, name)), _tensors(os.path.join(out, name))
    assert source.keys() == exported.keys()
    for key, value in source.items():
      np.testing.assert_array_equal(exported[key], value, err_msg=f"{name}/{key}")
  assert result.num_tensors == 2 * len(source)
  # The original Wan2.2 layout: one directory per expert.
  wan_out = str(tmp_path / "wan")
  conversion.export_checkpoint(workdir, wan_out, fmt="wan")
  assert sorted(os.listdir(wan_out)) == ["high_noise_model", "low_noise_model"]
  reread = str(tmp_path / "reimported")
  conversion.import_weights(wan_out, "wan", reread, base.get_config())
  again = run_weights.restore_weights(reread, 0, run_weights.saved_config(reread, 0), conversion.local_mesh(),
                                      ["raw"])["raw"]
  first = run_weights.restore_weights(workdir, 0, config, conversion.local_mesh(), ["raw"])["raw"]
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_pipeline_export_loads_in_diffusers_with_both_experts(pipeline, tmp_path):
  workdir = str(tmp_path / "imported")
  config = base.get_config()
  config.data.update(vae="wan", text_encoder="umt5", pretrained=pipeline)
  conversion.import_weights(pipeline, "diffusers", workdir, config)
  out = str(tmp_path / "pipeline_out")
  pipeline_export.export_pipeline(workdir, out)
  index = json.loads(open(os.path.join(out, "model_index.json")).read())
  assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
  loaded = diffusers.WanPipeline.from_pretrained(out)
  assert loaded.config.boundary_ratio == 0.875 and loaded.transformer_2 is not None
  source = diffusers.WanTransformer3DModel.from_pretrained(os.path.join(pipeline, "transformer_2"))
  for (key, ours), theirs in zip(loaded.transformer_2.state_dict().items(), source.state_dict().values(),
                                 strict=True):
    assert torch.equal(ours, theirs), key


def test_a_lone_low_noise_expert_is_one_clear_error(pipeline, tmp_path):
  lone = tmp_path / "lone"
  lone.mkdir()
  os.symlink(os.path.join(pipeline, "transformer_2"), lone / "transformer_2")
  with pytest.raises(layout.PretrainedError, match="has transformer_2/ but no transformer/config.json"):
    pretrained.read_source(str(lone))
