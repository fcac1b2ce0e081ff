"""Fault injection on multi-process runs (gloo on CPU): what survivors do, and that restarts are exact.

Every process starts in its own session and every test kills its process groups, whatever happens.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from test_train import REPO, _env, _losses_by_step, _metrics, _overrides, _train_command

pytestmark = pytest.mark.slow


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_job(workdir, flags, cache, num_processes=2, devices=4):
  port = _free_port()
  procs = []
  for index in range(num_processes):
    command = [*_train_command(workdir, flags), f"--coordinator_address=localhost:{port}",
               f"--num_processes={num_processes}", f"--process_id={index}", "--cpu_collectives=gloo"]
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

  procs = _start_job(workdir, flags, cache)
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
  _assert_uninterrupted_losses(reference, workdir, steps)
  rows = [r["step"] for r in _metrics(workdir)]
  assert len(rows) == len(set(rows))  # one row per logged step after the kill and restart


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
    _, stderr = launcher.communicate(timeout=600)
  finally:
    _kill_all([launcher])
  assert launcher.returncode == 0, stderr[-3000:]
  assert "restart 1 of 1" in stderr
  _assert_uninterrupted_losses(reference, workdir, steps)


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
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < steps  # one step, written by both processes together
  assert f"saving step {saved[0]}" in outputs[0][1]
  procs = _start_job(workdir, flags, cache)
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
  _assert_uninterrupted_losses(reference, workdir, steps)


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
      else:
        time.sleep(0.002)
  finally:
    _kill_all([proc])
    proc.communicate()
  assert partial is not None, "no write was caught in flight"
  committed = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  result = subprocess.run(_train_command(workdir, flags), cwd=REPO, env=_env(cache),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert f"resuming from step {committed[-1]}" in result.stderr + result.stdout
  assert not [n for n in os.listdir(checkpoints) if "tmp" in n]  # the partial step is cleaned up
  _assert_uninterrupted_losses(reference, workdir, steps)
