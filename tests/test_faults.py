"""Fault injection on multi-process runs (gloo on CPU): what survivors do, and that restarts are exact.

Every process starts in its own session and every test kills its process groups, whatever happens.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import free_port
from test_train import REPO, _env, _losses_by_step, _metrics, _overrides, _train_command

pytestmark = pytest.mark.slow


def _start_job(workdir, flags, cache, num_processes=2, devices=4, wrapped=()):
  """The processes of a job; those in `wrapped` run under tests/restore_fault.py."""
  port = free_port()
  procs = []
  for index in range(num_processes):
    command = [*_train_command(workdir, flags), f"--coordinator_address=localhost:{port}",
               f"--num_processes={num_processes}", f"--process_id={index}", "--cpu_collectives=gloo"]
    if index in wrapped:
      command = [sys.executable, os.path.join(REPO, "tests", "restore_fault.py"), *command[3:]]
    procs.append(subprocess.Popen(command, cwd=REPO, env=_env(cache, devices), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True))
  return procs


def _kill_all(procs):
  for proc in procs:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _wait_for_step(workdir, step, procs, timeout=300):
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process exited early: {[p.poll() for p in procs]}")
    if os.path.exists(path) and any(r["step"] >= step for r in _metrics(workdir)):
      return
    time.sleep(0.2)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def _reference_run(tmp_path, flags, cache):
  """The workdir of the same run, uninterrupted, on 1 process x 8 devices."""
  reference = tmp_path / "reference"
  result = subprocess.run(_train_command(reference, flags), cwd=REPO, env=_env(cache),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  return reference


def _assert_uninterrupted_losses(reference, workdir, steps):
  """Every step 1..steps logged once in `workdir`, with the reference run's loss (<= 1e-5 relative)."""
  want, got = _losses_by_step(_metrics(reference)), _losses_by_step(_metrics(workdir))
  assert sorted(got) == list(range(1, steps + 1))
  for step, loss in want.items():
    assert abs(got[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, got[step], loss)


FIGURES_ENV = "SORA_JAX_FAULT_FIGURES"


def _record_figures(test: str, **figures) -> None:
  """Appends a test's resilience figures (steps lost, seconds to detect and to resume) to the JSON-lines
  file named by $SORA_JAX_FAULT_FIGURES: bench/fault_figures.py tables them for docs/reliability.md."""
  path = os.environ.get(FIGURES_ENV)
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"test": test, **figures}) + "\n")


def _last_logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return max((json.loads(line)["step"] for line in f if line.strip()), default=0)


def _newest_checkpoint(workdir) -> int:
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return max((int(name) for name in names if name.isdigit()), default=0)


def _finish_timed(procs, workdir, after_step, started, timeout=600):
  """Waits for `procs` (a restarted job); returns their (stdout, stderr) and the seconds from `started`
  until the job logged its first step past `after_step` (start-up, restore and compile included)."""
  resume_s = None
  deadline = time.time() + timeout
  metrics = os.path.join(workdir, "metrics.jsonl")
  while resume_s is None and time.time() < deadline:
    # Rows the killed run logged past its checkpoint are still there until the restart drops them.
    if os.path.getmtime(metrics) > started and _last_logged_step(workdir) > after_step:
      resume_s = round(time.time() - started, 1)
    elif any(p.poll() is not None for p in procs):
      break
    else:
      time.sleep(0.1)
  return [p.communicate(timeout=timeout) for p in procs], resume_s


