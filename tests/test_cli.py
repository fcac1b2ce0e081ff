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
