"""Tests of `python -m sora_jax.sample` and the prompt -> video path it runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from eval_helpers import eval_config, make_workdir

from sora_jax.encoders import text_encoder as text_encoder_lib
from sora_jax.encoders import tokenizer as tokenizer_lib
from sora_jax.encoders import vae as vae_lib
from sora_jax.evaluation import media, sampling
from sora_jax.model.dit import DiT
from sora_jax.offline import conversion as convert
from sora_jax.offline import synthetic
from sora_jax.train import run_weights as weights_lib

PROMPTS = ["a red circle moves left on a blue background", "a white square moves up on a gray background"]



def test_sample_settings_follow_the_config_and_its_overrides():
  from sora_jax.configs import base

  config = base.get_config()
  settings = sampling.SampleSettings.from_config(config, steps=7, shift=None)
  assert settings.sample_kwargs(config) == {"sampler": "unipc", "steps": 7, "shift": 3.0,
                                            "guidance_scale": 5.0, "num_train_timesteps": 1000}
  assert (settings.num_frames, settings.height, settings.width) == (33, 480, 832)

@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir): a checkpoint whose saved config names a tokenizer (no dataset needed)."""
  root = tmp_path_factory.mktemp("sample_run")
  config = eval_config()
  captions = [synthetic.caption_for(c, s, d, b) for c, b in synthetic.valid_pairs()
              for s in synthetic.SHAPES for d in synthetic.DIRECTIONS]
  config.data.tokenizer = str(root / "tokenizer.model")
  tokenizer_lib.train(captions, vocab_size=config.data.vocab_size).save(config.data.tokenizer)
  workdir = str(root / "workdir")
  make_workdir(workdir, config, steps=(5,))
  return config, workdir


@pytest.fixture(scope="module")
def reference_gif(run, tmp_path_factory):
  """GIF bytes of PROMPTS[0] with the EMA weights at seed 7, sampled in this process."""
  config, workdir = run
  mesh = convert.local_mesh()
  params = weights_lib.restore_weights(workdir, 5, config, mesh, ["ema_0.9"])["ema_0.9"]
  (video,) = sampling.sample_videos(config, params, PROMPTS[:1], sampling.SampleSettings.from_config(
      config, seed=7), mesh)
  path = str(tmp_path_factory.mktemp("reference") / "reference.gif")
  media.write_gif(path, video, float(config.data.fps))
  return open(path, "rb").read()


def test_same_seed_same_video_other_seed_other_video(run):
  config, workdir = run
  mesh = convert.local_mesh()
  params = weights_lib.restore_weights(workdir, 5, config, mesh, ["raw"])["raw"]
  sampler = sampling.Sampler(DiT(config.model), config, sampling.SampleSettings.from_config(config), mesh)
  cond, uncond = sampling.encode_prompts(text_encoder_lib.get_text_encoder(config), PROMPTS, "")
  first = sampler.latents(params, cond, uncond, seed=3)
  assert first.shape == (2, 4, 4, 4, 12)
  np.testing.assert_array_equal(sampler.latents(params, cond, uncond, seed=3), first)
  assert not np.array_equal(first[0], first[1])  # the prompt matters
  # Prompt i's noise depends on (seed, i) only: sampling it alone (other padding) gives the same.
  np.testing.assert_array_equal(sampler.latents(params, cond[:1], uncond[:1], seed=3)[0], first[0])
  assert not np.array_equal(sampler.latents(params, cond[:1], uncond[:1], seed=4)[0], first[0])
  videos, nonfinite = sampling.decode_to_frames(vae_lib.get_vae(config), first)
  assert nonfinite == 0 and videos[0].shape == (4, 8, 8, 3) and videos[0].dtype == np.uint8


def test_bad_sizes_and_prompts_are_rejected(run):
  config, _ = run
  with pytest.raises(ValueError, match="multiples of data.vae_spatial_factor=2"):
    sampling.latent_shape(config, sampling.SampleSettings.from_config(config, height=9))
  with pytest.raises(ValueError, match="num_frames=0: expected at least 1 frame"):
    sampling.latent_shape(config, sampling.SampleSettings.from_config(config, num_frames=0))
  with pytest.raises(ValueError, match="steps=0: expected at least 1 sampler step"):
    sampling.latent_shape(config, sampling.SampleSettings.from_config(config, steps=0))
  wan = config.copy_and_resolve_references()
  wan.data.update(vae="wan", vae_temporal_factor=4)
  frames = r"num_frames=6: the Wan VAE decodes 1 \+ 4k frames; expected e.g. 5 or 9"
  with pytest.raises(ValueError, match=frames):
    sampling.latent_shape(wan, sampling.SampleSettings.from_config(wan, num_frames=6))
  with pytest.raises(ValueError, match="non-empty prompt"):
    sampling.sample_videos(config, None, [" "], sampling.SampleSettings.from_config(config), None)


