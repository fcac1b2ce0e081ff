"""Tests of what every binary shares (sora_jax.cli): the platform choice on hosts without an accelerator."""

import importlib.util
import os
import subprocess
import sys

import pytest

from sora_jax import cli

_PROBE = ("from sora_jax import cli; pinned = cli.use_cpu_without_accelerator(); import jax; "
          "print(pinned, jax.devices()[0].platform)")


def _probe(**env_changes: str) -> subprocess.CompletedProcess:
  env = {key: value for key, value in os.environ.items() if key not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(env_changes)
  return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                        check=False, timeout=300)


def _cpu_only_host_with_libtpu() -> bool:
  return (importlib.util.find_spec("libtpu") is not None and not cli._gpu_plugin_installed()
          and not cli._tpu_chips_present())


@pytest.mark.skipif(not _cpu_only_host_with_libtpu(),
                    reason="needs libtpu installed on a host without TPU chips or a GPU plugin")
def test_cpu_only_host_with_libtpu_runs_on_cpu_without_tpu_noise():
  result = _probe()
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["True", "cpu"]
  assert "TPU" not in result.stderr, result.stderr


def test_an_explicit_platform_choice_is_left_alone():
  result = _probe(JAX_PLATFORMS="cpu")
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["False", "cpu"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _binary(module, *args, cwd):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                        check=False, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory):
  root = tmp_path_factory.mktemp("configs")
  (root / "syntax.py").write_text("def get_config(:\n  pass\n")
  (root / "empty.py").write_text("SIZE = 3\n")
  return root


@pytest.mark.parametrize("args, expected", [
    (["--config=missing.py"], "sora_jax.eval: error: config file 'missing.py' does not exist; expected"),
    (["--config={root}/syntax.py"],
     "sora_jax.eval: error: config file '{root}/syntax.py' line 1: syntax error"),
    (["--config={root}/empty.py"],
     "sora_jax.eval: error: config file '{root}/empty.py' defines no get_config()"),
    (["--config={repo}/configs/tiny.py", "--config.train.num_stepz=3"],
     "sora_jax.eval: error: --config.train.num_stepz: {repo}/configs/tiny.py has no field 'num_stepz'; "
     "did you mean 'num_steps'?"),
    (["--config={repo}/configs/tiny.py", "--config.train.num_steps=many"],
     "sora_jax.eval: error: flag --config.train.num_steps=many: invalid literal for int()"),
])
def test_config_errors_are_one_line(bad_configs, tmp_path, args, expected):
  fill = lambda text: text.format(root=bad_configs, repo=REPO)
  result = _binary("sora_jax.eval", *map(fill, args), "--workdir=w", cwd=tmp_path)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(fill(expected)), result.stderr[-2000:]


@pytest.mark.parametrize("module", ["sora_jax.train", "sora_jax.prepare", "sora_jax.compile"])
def test_every_config_binary_names_an_unknown_field(module, tmp_path):
  result = _binary(module, f"--config={REPO}/configs/tiny.py", "--config.modle.dim=3", cwd=tmp_path)
  name = module.split(".")[1]
  assert result.returncode == 1
  assert result.stderr.strip() == (f"sora_jax.{name}: error: --config.modle.dim: {REPO}/configs/tiny.py has "
                                   f"no field 'modle'; did you mean 'model'?")
  assert os.listdir(tmp_path) == []  # nothing written


def test_verbosity_keeps_the_traceback(tmp_path):
  result = _binary("sora_jax.eval", f"--config={REPO}/configs/tiny.py", "--config.train.num_stepz=3",
                   "--verbosity=1", cwd=tmp_path)
  assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_storage_clients_own_error_is_a_user_error_and_a_bug_is_not():
  from sora_jax import cli

  http_error = type("HttpError", (Exception,), {"__module__": "gcsfs.retry"})
  assert cli.is_user_error(http_error("403 Forbidden: the bucket refused the request"))
  assert cli.is_user_error(FileNotFoundError("no such file"))
  assert not cli.is_user_error(TypeError("a bug keeps its traceback"))
