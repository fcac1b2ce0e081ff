"""A diffusers Wan pipeline directory drives every binary: prepare -> train (init_from) -> eval -> sample.

The pipeline holds random small weights written by diffusers / transformers `save_pretrained` and a
sentencepiece model trained on the captions; the inputs are real mp4 files of different sizes and
frame rates. Each stage runs as its binary, as a user would run it.
"""

import csv
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from pipeline_helpers import make_pipeline  # noqa: E402

pytestmark = pytest.mark.torch
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red ball rolls across a green field", "waves break on a sandy beach at dusk",
            "a small boat drifts on a calm blue lake", "snow falls over a quiet dark forest",
            "a yellow kite flies in a windy sky", "city lights flicker at night in the rain"]
# (height, width, fps) of each input video: three aspect ratios, three frame rates
VIDEOS = [(40, 64, 12), (48, 48, 24), (36, 60, 16), (64, 40, 16), (50, 80, 24), (48, 72, 12)]
TEXT_DIM = 16


def _write_video(path, height, width, fps, seed, seconds=1.5):
  rng = np.random.default_rng(seed)
  frames = int(seconds * fps)
  base = rng.integers(0, 255, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
  with av.open(path, mode="w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for index in range(frames):
      shifted = np.roll(base, index, axis=1).repeat(4, 0).repeat(4, 1)[:height, :width]
      frame = av.VideoFrame.from_ndarray(shifted.astype(np.uint8), format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """A Wan pipeline directory of random small weights (vae/, text_encoder/, tokenizer/, transformer/)."""
  return make_pipeline(str(tmp_path_factory.mktemp("wan_pipeline")), CAPTIONS, TEXT_DIM)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("wan_videos")
  rows = []
  for index, (height, width, fps) in enumerate(VIDEOS):
    name = f"clip_{index}.mp4"
    _write_video(str(root / name), height, width, fps, seed=index)
    rows.append((name, CAPTIONS[index]))
  captions = root / "captions.csv"
  with open(captions, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "caption"])
    writer.writerows(rows)
  return str(captions)


def _run(args, env, timeout=900):
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)
  assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr[-4000:]}"
  return result.stdout


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")


def _prepare(videos, dataset, shared, env):
  """The videos prepared into `dataset` with the run's config flags: 0.5-s clip strides, a third held out."""
  _run(["sora_jax.prepare", f"--captions={videos}", f"--out={dataset}", *shared,
        "--config.data.clip_stride_s=0.5", "--config.data.eval_fraction=0.34", "--noprogress",
        "--config.data.prepare_workers=1"], env)


def test_a_wan_pipeline_directory_drives_prepare_train_eval_and_sample(pipeline, videos, tmp_path):
  env = _env()
  shared = ["--config=configs/wan_1_3b.py", f"--config.data.pretrained={pipeline}",
            "--config.data.buckets=((9, 32, 48),)", "--config.data.image_buckets=((1, 32, 48),)",
            "--config.data.text_len=16", f"--config.model.text_dim={TEXT_DIM}"]
  dataset = str(tmp_path / "dataset")
  _prepare(videos, dataset, shared, env)
  report = json.load(open(os.path.join(dataset, "prepare_report.json")))
  assert report["rows_skipped"] == 0 and report["clips_written"] >= 12
  assert report["clips_per_bucket"] == {"9x32x48": report["clips_written"]}

  workdir = str(tmp_path / "run")
  _run(["sora_jax.train", *shared, f"--workdir={workdir}", f"--config.data.dir={dataset}",
        f"--config.train.init_from={pipeline}", "--config.train.num_steps=2",
        "--config.train.global_batch_size=2", "--config.train.warmup_steps=1", "--config.data.image_ratio=0",
        "--config.checkpoint.every_steps=2", "--config.train.ema_decays=(0.999,)",
        "--config.model.remat_policy=none", "--config.model.compute_dtype=float32",
        "--config.eval.num_examples=2", "--config.eval.batch_size=2", "--config.eval.sigma_grid=2",
        "--config.eval.num_frames=5", "--config.eval.height=32", "--config.eval.width=48",
        "--config.diffusion.sample_steps=2", "--config.eval.prompts=('a red ball rolls across a field',)"],
       env)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["data"]["pretrained"] == pipeline and saved["model"]["dim"] == 24

  _run(["sora_jax.eval", f"--workdir={workdir}"], env)
  result = json.load(open(os.path.join(workdir, "eval", "2.json")))
  raw = result["weight_sets"]["raw"]
  assert np.isfinite(raw["loss"]) and len(raw["loss_by_sigma"]) == 2
  assert all(os.path.getsize(path) > 0 for path in raw["files"]["mp4"])

  out = str(tmp_path / "portrait.mp4")
  stdout = _run(["sora_jax.sample", f"--workdir={workdir}", "--prompt=waves on a beach", "--num_frames=9",
                 "--height=48", "--width=32", "--steps=2", f"--out={out}"], env)
  assert "9 frames of 32x48" in stdout
  with av.open(out) as container:
    frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
  # Small samples are upscaled by a whole factor for viewing (media.write_mp4): the aspect stays 48:32.
  height, width, _ = frames[0].shape
  assert len(frames) == 9 and height % 48 == 0 and height * 32 == width * 48

  # Straight from the pipeline directory, without a run.
  out = str(tmp_path / "pretrained.mp4")
  stdout = _run(["sora_jax.sample", f"--pretrained={pipeline}", "--prompt=a kite", "--num_frames=5",
                 "--height=32", "--width=48", "--steps=2", f"--out={out}"], env)
  with av.open(out) as container:
    assert sum(1 for _ in container.decode(video=0)) == 5