def test_binary_matches_the_library_and_fails_in_one_line(run, reference_gif, tmp_path):
  config, workdir = run
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = str(tmp_path / "a.gif")
  done = subprocess.run(
      [sys.executable, "-m", "sora_jax.sample", f"--workdir={workdir}", f"--prompt={PROMPTS[0]}",
       f"--out={out}", "--seed=7", "--ema=0.9"], capture_output=True, text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "from step 5 (ema_0.9)" in done.stdout
  assert open(out, "rb").read() == reference_gif  # deterministic for a seed, across processes
  failed = subprocess.run(
      [sys.executable, "-m", "sora_jax.sample", f"--workdir={workdir}", "--prompt=x", "--height=9",
       f"--out={tmp_path / 'c.mp4'}"], capture_output=True, text=True, env=env, timeout=600)
  assert failed.returncode == 1 and "Traceback" not in failed.stderr
  assert failed.stderr.strip().splitlines()[-1].startswith("sora_jax.sample: error: sample size 4x9x8")
  assert not os.path.exists(tmp_path / "c.mp4")


def test_a_packed_run_samples_like_a_bucketed_one(run, reference_gif, tmp_path):
  import ml_collections

  config, _ = run
  packed = ml_collections.ConfigDict(config.to_dict())
  packed.data.packing, packed.data.token_budget = True, 64
  workdir = str(tmp_path / "packed_run")
  make_workdir(workdir, packed, steps=(5,))  # the same seeded weights, saved with a packed config
  out = str(tmp_path / "p.gif")
  done = subprocess.run(
      [sys.executable, "-m", "sora_jax.sample", f"--workdir={workdir}", f"--prompt={PROMPTS[0]}",
       f"--out={out}", "--seed=7", "--ema=0.9"], capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert done.returncode == 0, done.stderr
  assert open(out, "rb").read() == reference_gif


def _psnr(a, b):
  error = np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
  return np.inf if error == 0 else 10 * np.log10(255.0 ** 2 / error)


def test_image_to_video_and_extension_start_with_the_given_frames(run, tmp_path):
  """An image of another size and aspect becomes frame 0 (resized, centre-cropped); a video's last frames
  lead an extended clip; the generated rest differs from the text-only sample."""
  from PIL import Image

  from sora_jax.offline import video_io

  config, workdir = run
  mesh = convert.local_mesh()
  params = weights_lib.restore_weights(workdir, 5, config, mesh, ["raw"])["raw"]
  settings = sampling.SampleSettings.from_config(config, seed=7)
  rng = np.random.default_rng(0)
  image_path = str(tmp_path / "still.png")
  Image.fromarray(rng.integers(0, 256, (24, 40, 3), np.uint8)).save(image_path)
  image = video_io.read_frames(image_path, 8, 8)
  assert image.shape == (1, 8, 8, 3)

  (plain,) = sampling.sample_videos(config, params, PROMPTS[:1], settings, mesh)
  (animated,) = sampling.sample_videos(config, params, PROMPTS[:1], settings, mesh, given_frames=image)
  assert animated.shape == plain.shape == (4, 8, 8, 3)
  assert _psnr(animated[0], image[0]) >= 40
  assert not np.array_equal(animated[1:], plain[1:])

  video_path = str(tmp_path / "clip.gif")
  media.write_gif(video_path, rng.integers(0, 256, (5, 16, 16, 3), np.uint8), 8.0, scale=1)
  context = video_io.read_frames(video_path, 8, 8, max_frames=2)  # its last 2 frames
  assert context.shape == (2, 8, 8, 3)
  (extended,) = sampling.sample_videos(config, params, PROMPTS[:1], settings, mesh, given_frames=context)
  assert _psnr(extended[:2], context) >= 40
  with pytest.raises(ValueError, match="fewer than 4"):
    sampling.sample_videos(config, params, PROMPTS[:1], settings, mesh,
                           given_frames=np.repeat(image, 4, axis=0))


def test_binary_samples_from_an_image_and_extends_a_video(run, tmp_path):
  from PIL import Image

  from sora_jax.offline import video_io

  config, workdir = run
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  rng = np.random.default_rng(1)
  image_path = str(tmp_path / "still.png")
  Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(image_path)
  out = str(tmp_path / "i2v.mp4")
  done = subprocess.run(
      [sys.executable, "-m", "sora_jax.sample", f"--workdir={workdir}", f"--prompt={PROMPTS[0]}",
       f"--out={out}", f"--image={image_path}"], capture_output=True, text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stderr
  assert f"starting from {image_path}" in done.stdout and os.path.getsize(out) > 0

  video_path = str(tmp_path / "clip.gif")
  media.write_gif(video_path, rng.integers(0, 256, (6, 8, 8, 3), np.uint8), 8.0, scale=1)
  out = str(tmp_path / "extended.gif")
  done = subprocess.run(
      [sys.executable, "-m", "sora_jax.sample", f"--workdir={workdir}", f"--prompt={PROMPTS[0]}",
       f"--out={out}", f"--video={video_path}", "--extend_frames=2"],
      capture_output=True, text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stderr
  # eval.num_frames = 4: the video's last 2 frames, then 2 new ones.
  assert "4 frames of 8x8" in done.stdout and f"the last 2 frames of {video_path}" in done.stdout
  written = video_io.read_frames(out, 8, 8)
  np.testing.assert_array_equal(written[:2], video_io.read_frames(video_path, 8, 8)[-2:])


def test_binary_extends_the_prompt_saves_it_beside_the_video_and_samples_it(run, tmp_path):
  from language_helpers import make_tiny_lm

  _, workdir = run
  lm = make_tiny_lm(str(tmp_path / "lm"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  common = [sys.executable, "-m", "sora_jax.sample", f"--workdir={workdir}", "--seed=7"]
  extended_out = str(tmp_path / "extended.gif")
  done = subprocess.run([*common, f"--prompt={PROMPTS[0]}", f"--out={extended_out}", f"--extend_prompt={lm}"],
                        capture_output=True, text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stderr
  line = next(line for line in done.stdout.splitlines() if line.startswith("extended prompt: "))
  extended = line[len("extended prompt: "):]
  record = json.load(open(str(tmp_path / "extended.prompt.json")))
  assert record["prompt"] == PROMPTS[0] and record["extended_prompt"] == extended != PROMPTS[0]
  plain_out = str(tmp_path / "plain.gif")
  done = subprocess.run([*common, f"--prompt={extended}", f"--out={plain_out}"], capture_output=True,
                        text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stderr
  assert open(extended_out, "rb").read() == open(plain_out, "rb").read()  # the extension is what was sampled
