"""sora_jax.host_malloc: with its tunable, XLA's per-execution temp buffer faults in huge pages."""

import json
import os
import subprocess
import sys

from sora_jax import host_malloc

# Runs a jitted program with a 128 MB intermediate a few times; prints the page faults per run.
_PROGRAM = """
import json, resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T))
x, w = jnp.ones((4096, 256)), jnp.ones((256, 8192)) * 1e-3
for _ in range(3):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, w).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""


def _faults_per_run(env: dict[str, str]) -> float:
  env = {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                          check=True, timeout=300)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_child_env_adds_the_tunable_and_keeps_the_users_own():
  env = host_malloc.child_env({"PATH": "/bin"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = host_malloc.child_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  env = host_malloc.child_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"  # the user's choice wins
  assert host_malloc.child_env()["PATH"] == os.environ["PATH"]


def test_settings_stop_the_page_faults_of_each_execution():
  plain = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  default_faults = _faults_per_run(plain)
  tuned_faults = _faults_per_run(host_malloc.child_env(plain))
  # 128 MB of fresh 4 KiB pages is 32k faults; in 2 MiB pages, 64 (plus ~1k from small blocks).
  assert default_faults > 16_000, default_faults
  assert tuned_faults < default_faults / 8, (tuned_faults, default_faults)
