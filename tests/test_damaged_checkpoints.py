"""Damaged checkpoints in eval, sample and export: the newest readable step with one warning line, an
explicit damaged --step in one error line, an all-damaged workdir in one error; nothing is changed."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from eval_helpers import eval_config, make_dataset, make_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _damage(workdir: str, step: int) -> None:
  """Overwrites every data file of a step's state (what a torn copy or a bad disk leaves)."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  for directory, _, files in os.walk(state):
    for name in files:
      if "metadata" not in name:
        with open(os.path.join(directory, name), "wb") as f:
          f.write(b"\0garbage")


def _listing(root: str) -> dict[str, str]:
  listing = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        listing[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return listing


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir whose newest step 10 is damaged, workdir whose every step is damaged)."""
  root = tmp_path_factory.mktemp("damaged")
  config = eval_config()
  make_dataset(str(root), config)
  workdir = str(root / "workdir")
  make_workdir(workdir, config, steps=(5, 10))
  broken = str(root / "all_damaged")
  shutil.copytree(workdir, broken)
  _damage(workdir, 10)
  for step in (5, 10):
    _damage(broken, step)
  return workdir, broken


def _cli(binary, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", f"sora_jax.{binary}", *flags], capture_output=True,
                        text=True, env=env, timeout=600, cwd=REPO)


def _one_error(result, binary):
  assert result.returncode == 1, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"sora_jax.{binary}: error: "), lines
  return lines[0]


def test_sample_uses_the_newest_readable_step_with_one_warning(run, tmp_path):
  workdir, _ = run
  before = _listing(workdir)
  out = tmp_path / "a.gif"
  result = _cli("sample", f"--workdir={workdir}", "--prompt=a red circle", f"--out={out}", "--steps=2")
  assert result.returncode == 0, result.stderr
  assert "from step 5 (raw)" in result.stdout and out.is_file()
  warnings = result.stderr.strip().splitlines()
  assert len(warnings) == 1 and "checkpoint step 10 is unreadable" in warnings[0]
  assert "using step 5" in warnings[0]
  assert _listing(workdir) == before


def test_export_of_an_explicit_damaged_step_is_one_error_and_writes_nothing(run, tmp_path):
  workdir, broken = run
  before = _listing(workdir)
  line = _one_error(_cli("export", f"--workdir={workdir}", f"--out={tmp_path / 'x'}", "--step=10"), "export")
  assert "checkpoint step 10" in line and "unreadable" in line
  assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")
  line = _one_error(_cli("export", f"--workdir={broken}", f"--out={tmp_path / 'y'}"), "export")
  assert "no readable checkpoint" in line and "step 10" in line and "step 5" in line
  assert _listing(workdir) == before


def test_eval_falls_back_or_fails_in_one_line(run):
  workdir, broken = run
  result = _cli("eval", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert "step 5 raw: val_loss" in result.stdout and "step 10 raw" not in result.stdout
  assert "checkpoint step 10 is unreadable" in result.stdout + result.stderr
  line = _one_error(_cli("eval", f"--workdir={workdir}", "--step=10"), "eval")
  assert "checkpoint step 10" in line and "unreadable" in line
  line = _one_error(_cli("eval", f"--workdir={broken}"), "eval")
  assert "no readable checkpoint" in line