def _error_lines(stderr: str) -> list[str]:
  """stderr without the progress lines process 0 prints."""
  return [line for line in stderr.splitlines()
          if line.strip() and not line.startswith(("step ", "training ", "resuming "))]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_sigkill_of_one_process_stops_the_other_in_one_line_and_the_restart_is_exact(
    tmp_path, tiny_train_config, tiny_train_dataset, victim):
  cache = tmp_path / "xla_cache"
  steps, timeout_s = 10, 15
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": steps, "checkpoint.every_steps": 2, "train.peer_timeout_s": timeout_s})
  reference = _reference_run(tmp_path, flags, cache)

  workdir = tmp_path / "job"
  procs = _start_job(workdir, flags, cache)
  try:
    _wait_for_step(workdir, random.Random(victim).randint(3, 6), procs)
    os.killpg(procs[victim].pid, signal.SIGKILL)
    killed_at = time.time()
    logged_at_kill = _last_logged_step(workdir)
    survivor = procs[1 - victim]
    _, stderr = survivor.communicate(timeout=timeout_s + 60)
    detected_s = time.time() - killed_at
  finally:
    _kill_all(procs)
  assert survivor.returncode == 75, stderr[-3000:]
  assert detected_s <= timeout_s + 10
  lines = _error_lines(stderr)
  assert len(lines) == 1, lines
  assert f"process {victim} of 2" in lines[0] and "stopped answering" in lines[0]
  assert "resumes from checkpoint step" in lines[0]
  assert os.path.isfile(workdir / "logs" / f"process_{1 - victim}.log")

  restored = _newest_checkpoint(workdir)
  started = time.time()
  procs = _start_job(workdir, flags, cache)
  try:
    outputs, resume_s = _finish_timed(procs, workdir, restored, started)
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
  _assert_uninterrupted_losses(reference, workdir, steps)
  rows = [r["step"] for r in _metrics(workdir)]
  assert len(rows) == len(set(rows))  # one row per logged step after the kill and restart
  _record_figures(f"sigkill_{['coordinator', 'worker'][victim]}", steps_lost=logged_at_kill - restored,
                  detect_s=round(detected_s, 1), resume_s=resume_s, peer_timeout_s=timeout_s)


def test_the_local_launcher_restarts_a_job_that_lost_a_process(tmp_path, tiny_train_config,
                                                                 tiny_train_dataset):
  cache = tmp_path / "xla_cache"
  steps = 8
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": steps, "checkpoint.every_steps": 2, "train.peer_timeout_s": 15})
  reference = _reference_run(tmp_path, flags, cache)
  workdir = tmp_path / "job"
  env = _env(cache, devices=4)
  env.update(NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", PYTHON=sys.executable, MAX_RESTARTS="1")
  launcher = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"),
                               "--config=configs/tiny.py", f"--workdir={workdir}", *flags],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
  try:
    _wait_for_step(workdir, 3, [launcher])
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # process 1's supervisor; its trainer dies with it
    killed_at, logged_at_kill = time.time(), _last_logged_step(workdir)
    _, stderr = launcher.communicate(timeout=600)
  finally:
    _kill_all([launcher])
  assert launcher.returncode == 0, stderr[-3000:]
  assert "restart 1 of 1" in stderr
  _assert_uninterrupted_losses(reference, workdir, steps)
  resumed = re.search(r"resuming from step (\d+)", stderr)
  _record_figures("launcher_restart", steps_lost=logged_at_kill - int(resumed[1]) if resumed else None,
                  kill_to_end_s=round(time.time() - killed_at, 1), peer_timeout_s=15)


