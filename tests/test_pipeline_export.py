"""`export --format=diffusers_pipeline`: a run's checkpoint as a whole WanPipeline that diffusers loads and
samples like sora_jax does, and that `sample --pretrained` reads back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from eval_helpers import make_workdir, small_config  # noqa: E402
from pipeline_helpers import make_pipeline  # noqa: E402
from sora_jax.configs import base  # noqa: E402

from sora_jax.offline import conversion, pipeline_export  # noqa: E402

pytestmark = pytest.mark.torch
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red ball rolls across a green field", "waves break on a sandy beach at dusk",
            "a small boat drifts on a calm blue lake", "snow falls over a quiet dark forest"]
TEXT_LEN = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(pipeline dir, workdir): a run started from the pipeline's transformer, on its VAE and umT5."""
  root = tmp_path_factory.mktemp("pipeline_export")
  pipeline = make_pipeline(str(root / "pipeline"), CAPTIONS)
  config = base.get_config()
  config.data.pretrained, config.data.vae, config.data.text_encoder = pipeline, "wan", "umt5"
  config.data.text_len = TEXT_LEN
  config.model.compute_dtype = "float32"
  config.diffusion.sample_shift = 2.0
  workdir = str(root / "run")
  conversion.import_weights(os.path.join(pipeline, "transformer"), "diffusers", workdir, config)
  return pipeline, workdir


def test_diffusers_loads_the_export_and_samples_as_sora_jax_does(run, tmp_path):
  pipeline, workdir = run
  out = str(tmp_path / "exported")
  result = pipeline_export.export_pipeline(workdir, out)
  assert result.step == 0 and result.weight_set == "raw"
  for part in ("transformer/config.json", "vae/config.json", "text_encoder/config.json",
               "tokenizer/spiece.model", "tokenizer/tokenizer_config.json",
               "scheduler/scheduler_config.json", "model_index.json"):
    assert os.path.isfile(os.path.join(out, part)), part
  index = json.load(open(os.path.join(out, "model_index.json")))
  assert index["_class_name"] == "WanPipeline"
  assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
  assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]  # the test pipeline's BPE model
  assert index["expand_timesteps"] is False  # a Wan2.1 VAE: one timestep per clip

  loaded = diffusers.WanPipeline.from_pretrained(out).to(torch.float32)
  assert loaded.scheduler.config.flow_shift == 2.0 and loaded.scheduler.config.use_flow_sigmas

  from sora_jax.encoders import text_encoder as text_encoder_lib
  from sora_jax.evaluation import sampling
  from sora_jax.model.dit import DiT
  from sora_jax.train import run_weights

  config = run_weights.saved_config(workdir, 0)
  settings = sampling.SampleSettings.from_config(config, num_frames=5, height=32, width=32, steps=4,
                                                 guidance_scale=3.0, seed=5, encode_empty_negative=True)
  mesh = conversion.local_mesh()
  params = run_weights.restore_weights(workdir, 0, config, mesh, ["raw"])["raw"]
  sampler = sampling.Sampler(DiT(config.model), config, settings, mesh)
  encoder = text_encoder_lib.get_text_encoder(config)
  cond, uncond = sampling.encode_prompts(encoder, [CAPTIONS[0]], "", encode_empty_negative=True)
  noise = np.random.default_rng(0).standard_normal((1, *sampler.shape)).astype(np.float32)
  ours = sampler.latents(params, cond, uncond, noise=noise)[0]  # [T', H', W', C]

  as_torch = lambda array: torch.from_numpy(np.ascontiguousarray(array))
  common = dict(prompt_embeds=as_torch(cond), negative_prompt_embeds=as_torch(uncond), height=32, width=32,
                num_frames=5, num_inference_steps=4, guidance_scale=3.0,
                latents=as_torch(np.moveaxis(noise, -1, 1)))
  with torch.no_grad():
    theirs = loaded(**common, output_type="latent").frames
  theirs = np.moveaxis(theirs[0].numpy(), 0, -1)
  error = np.abs(ours - theirs).max() / np.abs(theirs).max()
  print(f"latent max relative error {error:.2e}")
  assert error < 1e-4, error  # fp32, 4 UniPC steps with guidance

  from sora_jax.encoders import vae as vae_lib

  videos, _ = sampling.decode_to_frames(vae_lib.get_vae(config), ours[None])
  with torch.no_grad():
    frames = loaded(**common, output_type="np").frames[0]
  assert frames.shape == videos[0].shape
  pixel_error = np.abs(videos[0].astype(np.float64) - frames * 255).max()
  print(f"decoded frames max abs difference {pixel_error:.2f} / 255")
  assert pixel_error <= 2.0  # measured 0.5: the uint8 rounding of ours


def test_sample_reads_the_exported_pipeline_back(run, tmp_path):
  pipeline, workdir = run
  out = str(tmp_path / "exported")
  pipeline_export.export_pipeline(workdir, out)
  video = str(tmp_path / "back.mp4")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "sora_jax.sample", f"--pretrained={out}", "--prompt=a boat",
                         "--num_frames=5", "--height=32", "--width=32", "--steps=2", f"--out={video}"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.path.getsize(video) > 0 and "unipc 2 steps" in done.stdout


def test_the_binary_exports_and_refuses_a_pixel_vae_run(run, tmp_path):
  pipeline, workdir = run
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = str(tmp_path / "binary")
  done = subprocess.run([sys.executable, "-m", "sora_jax.export", f"--workdir={workdir}",
                         "--format=diffusers_pipeline", f"--out={out}", f"--pretrained={pipeline}"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "as a diffusers pipeline" in done.stdout and os.path.isfile(os.path.join(out, "model_index.json"))

  pixel_run = str(tmp_path / "pixel_run")
  make_workdir(pixel_run, small_config(), steps=(3,))
  with pytest.raises(conversion.ExportError, match=r"needs a run on the Wan VAE and umT5 .*data.vae='pixel'"):
    pipeline_export.export_pipeline(pixel_run, str(tmp_path / "no"))
  assert not os.path.exists(tmp_path / "no")
  failed = subprocess.run([sys.executable, "-m", "sora_jax.export", f"--workdir={pixel_run}",
                           "--format=diffusers_pipeline", f"--out={tmp_path / 'no'}"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert failed.returncode == 1 and "Traceback" not in failed.stderr
  assert "data.vae='pixel'" in failed.stderr.strip().splitlines()[-1]
