"""`python -m sora_jax.compile`: will this config fit that TPU topology? Known before it is queued.

Compiles the real train step ahead of time for a TPU topology on a CPU host (needs libtpu, from the
`[tpu]` extra) and prints per-device memory against HBM. Exit 0: fits; 3: does not fit; 1: error.
"""

from __future__ import annotations

import os
import sys

# Several processes on one host may load libtpu for compile-only topologies (no TPU is opened).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags
from ml_collections import config_flags

from sora_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/wan_1_3b.py.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e-8", "TPU accelerator type (v5p-128, v5e-16, v6e-256, v4-32) or topology (v5e:4x4).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of the topology joined over DCN (multislice).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device to check against; 0 = the chip's own.")


def main(argv: list[str]) -> None:
  del argv
  from sora_jax import aot
  from sora_jax import config as config_lib

  if _CONFIG.value is None:
    raise config_lib.ConfigError("--config is required, e.g. --config=configs/wan_1_3b.py")
  topology, devices, hbm_gib = aot.topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
  report = aot.compile_train_step(_CONFIG.value, devices, topology, _HBM_GIB.value or hbm_gib)
  print(aot.format_report(report), flush=True)
  if not report.fits:
    sys.exit(3)


def run() -> None:
  cli.run(main, "compile", cpu_without_accelerator=False)


if __name__ == "__main__":
  run()
