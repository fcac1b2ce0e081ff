"""Tests of `python -m sora_jax.export`: diffusers parity, import -> export identity, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from eval_helpers import make_workdir, small_config

from sora_jax.export import wan
from sora_jax.files import safetensors_io
from sora_jax.offline import conversion as convert
from sora_jax.train import run_weights as weights_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run"))
  make_workdir(path, small_config(), steps=(10, 20))
  return path


def _files(directory):
  return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_diffusers_export_layout_and_sharding(workdir, tmp_path):
  single = convert.export_checkpoint(workdir, str(tmp_path / "single"), fmt="diffusers")
  assert single.step == 20 and single.weight_set == "raw"
  assert single.files == ["config.json", "diffusion_pytorch_model.safetensors"]
  sharded = convert.export_checkpoint(workdir, str(tmp_path / "sharded"), fmt="diffusers",
                                      max_shard_bytes=64 * 1024)
  assert len(sharded.files) > 3 and sharded.files[-1] == "diffusion_pytorch_model.safetensors.index.json"
  one = safetensors_io.Reader(single.out)
  many = safetensors_io.Reader(sharded.out)
  assert one.specs() == many.specs()
  for name in one.specs():
    np.testing.assert_array_equal(one.read(name), many.read(name))
  for name in sharded.files[1:-1]:
    assert os.path.getsize(os.path.join(sharded.out, name)) <= 64 * 1024 + 4096


def test_wan_export_uses_original_keys(workdir, tmp_path):
  from test_export_wan import WAN_T2V_KEYS_2_LAYERS

  result = convert.export_checkpoint(workdir, str(tmp_path / "wan"), fmt="wan", step=10, ema=0.9)
  assert result.weight_set == "ema_0.9"
  reader = safetensors_io.Reader(result.out)
  assert sorted(reader.specs()) == sorted(WAN_T2V_KEYS_2_LAYERS)
  config_json = json.load(open(os.path.join(result.out, "config.json")))
  assert config_json["_class_name"] == "WanModel" and config_json["num_layers"] == 2
  # Same tensors as the diffusers export, under the other names (norm2 <-> norm3 swapped).
  diffusers_dir = convert.export_checkpoint(
      workdir, str(tmp_path / "d"), fmt="diffusers", step=10, ema=0.9).out
  diffusers_reader = safetensors_io.Reader(diffusers_dir)
  for name in reader.specs():
    np.testing.assert_array_equal(reader.read(name), diffusers_reader.read(wan.wan_to_diffusers_key(name)))
  assert reader.specs()["blocks.1.norm3.weight"].shape == (48,)


@pytest.mark.parametrize("fmt,dtype", [("diffusers", "fp32"), ("wan", "bf16")])
def test_import_then_export_is_byte_identical(workdir, tmp_path, fmt, dtype):
  first = convert.export_checkpoint(workdir, str(tmp_path / "first"), fmt=fmt, dtype=dtype).out
  new_workdir = str(tmp_path / "imported")
  config = convert.import_weights(first, fmt, new_workdir, small_config())
  assert config.model.num_layers == 2 and weights_lib.list_steps(new_workdir) == [0]
  second = convert.export_checkpoint(new_workdir, str(tmp_path / "second"), fmt=fmt, dtype=dtype).out
  assert _files(first) == _files(second)


@pytest.mark.torch
def test_diffusers_from_pretrained_matches_sora_jax(workdir, tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  import jax

  from sora_jax.model.dit import DiT

  out = convert.export_checkpoint(workdir, str(tmp_path / "hf"), fmt="diffusers", max_shard_bytes=100_000).out
  reference = diffusers.WanTransformer3DModel.from_pretrained(out).eval()
  config = weights_lib.saved_config(workdir, 20)
  params = weights_lib.restore_weights(workdir, 20, config, convert.local_mesh(), ["raw"])["raw"]
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(2, 2, 4, 6, 12)).astype(np.float32)  # [B, T, H, W, C]
  timesteps = np.array([250.0, 900.0], np.float32)
  text_embeds = rng.normal(size=(2, 8, 16)).astype(np.float32)
  ours = np.asarray(
      DiT(config.model).apply({"params": jax.device_get(params)}, latents, timesteps, text_embeds))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(latents.transpose(0, 4, 1, 2, 3)), torch.from_numpy(timesteps),
                       torch.from_numpy(text_embeds), return_dict=False)[0].numpy().transpose(0, 2, 3, 4, 1)
  relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
  assert np.abs(theirs).max() > 0.1 and relative <= 1e-4, relative


def test_bad_inputs_fail_with_one_clear_error(workdir, tmp_path):
  with pytest.raises(weights_lib.WeightsError, match=r"step 7 is not a checkpoint.*\[10, 20\]"):
    convert.export_checkpoint(workdir, str(tmp_path / "x"), fmt="diffusers", step=7)
  with pytest.raises(weights_lib.WeightsError, match="does not exist"):
    convert.export_checkpoint(str(tmp_path / "missing"), str(tmp_path / "x"), fmt="diffusers")
  with pytest.raises(weights_lib.WeightsError, match=r"no weight set \['ema_0.5'\]"):
    convert.export_checkpoint(workdir, str(tmp_path / "x"), fmt="diffusers", ema=0.5)
  assert not os.path.exists(tmp_path / "x")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  with pytest.raises(convert.ExportError, match="not empty; pass --overwrite"):
    convert.export_checkpoint(workdir, str(busy), fmt="diffusers")
  assert os.listdir(busy) == ["keep.txt"]
  convert.export_checkpoint(workdir, str(busy), fmt="diffusers", overwrite=True)
  assert "keep.txt" not in os.listdir(busy)
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp dirs left


def test_import_rejects_mismatched_and_unrepresentable_weights(workdir, tmp_path):
  good = convert.export_checkpoint(workdir, str(tmp_path / "good"), fmt="diffusers").out
  # config.json says 3 layers, the safetensors hold 2: the shapes do not match.
  wrong = tmp_path / "wrong"
  os.rename(good, wrong)
  config_json = json.load(open(wrong / "config.json"))
  json.dump({**config_json, "ffn_dim": 64}, open(wrong / "config.json", "w"))
  with pytest.raises(convert.ExportError, match=r"do not match its config.json.*ffn"):
    convert.import_weights(str(wrong), "diffusers", str(tmp_path / "new1"), small_config())
  json.dump({**config_json, "image_dim": 1280}, open(wrong / "config.json", "w"))
  with pytest.raises(convert.ExportError, match="image_dim=1280"):
    convert.import_weights(str(wrong), "diffusers", str(tmp_path / "new2"), small_config())
  json.dump({**config_json, "num_attention_heads": 5, "attention_head_dim": 4},
            open(wrong / "config.json", "w"))
  with pytest.raises(convert.ExportError, match="cannot represent.*head_dim=4"):
    convert.import_weights(str(wrong), "diffusers", str(tmp_path / "new3"), small_config())
  assert not any(os.path.exists(tmp_path / f"new{i}") for i in (1, 2, 3))


def test_binary_exports_and_reports_errors_in_one_line(workdir, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = str(tmp_path / "cli")
  done = subprocess.run(
      [sys.executable, "-m", "sora_jax.export", f"--workdir={workdir}", "--format=wan", f"--out={out}",
       "--dtype=bf16"], capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "exported step 20 (raw)" in done.stdout
  assert all(spec.dtype.name == "bfloat16" for spec in safetensors_io.Reader(out).specs().values())
  again = subprocess.run(
      [sys.executable, "-m", "sora_jax.export", f"--workdir={workdir}", "--format=wan", f"--out={out}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1].startswith("sora_jax.export: error: output")
  assert "Traceback" not in again.stderr
  imported = subprocess.run(
      [sys.executable, "-m", "sora_jax.export", f"--import_from={out}", "--format=wan",
       f"--workdir={tmp_path / 'new_run'}"], capture_output=True, text=True, env=env, timeout=300)
  assert imported.returncode == 0, imported.stderr
  assert "imported" in imported.stdout and "model.num_layers: 30 -> 2" in imported.stdout
  assert weights_lib.list_steps(str(tmp_path / "new_run")) == [0]
  assert os.path.isfile(tmp_path / "new_run" / "config.json")


def test_binary_checks_shard_size_before_reading_the_checkpoint(workdir, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  failed = subprocess.run(
      [sys.executable, "-m", "sora_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'o'}",
       "--max_shard_gb=0"], capture_output=True, text=True, env=env, timeout=300)
  assert failed.returncode == 1 and "Traceback" not in failed.stderr
  assert failed.stderr.strip().splitlines() == [
      "sora_jax.export: error: --max_shard_gb=0.0; expected > 0 GB per safetensors shard"]
  assert not os.path.exists(tmp_path / "o")