@pytest.fixture(scope="module")
def wan22_pipeline(tmp_path_factory):
  """A TI2V-5B-kind pipeline: the Wan2.2 VAE (16x, 48 channels) and a transformer on its channels."""
  return make_pipeline(str(tmp_path_factory.mktemp("wan22_pipeline")), CAPTIONS, TEXT_DIM, wan22=True)


@pytest.mark.slow
def test_a_wan22_pipeline_drives_prepare_train_eval_sample_and_export(wan22_pipeline, videos, tmp_path):
  pipeline = wan22_pipeline
  env = _env()
  shared = ["--config=configs/wan2_2_ti2v_5b.py", f"--config.data.pretrained={pipeline}",
            "--config.data.buckets=((9, 32, 64),)", "--config.data.image_buckets=((1, 32, 64),)",
            "--config.data.text_len=16", f"--config.model.text_dim={TEXT_DIM}", "--config.data.fps=16"]
  dataset = str(tmp_path / "dataset")
  _prepare(videos, dataset, shared, env)
  report = json.load(open(os.path.join(dataset, "prepare_report.json")))
  assert report["rows_skipped"] == 0 and report["clips_per_bucket"] == {"9x32x64": report["clips_written"]}

  workdir = str(tmp_path / "run")
  _run(["sora_jax.train", *shared, f"--workdir={workdir}", f"--config.data.dir={dataset}",
        f"--config.train.init_from={pipeline}", "--config.train.num_steps=2",
        "--config.train.global_batch_size=2", "--config.train.warmup_steps=1", "--config.data.image_ratio=0",
        "--config.checkpoint.every_steps=2", "--config.train.ema_decays=(0.999,)",
        "--config.model.remat_policy=none", "--config.model.compute_dtype=float32",
        "--config.data.token_budget=24", "--config.eval.num_examples=2", "--config.eval.batch_size=2",
        "--config.eval.sigma_grid=2", "--config.eval.num_frames=9", "--config.eval.height=32",
        "--config.eval.width=64", "--config.diffusion.sample_steps=2",
        "--config.eval.prompts=('a red ball rolls across a field',)"], env)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["in_channels"] == 48 and saved["train"]["condition_prob"] == 0.5

  _run(["sora_jax.eval", f"--workdir={workdir}"], env)
  raw = json.load(open(os.path.join(workdir, "eval", "2.json")))["weight_sets"]["raw"]
  assert np.isfinite(raw["loss"]) and all(os.path.getsize(path) > 0 for path in raw["files"]["mp4"])

  from PIL import Image

  image = str(tmp_path / "first.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(image)
  out = str(tmp_path / "i2v.mp4")
  stdout = _run(["sora_jax.sample", f"--workdir={workdir}", "--prompt=waves on a beach", "--num_frames=9",
                 "--height=32", "--width=64", "--steps=2", f"--image={image}", f"--out={out}"], env)
  assert "9 frames of 64x32" in stdout and "starting from" in stdout

  exported = str(tmp_path / "exported")
  _run(["sora_jax.export", f"--workdir={workdir}", "--format=diffusers_pipeline", f"--out={exported}"], env)
  loaded = diffusers.WanPipeline.from_pretrained(exported)
  assert loaded.vae.config.z_dim == 48 and loaded.transformer.config.in_channels == 48
  assert loaded.config.expand_timesteps  # TI2V: the first frame given by per-token timesteps


@pytest.fixture(scope="module")
def a14b_pipeline(tmp_path_factory):
  """An A14B-kind pipeline: two transformers (transformer/, transformer_2/) and a boundary_ratio."""
  return make_pipeline(str(tmp_path_factory.mktemp("a14b_pipeline")), CAPTIONS, TEXT_DIM, experts=True)


@pytest.mark.slow
def test_a_two_expert_pipeline_drives_prepare_train_eval_sample_and_export(a14b_pipeline, videos, tmp_path):
  pipeline = a14b_pipeline
  env = _env()
  shared = ["--config=configs/wan2_2_t2v_a14b.py", f"--config.data.pretrained={pipeline}",
            "--config.data.buckets=((9, 32, 48),)", "--config.data.image_buckets=((1, 32, 48),)",
            "--config.data.text_len=16", f"--config.model.text_dim={TEXT_DIM}"]
  dataset = str(tmp_path / "dataset")
  _prepare(videos, dataset, shared, env)

  workdir = str(tmp_path / "run")
  _run(["sora_jax.train", *shared, f"--workdir={workdir}", f"--config.data.dir={dataset}",
        f"--config.train.init_from={pipeline}", "--config.train.num_steps=4",
        "--config.train.global_batch_size=2", "--config.train.grad_accum_steps=1",
        "--config.train.warmup_steps=1", "--config.data.image_ratio=0", "--config.train.host_state=()",
        "--config.checkpoint.every_steps=4", "--config.train.ema_decays=(0.999,)",
        "--config.model.remat_policy=none", "--config.model.compute_dtype=float32",
        "--config.train.log_every=1",
        "--config.data.token_budget=24", "--config.eval.num_examples=2", "--config.eval.batch_size=2",
        "--config.eval.sigma_grid=2", "--config.eval.num_frames=5", "--config.eval.height=32",
        "--config.eval.width=48", "--config.diffusion.sample_steps=4",
        "--config.eval.prompts=('a red ball rolls across a field',)"], env)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["experts"] == 2 and saved["diffusion"]["boundary_ratio"] == 0.875
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [line for line in lines if "loss" in line]
  assert len(steps) == 4 and all(line["expert"] in (0, 1) for line in steps)
  assert all(line[f"loss_expert/{('high', 'low')[line['expert']]}"] == line["loss"] for line in steps)

  _run(["sora_jax.eval", f"--workdir={workdir}"], env)
  raw = json.load(open(os.path.join(workdir, "eval", "4.json")))["weight_sets"]["raw"]
  assert np.isfinite(raw["loss"]) and all(os.path.getsize(path) > 0 for path in raw["files"]["mp4"])

  out = str(tmp_path / "sample.mp4")
  stdout = _run(["sora_jax.sample", f"--workdir={workdir}", "--prompt=waves on a beach", "--num_frames=5",
                 "--height=32", "--width=48", "--steps=4", "--guidance=4", "--guidance_2=2",
                 f"--out={out}"], env)
  assert "5 frames of 48x32" in stdout and "guidance 4 then 2 below sigma 0.875" in stdout, stdout

  exported = str(tmp_path / "exported")
  _run(["sora_jax.export", f"--workdir={workdir}", "--format=diffusers_pipeline", f"--out={exported}"], env)
  loaded = diffusers.WanPipeline.from_pretrained(exported)
  assert loaded.transformer_2 is not None and loaded.config.boundary_ratio == 0.875
