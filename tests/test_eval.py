"""Tests of the eval binary and its library: deterministic val loss, media, adherence, step loops."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from eval_helpers import eval_config, make_dataset, make_workdir

from sora_jax.evaluation import evaluator as evaluator_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import run_weights as weights_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir) of a run with checkpoints at steps 10 and 20 and a prepared dataset."""
  root = tmp_path_factory.mktemp("eval_run")
  config = eval_config()
  make_dataset(str(root), config)
  workdir = str(root / "workdir")
  make_workdir(workdir, config, steps=(10, 20))
  return config, workdir


@pytest.fixture(scope="module")
def evaluator(run):
  config, workdir = run
  return evaluator_lib.build(config, workdir, mesh_lib.create_mesh(config), log=lambda line: None)


def test_evaluate_step_is_deterministic_and_writes_everything(evaluator, run):
  config, workdir = run
  first = evaluator_lib.evaluate_step(evaluator, 20)
  second = evaluator_lib.evaluate_step(evaluator, 20)
  assert set(first["weight_sets"]) == {"raw", "ema_0.9"}
  for name in first["weight_sets"]:
    one, two = first["weight_sets"][name], second["weight_sets"][name]
    assert one["loss"] == two["loss"] and one["loss_by_sigma"] == two["loss_by_sigma"]
    assert len(one["loss_by_sigma"]) == 4 and one["loss"] > 0
  assert first["weight_sets"]["raw"]["loss"] != first["weight_sets"]["ema_0.9"]["loss"]
  # Another checkpoint is scored on the same examples, noise and sigmas: comparable, not equal.
  step_10 = evaluator_lib.evaluate_step(evaluator, 10)["weight_sets"]["raw"]["loss"]
  assert step_10 != first["weight_sets"]["raw"]["loss"]
  assert first["sigma_grid"] == [0.125, 0.375, 0.625, 0.875]
  assert first["num_examples"] == 8 and len(first["prompts"]) == 3

  saved = json.load(open(os.path.join(workdir, "eval", "20.json")))
  assert saved["weight_sets"]["raw"]["loss"] == first["weight_sets"]["raw"]["loss"]
  raw = saved["weight_sets"]["raw"]
  assert set(raw["adherence"]) == {"color", "shape", "direction", "background", "overall", "num_samples"}
  assert raw["adherence"]["num_samples"] == 3
  for path in [*raw["files"]["mp4"], *raw["files"]["gif"], raw["files"]["contact_sheet"], saved["loss_plot"]]:
    assert os.path.getsize(path) > 0, path
  assert os.listdir(os.path.join(workdir, "tensorboard", "eval"))
  # The same sampled videos twice: seeded noise, deterministic sampler.
  assert open(raw["files"]["gif"][0], "rb").read() == open(
      first["weight_sets"]["raw"]["files"]["gif"][0], "rb").read()


def test_watch_evaluates_each_step_once_and_skips_deleted_ones(evaluator, run, monkeypatch):
  config, workdir = run
  eval_dir = os.path.join(workdir, "eval")
  for name in os.listdir(eval_dir) if os.path.isdir(eval_dir) else []:
    os.remove(os.path.join(eval_dir, name))
  evaluated = []
  real = evaluator_lib.evaluate_step

  def flaky(evaluator_, step):
    if step == 10:  # retention deletes step 10 while eval reads it
      os.rename(os.path.join(workdir, "checkpoints", "10"), os.path.join(workdir, "checkpoints_gone"))
      raise FileNotFoundError("checkpoint data vanished")
    evaluated.append(step)
    return real(evaluator_, step)

  monkeypatch.setattr(evaluator_lib, "evaluate_step", flaky)
  lines = []
  evaluator.log = lines.append
  polls = []
  results = evaluator_lib.watch(evaluator, 0.01, lambda: len(polls.append(1) or polls) > 50, final_step=20)
  os.rename(os.path.join(workdir, "checkpoints_gone"), os.path.join(workdir, "checkpoints", "10"))
  assert evaluated == [20] and [r["step"] for r in results] == [20]
  assert any("step 10 was deleted while being evaluated" in line for line in lines)
  # The run's saved config ends at step 300, so the watch ran until told to stop, whatever final_step said.
  assert not any("watch ends" in line for line in lines) and len(polls) > 50
  # A restarted watch finds 20 done (its json exists) and evaluates only what is new.
  assert evaluator_lib.evaluated_steps(workdir) == {20}


def test_bad_steps_and_workdirs_fail_clearly(run, tmp_path):
  config, workdir = run
  with pytest.raises(weights_lib.WeightsError, match=r"step 15 is not a checkpoint.*\[10, 20\]"):
    weights_lib.resolve_step(workdir, 15)
  with pytest.raises(weights_lib.WeightsError, match="does not exist"):
    weights_lib.list_steps(str(tmp_path / "nope"))
  other = config.copy_and_resolve_references()
  other.model.num_layers = 3
  with pytest.raises(weights_lib.WeightsError, match=r"params\['blocks'\].*under the config"):
    weights_lib.restore_weights(workdir, 10, other, mesh_lib.create_mesh(other))


