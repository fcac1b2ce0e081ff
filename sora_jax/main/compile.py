"""`python -m sora_jax.compile`: will this config fit that TPU topology? Known before it is queued.

Compiles the real train step ahead of time for a TPU topology on a CPU host (needs libtpu, from the
`[tpu]` extra) and prints per-device memory against HBM; with --eval, eval's sampler too. Exit 0: fits;
3: does not fit; 1: error.
"""

from __future__ import annotations

import math
import os
import sys

# Several processes on one host may load libtpu for compile-only topologies (no TPU is opened).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# On a host that is not a TPU VM, libtpu looks for the VM's metadata server, accelerator type and
# worker hostnames, and prints half a dozen warnings and an INVALID_ARGUMENT trace when they are not
# there. A compile-only topology needs none of them: say so before libtpu starts, unless the
# environment (a real TPU VM, a launcher) already says otherwise.
_COMPILE_ONLY_ENV = {
    "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-1", "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0", "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3"}


def _quiet_libtpu() -> None:
  if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0") or "TPU_NAME" in os.environ:
    return  # a TPU VM: libtpu's own discovery is right there
  for name, value in _COMPILE_ONLY_ENV.items():
    os.environ.setdefault(name, value)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sora_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/wan_1_3b.py.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU accelerator type (v5p-128, v5e-16, v6e-256, v4-32) or topology (v5e:4x4); "
    "default: the config's mesh.target_topology.")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Also search (by compiles) for the largest global batch per step that fits, and "
    "the train.grad_accum_steps that reaches the config's global batch with it.")
_EVAL = flags.DEFINE_bool(
    "eval", False, "Also compile eval's sampler: one call of eval.sample_batch_size prompts at "
    "eval.num_frames x height x width, beside every weight set eval restores (exit 3 if it does not fit).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of the topology joined over DCN (multislice).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device to check against; 0 = the chip's own.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  from sora_jax import config as config_lib

  if _CONFIG.value is None:
    raise config_lib.ConfigError("--config is required, e.g. --config=configs/wan_1_3b.py")
  if _NUM_SLICES.value < 1:
    raise ValueError(f"--num_slices={_NUM_SLICES.value}; expected >= 1 slices of the topology")
  if not (_HBM_GIB.value >= 0 and math.isfinite(_HBM_GIB.value)):
    raise ValueError(f"--hbm_gib={_HBM_GIB.value}; expected > 0 GiB per device, or 0 for the chip's own")
  topology_name = _TOPOLOGY.value or _CONFIG.value.mesh.target_topology
  if not topology_name:
    raise ValueError("--topology is required: the config names no mesh.target_topology (e.g. v5p-64)")
  from sora_jax import tpu_fit  # after the flag checks: it imports jax

  _quiet_libtpu()
  topology, devices, hbm_gib = tpu_fit.topology_devices(topology_name, _NUM_SLICES.value)
  hbm_gib = _HBM_GIB.value or hbm_gib
  report = tpu_fit.compile_train_step(_CONFIG.value, devices, topology, hbm_gib)
  print(tpu_fit.format_report(report), flush=True)
  if _MAX_BATCH.value:
    largest = tpu_fit.max_batch(_CONFIG.value, devices, topology, hbm_gib)
    print(tpu_fit.format_max_batch(largest, _CONFIG.value.train), flush=True)
  sampler_fits = True
  if _EVAL.value:
    sampler = tpu_fit.compile_eval_sampler(_CONFIG.value, devices, hbm_gib)
    print(tpu_fit.format_sampler_report(sampler), flush=True)
    sampler_fits = sampler.fits
  if not (report.fits and sampler_fits):
    sys.exit(3)


def run() -> None:
  cli.run(main, "compile", cpu_without_accelerator=False)


if __name__ == "__main__":
  run()
