"""Runs that start from pretrained weights (train.init_from) and eval of Wan-shaped runs without encoders."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from eval_helpers import random_like

from sora_jax.export import diffusers as hf
from sora_jax.export import pretrained
from sora_jax.model.dit import DiT
from sora_jax.offline import conversion as convert
from sora_jax.train import loop
from sora_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_params(config, seed):
  abstract = nn.meta.unbox(state_lib.abstract_params(DiT(config.model), config))
  return random_like(abstract, seed=seed, scale=0.05)


def _restored_params(workdir, step, config):
  from sora_jax.train import run_weights as weights_lib

  mesh = convert.local_mesh()
  return weights_lib.restore_weights(workdir, step, config, mesh, ["raw"])["raw"]


def _assert_trees_equal(left, right):
  for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fmt", ["diffusers", "wan"])
def test_init_from_starts_at_the_pretrained_weights_and_a_restart_resumes(
    fmt, tiny_train_config, tiny_train_dataset, tmp_path):
  config = tiny_train_config
  config.data.dir = tiny_train_dataset
  config.train.learning_rate = 0.0  # the weights after training are the ones training started from
  config.train.num_steps = 2
  weights = _random_params(config, seed=3)
  pipeline = tmp_path / "pipeline"
  convert.write_transformer(weights, config, str(pipeline / "transformer"), fmt=fmt, overwrite=True)
  config.train.init_from = str(pipeline)
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  _assert_trees_equal(_restored_params(workdir, 2, config), weights)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["train"]["init_from"] == str(pipeline)

  # Other weights at the same path: the restart resumes from the run's checkpoint, never re-initialises.
  convert.write_transformer(_random_params(config, seed=4), config, str(pipeline / "transformer"),
                            fmt=fmt, overwrite=True)
  config.train.num_steps = 4
  loop.train(config, workdir)
  _assert_trees_equal(_restored_params(workdir, 4, config), weights)


def test_model_fields_come_from_the_pretrained_config(tiny_train_config, tmp_path):
  config = tiny_train_config
  hf.save_transformer(_random_params(config, seed=5), config.model, str(tmp_path / "transformer"))
  other = tiny_train_config.copy_and_resolve_references()
  other.model.dim, other.model.ffn_dim, other.model.num_layers = 64, 128, 3
  applied = pretrained.apply_model_fields(other, str(tmp_path))
  assert (applied.model.dim, applied.model.ffn_dim, applied.model.num_layers) == (32, 64, 2)
  assert other.model.dim == 64  # the caller's config is left alone
  # A command-line override that agrees is fine; one that conflicts names the field and both values.
  pretrained.apply_model_fields(other, str(tmp_path), {"model.num_layers": 2})
  conflict = r"--config.model.dim=64 conflicts .*model.dim=32"
  with pytest.raises(pretrained.PretrainedModelError, match=conflict):
    pretrained.apply_model_fields(other, str(tmp_path), {"model.dim": 64})
  with pytest.raises(ValueError, match=r"missing' is not a directory; expected a Wan pipeline directory or"):
    pretrained.apply_model_fields(other, str(tmp_path / "transformer" / "missing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match=r"empty.*holds neither transformer/config.json nor config.json"):
    pretrained.apply_model_fields(other, str(tmp_path / "empty"))


def test_train_binary_reports_a_conflicting_override_in_one_line(tiny_train_config, tmp_path):
  hf.save_transformer(_random_params(tiny_train_config, seed=6), tiny_train_config.model, str(tmp_path / "t"))
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
       f"--config.train.init_from={tmp_path / 't'}", "--config.model.num_heads=4"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1
  assert lines[0].startswith("sora_jax.train: error: --config.model.num_heads=4 conflicts")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def _wan_shaped_config():
  from sora_jax import config as config_lib

  config = config_lib.load(os.path.join(REPO, "configs", "wan_1_3b.py"))
  config.model.dim, config.model.num_heads, config.model.ffn_dim, config.model.num_layers = 32, 2, 64, 2
  config.model.text_dim = 16
  config.model.compute_dtype = "float32"
  config.model.remat_policy = "none"
  config.data.buckets = ((5, 16, 16),)  # 2 latent frames of 2x2x16
  config.data.image_buckets = ((1, 16, 16),)
  config.data.image_ratio = 0.0
  config.data.text_len = 8
  config.data.read_threads = 1
  config.data.prefetch_buffer = 1
  config.train.ema_decays = (0.999,)
  config.checkpoint.async_save = False
  config.eval.num_examples = 8
  config.eval.batch_size = 8
  config.eval.sigma_grid = 3
  return config


def test_eval_of_a_wan_shaped_run_scores_the_loss_without_encoders(tmp_path):
  from eval_helpers import make_workdir

  from sora_jax.data import schema
  from sora_jax.offline import tfds_builder

  config = _wan_shaped_config()

  def expand(index):
    rng = np.random.default_rng(index)
    text_embeds = np.zeros((8, 16), np.float32)
    text_embeds[:3] = rng.normal(size=(3, 16))
    record = dict(latents=rng.normal(size=(2, 2, 2, 16)).astype(np.float32), text_embeds=text_embeds,
                  text_len=3, caption=f"clip {index}", source=f"v{index}.mp4", clip_start_s=0.0, fps=16.0,
                  num_frames=5, height=16, width=16, is_image=False)
    yield f"clip-{index}", schema.encode(record, config.data.record_dtype)

  data_dir = str(tmp_path / "dataset")
  tfds_builder.write_dataset(
      data_dir, latent_channels=16, text_dim=16, record_dtype=config.data.record_dtype,
      splits={"train": (list(range(4)), expand), "validation": (list(range(100, 108)), expand)},
      metadata={"schema_version": schema.SCHEMA_VERSION}, num_shards=1)
  config.data.dir = data_dir
  workdir = str(tmp_path / "workdir")
  make_workdir(workdir, config, steps=(3,))
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.eval", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "no samples or adherence: data.vae='wan' needs the Wan VAE weights" in result.stdout
  saved = json.load(open(os.path.join(workdir, "eval", "3.json")))
  assert "data.pretrained" in saved["samples_skipped"]
  for name in ("raw", "ema_0.999"):
    entry = saved["weight_sets"][name]
    assert len(entry["loss_by_sigma"]) == 3 and np.isfinite(entry["loss"]) and entry["loss"] > 0
    assert "files" not in entry and "adherence" not in entry
  assert not os.path.exists(os.path.join(workdir, "samples"))


def test_a_broken_pipeline_directory_is_one_clear_error_naming_the_path(tmp_path):
  from sora_jax.files import layout

  root = tmp_path / "pipeline"
  with pytest.raises(layout.PretrainedError, match=r"is not a directory; expected a Wan pipeline directory"):
    layout.vae_dir(str(root))
  os.makedirs(root / "vae")
  with pytest.raises(layout.PretrainedError, match=r"vae has no config.json; expected the Wan2.1 VAE"):
    layout.vae_dir(str(root))
  (root / "vae" / "config.json").write_text("{not json")
  with pytest.raises(layout.PretrainedError, match=r"cannot read .*vae/config.json"):
    layout.vae_dir(str(root))
  (root / "vae" / "config.json").write_text("{}")
  with pytest.raises(layout.PretrainedError, match=r"vae holds no diffusion_pytorch_model.safetensors"):
    layout.vae_dir(str(root))
  with pytest.raises(layout.PretrainedError, match=r"has no text_encoder/ subdirectory"):
    layout.text_encoder_dir(str(root))
  with pytest.raises(layout.PretrainedError, match=r"has no tokenizer/spiece.model"):
    layout.tokenizer_path(str(root))
  with pytest.raises(layout.PretrainedError, match=r"data.pretrained is empty"):
    layout.vae_dir("")


def test_a_run_that_fails_at_start_leaves_no_workdir(tiny_train_config, tiny_train_dataset, tmp_path):
  config = tiny_train_config
  config.data.dir = tiny_train_dataset
  config.train.init_from = str(tmp_path / "no_such_pipeline")
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="no_such_pipeline' is not a directory"):
    loop.train(config, str(workdir))
  assert not workdir.exists()
  os.makedirs(workdir)  # a workdir the user made stays, even when the run fails
  with pytest.raises(ValueError, match="no_such_pipeline' is not a directory"):
    loop.train(config, str(workdir))
  assert workdir.is_dir()