def test_sigterm_to_one_process_saves_the_same_step_everywhere_and_the_restart_continues(
    tmp_path, tiny_train_config, tiny_train_dataset):
  cache = tmp_path / "xla_cache"
  steps = 12
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": steps, "checkpoint.every_steps": 100, "train.log_every": 1})
  reference = _reference_run(tmp_path, flags, cache)
  workdir = tmp_path / "job"
  procs = _start_job(workdir, flags, cache)
  try:
    _wait_for_step(workdir, 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # one host only: the other learns it through a collective
    outputs = [p.communicate(timeout=300) for p in procs]
    logged_at_stop = _last_logged_step(workdir)
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < steps  # one step, written by both processes together
  assert f"saving step {saved[0]}" in outputs[0][1]
  started = time.time()
  procs = _start_job(workdir, flags, cache)
  try:
    outputs, resume_s = _finish_timed(procs, workdir, saved[0], started)
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
  _assert_uninterrupted_losses(reference, workdir, steps)
  _record_figures("sigterm_one_host", steps_lost=logged_at_stop - saved[0], resume_s=resume_s)


def test_sigkill_during_an_async_checkpoint_write_restores_the_previous_step(tmp_path, tiny_train_config,
                                                                            tiny_train_dataset):
  """A wider model makes each write take long enough to be caught half-way; the restart ignores and
  cleans up the partial step and continues from the previous one with the uninterrupted losses."""
  cache = tmp_path / "xla_cache"
  steps = 8
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": steps, "checkpoint.every_steps": 1, "checkpoint.async_save": True,
      "model.dim": 256, "model.ffn_dim": 1024, "model.num_heads": 4, "checkpoint.keep_last": 10})
  reference = _reference_run(tmp_path, flags, cache)
  workdir = tmp_path / "job"
  proc = subprocess.Popen(_train_command(workdir, flags), cwd=REPO, env=_env(cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True)
  checkpoints = workdir / "checkpoints"
  partial = None
  try:
    deadline = time.time() + 300
    while partial is None and time.time() < deadline and proc.poll() is None:
      names = os.listdir(checkpoints) if checkpoints.is_dir() else []
      committed = [n for n in names if n.isdigit()]
      tmp = [n for n in names if "tmp" in n]
      if committed and tmp:
        os.killpg(proc.pid, signal.SIGKILL)
        partial = tmp[0]
        logged_at_kill = _last_logged_step(workdir)
      else:
        time.sleep(0.002)
  finally:
    _kill_all([proc])
    proc.communicate()
  assert partial is not None, "no write was caught in flight"
  committed = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  started = time.time()
  proc = subprocess.Popen(_train_command(workdir, flags), cwd=REPO, env=_env(cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    [(stdout, stderr)], resume_s = _finish_timed([proc], workdir, committed[-1], started)
  finally:
    _kill_all([proc])
  assert proc.returncode == 0, stderr
  assert f"resuming from step {committed[-1]}" in stderr + stdout
  assert not [n for n in os.listdir(checkpoints) if "tmp" in n]  # the partial step is cleaned up
  _assert_uninterrupted_losses(reference, workdir, steps)
  _record_figures("sigkill_during_async_save", steps_lost=logged_at_kill - committed[-1], resume_s=resume_s)


def _host_leaves(tree):
  import jax
  import numpy as np

  return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def _clip_ids_per_step(config, data_dir, steps, process_count=2):
  """[step][process] -> the train clip ids (text_embeds[0, 0] of a marked dataset) that process reads."""
  from sora_jax.data import pipeline

  per_process = []
  for index in range(process_count):
    iterator = pipeline.make_iterator(
        config, data_dir, config.data.train_split, process_index=index, process_count=process_count,
        seed=int(config.data.shuffle_seed),
        batch_size_per_process=config.train.global_batch_size // process_count)
    try:
      per_process.append([sorted(int(round(float(x))) for x in next(iterator)["text_embeds"][:, 0, 0])
                          for _ in range(steps)])
    finally:
      iterator.close()
  return [list(row) for row in zip(*per_process, strict=True)]


def test_nonfinite_gradients_on_one_host_skip_the_step_everywhere_and_roll_back(tmp_path, tiny_train_config):
  """Clips whose squared error overflows float32, read by process 1 only: the step is skipped by the
  whole job (parameters unchanged), counted, the count survives a restart, and two such steps in a
  row (train.max_nonfinite_steps=2) roll every process back to the last checkpoint."""
  from conftest import write_tiny_train_dataset

  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import run_weights as weights

  num_clips, steps = 64, 8  # one epoch of 8 steps at 8 clips: each clip read once, by one process
  clean = write_tiny_train_dataset(str(tmp_path / "clean"), num_clips, marked=True)
  ids = _clip_ids_per_step(tiny_train_config, clean, steps + 1)
  # Process 1's first clip of steps 2, 5 and 6 (1-based): one lone bad step, then two in a row.
  bad = {ids[step - 1][1][0] for step in (2, 5, 6)}
  assert not bad & {i for row in ids[:steps] for i in row[0]}  # never on process 0 in this epoch
  bad_steps = [step for step in range(1, steps + 2) if bad & set(ids[step - 1][0] + ids[step - 1][1])]
  assert bad_steps[:3] == [2, 5, 6]
  data_dir = write_tiny_train_dataset(str(tmp_path / "data"), num_clips, marked=True, overflowing=bad,
                                      record_dtype="bfloat16")

  cache, workdir = tmp_path / "xla_cache", tmp_path / "job"
  flags = _overrides(tiny_train_config, data_dir, **{
      "checkpoint.every_steps": 3, "checkpoint.keep_last": 10, "train.max_nonfinite_steps": 2,
      "data.record_dtype": "bfloat16"})
  procs = _start_job(workdir, [*flags, f"--config.train.num_steps={steps}"], cache)
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  assert "6: 2 consecutive non-finite steps; rolled back to the parameters of checkpoint step 3" in (
      outputs[0][0] + outputs[0][1])

  rows = {r["step"]: r for r in _metrics(workdir)}
  assert sorted(rows) == list(range(1, steps + 1))
  for step, row in rows.items():
    assert row["skipped_steps"] == sum(s <= step for s in bad_steps[:3]), (step, row)
    assert (row["loss"] is None) == (step in bad_steps), (step, row)
  assert rows[2]["param_norm"] == rows[1]["param_norm"]  # the skipped update left every shard alone

  # The rollback at step 6 restored checkpoint 3's parameters (without it they would be step 4's).
  config = weights.saved_config(str(workdir), 6)
  mesh = mesh_lib.create_mesh(config)
  at_3, at_6 = (weights.restore_weights(str(workdir), step, config, mesh, names=[weights.RAW])[weights.RAW]
                for step in (3, 6))
  for leaf_3, leaf_6 in zip(_host_leaves(at_3), _host_leaves(at_6), strict=True):
    assert (leaf_3 == leaf_6).all()
  assert rows[4]["param_norm"] != rows[3]["param_norm"]  # step 4 did update

  # The skip count survives the restart.
  started = time.time()
  procs = _start_job(workdir, [*flags, f"--config.train.num_steps={steps + 1}"], cache)
  try:
    outputs, resume_s = _finish_timed(procs, workdir, steps, started)
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
  last = _metrics(workdir)[-1]
  assert last["step"] == steps + 1 and last["skipped_steps"] == len(bad_steps)
  # The rollback at step 6 discarded the updates of steps 4 (good) and 5, 6 (skipped).
  _record_figures("nonfinite_one_host", steps_lost=6 - 3, resume_s=resume_s)


def _restart(workdir, flags, cache, wrapped=()):
  """The job restarted on 2 processes; their (stdout, stderr)."""
  procs = _start_job(workdir, flags, cache, wrapped=wrapped)
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  return outputs


def test_every_process_restores_the_same_step_through_a_transient_read_error_and_a_damaged_step(
    tmp_path, tiny_train_config, tiny_train_dataset):
  from test_damaged_checkpoints import _damage

  cache = tmp_path / "xla_cache"
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": 4, "checkpoint.every_steps": 2, "checkpoint.read_backoff_s": 0.2})
  workdir = tmp_path / "job"
  procs = _start_job(workdir, flags, cache)
  try:
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
  finally:
    _kill_all(procs)

  # Process 1's first read fails once: both restore step 4, nothing is set aside.
  longer = _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": 6, "checkpoint.every_steps": 2, "checkpoint.read_backoff_s": 0.2})
  outputs = _restart(workdir, longer, cache, wrapped=(1,))
  for index, (stdout, _) in enumerate(outputs):
    assert f"process {index} of 2 restores checkpoint step 4" in stdout, stdout[-2000:]
  assert "read on attempt 2 of 3, after: injected: connection reset" in outputs[1][1]
  assert not (workdir / "checkpoints_unreadable").exists()

  # The newest step damaged: both fall back to the same older step, set aside once.
  _damage(str(workdir), 6)
  outputs = _restart(workdir, _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": 8, "checkpoint.every_steps": 2, "checkpoint.read_backoff_s": 0.2}), cache)
  for index, (stdout, _) in enumerate(outputs):
    assert f"process {index} of 2 restores checkpoint step 4" in stdout, stdout[-2000:]
  assert (workdir / "checkpoints_unreadable" / "6").is_dir()
  assert sorted(_losses_by_step(_metrics(workdir))) == list(range(1, 9))