def _eval_cli(*flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "sora_jax.eval", *flags], capture_output=True, text=True,
                        env=env, timeout=600)


def test_binary_evaluates_a_step_and_rejects_bad_input(run, tmp_path):
  config, workdir = run
  done = _eval_cli(f"--workdir={workdir}", "--step=10")  # config saved with the checkpoint
  assert done.returncode == 0, done.stderr
  assert "step 10 raw: val_loss" in done.stdout and "step 10 ema_0.9: val_loss" in done.stdout
  assert f"raw contact sheet: {workdir}/samples/10/raw/contact_sheet.png" in done.stdout
  assert os.path.exists(os.path.join(workdir, "eval", "10.json"))
  for flags, message in (((f"--workdir={workdir}", "--step=3"), "step 3 is not a checkpoint"),
                         ((f"--workdir={workdir}", "--all", "--watch"), "at most one of")):
    failed = _eval_cli(*flags)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("sora_jax.eval: error: ") and message in last_line


def _two_processes(*flags):
  """The eval binary as 2 processes of 4 CPU devices (gloo): the mesh one process of 8 devices makes."""
  from helpers import free_port

  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  return [subprocess.Popen(
      [sys.executable, "-m", "sora_jax.eval", *flags, f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={index}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for index in range(2)]


def _outputs(processes, timeout):
  """(stdout, stderr) of each process once it ends; all of them are killed if one does not end in time."""
  try:
    outputs = [process.communicate(timeout=timeout) for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  return outputs


def test_two_processes_evaluate_a_step_as_one_process_does(tmp_path):
  import shutil

  config = eval_config()
  config.eval.continue_clips = 6  # process 0 holds 4 rows of each held-out batch: both give clips
  make_dataset(str(tmp_path), config)
  reference, copy = str(tmp_path / "reference"), str(tmp_path / "workdir")
  make_workdir(reference, config, steps=(10,))
  shutil.copytree(reference, copy)
  one = evaluator_lib.evaluate_step(evaluator_lib.build(config, reference, mesh_lib.create_mesh(config),
                                                        log=lambda line: None), 10)["weight_sets"]
  outputs = _outputs(_two_processes(f"--workdir={copy}", "--step=10"), timeout=600)
  assert all("step 10 raw: val_loss" in stdout for stdout, _ in outputs)
  # Only process 0 decodes, scores and writes.
  assert "raw contact sheet:" in outputs[0][0] and "raw contact sheet:" not in outputs[1][0]
  two = json.load(open(os.path.join(copy, "eval", "10.json")))["weight_sets"]
  for name in ("raw", "ema_0.9"):
    assert two[name]["loss_by_sigma"] == pytest.approx(one[name]["loss_by_sigma"], rel=1e-5)
    assert two[name]["adherence_samples"] == one[name]["adherence_samples"]
    assert two[name]["nonfinite_samples"] == 0 and len(two[name]["files"]["gif"]) == 3
    assert two[name]["continuation"]["given_1"]["num_clips"] == 6
    assert two[name]["continuation"]["given_1"]["samples"] == one[name]["continuation"]["given_1"]["samples"]


@pytest.mark.slow
def test_binary_watch_stops_on_sigterm(run):
  config, workdir = run
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # The saved config's train.num_steps (300) is never reached, so only SIGTERM ends the watch.
  process = subprocess.Popen([sys.executable, "-m", "sora_jax.eval", f"--workdir={workdir}", "--watch"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    assert "watching" in process.stdout.readline()  # the SIGTERM handler is installed by then
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, stderr
  assert "watch stopped (SIGTERM)" in stdout


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_two_process_watch_stops_both(run, tmp_path):
  import shutil

  config, workdir = run
  copy = str(tmp_path / "workdir")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", "samples", "tensorboard"))
  processes = _two_processes(f"--workdir={copy}", "--watch")
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(copy, "eval", "20.json")):  # both steps evaluated
    if time.time() > deadline or any(p.poll() is not None for p in processes):
      _outputs(processes, timeout=1)  # raises with what they printed
    time.sleep(0.5)
  processes[1].send_signal(signal.SIGTERM)  # the saved num_steps (300) is never reached
  for stdout, _ in _outputs(processes, timeout=300):
    assert "watch stopped (SIGTERM) after evaluating 2 new checkpoints" in stdout


def test_eval_batch_shrinks_to_a_small_split():
  from sora_jax.evaluation import val_loss

  config = eval_config()
  config.eval.batch_size = 16
  config.eval.num_examples = 32
  assert val_loss.eval_batch_size(config.eval, "validation", split_size=100, divisor=8) == 16
  # 8 clips of 12, on 8 shards
  assert val_loss.eval_batch_size(config.eval, "validation", split_size=12, divisor=8) == 8
  assert val_loss.eval_batch_size(config.eval, "validation", split_size=12, divisor=1) == 12
  with pytest.raises(ValueError, match="split 'validation' has 5 clips; eval needs at least 8"):
    val_loss.eval_batch_size(config.eval, "validation", split_size=5, divisor=8)


def test_a_packed_run_is_scored_on_whole_clips_like_a_bucketed_one(run, tmp_path):
  import shutil

  import ml_collections

  config, workdir = run
  packed = ml_collections.ConfigDict(config.to_dict())
  packed.data.packing = True
  packed.data.token_budget = 64
  packed.eval.adherence_prompts = 0
  bucketed = ml_collections.ConfigDict(packed.to_dict())
  bucketed.data.packing = False
  losses = []
  for cfg in (bucketed, packed):
    copy = tmp_path / f"run_packing_{cfg.data.packing}"
    shutil.copytree(workdir, copy)
    evaluator = evaluator_lib.build(cfg, str(copy), mesh_lib.create_mesh(cfg), log=lambda line: None)
    results = evaluator_lib.evaluate_step(evaluator, 10)
    losses.append(results["weight_sets"]["raw"]["loss"])
    assert os.path.getsize(results["weight_sets"]["raw"]["files"]["contact_sheet"]) > 0
  assert losses[0] == losses[1]


def test_eval_extends_its_prompts_through_an_endpoint(run, tmp_path):
  """`--extend_prompt=http://...`: config.eval.prompts are rewritten by the served model (the synthetic
  adherence prompts stay), recorded in the result and beside each sample."""
  from language_helpers import make_tiny_lm, serve

  config, workdir = run
  process, url = serve(make_tiny_lm(str(tmp_path / "lm")))
  try:
    done = subprocess.run(
        [sys.executable, "-m", "sora_jax.eval", f"--workdir={workdir}", "--step=20",
         f"--extend_prompt={url}"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  finally:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  assert done.returncode == 0, done.stderr
  result = json.load(open(os.path.join(workdir, "eval", "20.json")))
  (prompt,) = config.eval.prompts
  assert set(result["extended_prompts"]) == {prompt} and result["extended_prompts"][prompt] != prompt
  assert result["weight_sets"]["raw"]["adherence"]["num_samples"] == 3  # synthetic prompts still scored
  first_mp4 = result["weight_sets"]["raw"]["files"]["mp4"][0]
  saved = json.load(open(first_mp4[:-len(".mp4")] + ".prompt.json"))
  assert saved == {"prompt": prompt, "extended_prompt": result["extended_prompts"][prompt]}


def test_continuation_samples_held_out_clips_from_their_first_frames(run, tmp_path):
  """eval.continue_clips: the first held-out clips sampled again from 1 and 2 given latent frames; the
  given frames come back as they were, and the detector's agreement is reported with a contact sheet."""
  import ml_collections
  import numpy as np

  from sora_jax.evaluation import continuation as continuation_lib

  config, workdir = run
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.update(continue_clips=3, continue_frames=(1, 2))
  mesh = mesh_lib.create_mesh(config)
  built = evaluator_lib.build(config, workdir, mesh, log=lambda line: None)
  assert built.continuation.latents.shape[0] == 3
  params = weights_lib.restore_weights(workdir, 20, config, mesh, ["raw"])["raw"]
  results, videos = continuation_lib.run(built.continuation, params, built.vae, config.data)
  for k in (1, 2):
    entry = results[f"given_{k}"]
    assert entry["num_clips"] == 3 and entry["generated_from_frame"] == k
    assert set(entry) >= {"color", "shape", "direction", "background", "samples"}
    for real, generated in zip(built.continuation.real_videos, videos[k], strict=True):
      np.testing.assert_array_equal(generated[:k], real[:k])  # the pixel VAE: exact
  assert not np.array_equal(videos[1][0][1:], built.continuation.real_videos[0][1:])
  raw = evaluator_lib.evaluate_step(built, 20)["weight_sets"]["raw"]
  assert raw["continuation"]["given_2"]["num_clips"] == 3
  for k in (1, 2):
    files = raw["files"]["continuation"][f"given_{k}"]
    assert os.path.getsize(files["contact_sheet"]) > 0
    assert len(files["mp4"]) == 3 and all(os.path.getsize(path) > 0 for path in files["mp4"])
    assert all(os.path.exists(path[:-4] + ".gif") for path in files["mp4"])
  config.eval.continue_frames = (4,)  # a 4-frame clip has nothing left to generate
  with pytest.raises(ValueError, match="fewer than 4"):
    evaluator_lib.build(config, workdir, mesh, log=lambda line: None)
