"""Wan2.2 TI2V on a random-weight pipeline directory of its kind (Wan2.2 VAE, 48-channel transformer):
`sample --image` gives the latents diffusers' WanImageToVideoPipeline(expand_timesteps=True) gives from
the same image, noise and prompt embeddings, and `sample --pretrained --image` runs on it."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from pipeline_helpers import make_pipeline  # noqa: E402

from sora_jax.encoders import text_encoder as text_encoder_lib  # noqa: E402
from sora_jax.encoders import vae as vae_lib  # noqa: E402
from sora_jax.evaluation import sampling  # noqa: E402
from sora_jax.export import pretrained  # noqa: E402
from sora_jax.model.dit import DiT  # noqa: E402
from sora_jax.offline import conversion  # noqa: E402

pytestmark = pytest.mark.torch
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red ball rolls across a green field", "waves break on a sandy beach at dusk",
            "a small boat drifts on a calm blue lake", "snow falls over a quiet dark forest"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  return make_pipeline(str(tmp_path_factory.mktemp("wan22_pipeline")), CAPTIONS, wan22=True)


def test_image_to_video_matches_diffusers_expand_timesteps(pipeline):
  config = pretrained.pipeline_config(pipeline)
  assert config.model.in_channels == 48 and config.data.vae_spatial_factor == 16
  config.data.text_len = 16
  params = pretrained.load_params(pipeline, config.model)
  settings = sampling.SampleSettings.from_config(config, num_frames=9, height=32, width=64, steps=4,
                                                 guidance_scale=3.0, seed=0, encode_empty_negative=True)
  mesh = conversion.local_mesh()
  sampler = sampling.Sampler(DiT(config.model), config, settings, mesh)
  assert sampler.shape == (3, 2, 4, 48)
  vae = vae_lib.get_vae(config)
  cond, uncond = sampling.encode_prompts(text_encoder_lib.get_text_encoder(config), [CAPTIONS[1]], "",
                                         encode_empty_negative=True)
  image = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
  given = sampling.given_latents(vae, image[None])
  noise = np.random.default_rng(1).standard_normal((1, *sampler.shape)).astype(np.float32)
  ours = sampler.latents(params, cond, uncond, given_latents=given, noise=noise)[0]

  from PIL import Image

  as_torch = lambda array: torch.from_numpy(np.ascontiguousarray(array))
  reference = diffusers.WanImageToVideoPipeline(
      tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None,
      vae=diffusers.AutoencoderKLWan.from_pretrained(os.path.join(pipeline, "vae")),
      transformer=diffusers.WanTransformer3DModel.from_pretrained(os.path.join(pipeline, "transformer")),
      scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=settings.shift, num_train_timesteps=1000),
      expand_timesteps=True)
  with torch.no_grad():
    theirs = reference(image=Image.fromarray(image), prompt_embeds=as_torch(cond),
                       negative_prompt_embeds=as_torch(uncond), height=32, width=64, num_frames=9,
                       num_inference_steps=4, guidance_scale=3.0, latents=as_torch(np.moveaxis(noise, -1, 1)),
                       output_type="latent").frames
  theirs = np.moveaxis(theirs[0].numpy(), 0, -1)
  np.testing.assert_allclose(ours[0], given[0], rtol=0, atol=0)  # the given frame comes back as given
  error = np.abs(ours - theirs).max() / np.abs(theirs).max()
  print(f"TI2V latents max relative error {error:.2e}")
  assert error < 1e-4, error


def test_sample_an_image_to_video_from_the_pipeline(pipeline, tmp_path):
  image = str(tmp_path / "first.png")
  from PIL import Image

  Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
  out = str(tmp_path / "i2v.mp4")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "sora_jax.sample", f"--pretrained={pipeline}", "--prompt=a boat",
             "--num_frames=9", "--height=32", "--width=32", "--steps=2", f"--image={image}", f"--out={out}"]
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "9 frames of 32x32" in done.stdout and "starting from" in done.stdout
