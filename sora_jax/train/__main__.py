"""`python -m sora_jax.train`: the trainer binary (flags, distributed start-up, then the loop).

Owns only flag parsing, `jax.distributed` initialisation and turning errors into one stderr line;
the work is `sora_jax.train.loop.train_and_evaluate(config, workdir)`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (e.g. configs/tiny.py); override fields with --config.train.num_steps=N.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints/, metrics.jsonl, tensorboard/, config.json; resumes if it "
    "holds checkpoints.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process start-up: auto = jax.distributed.initialize() when coordinator flags are given or a "
    "cluster (TPU pod, SLURM, GKE/JobSet) is detected; on = always; off = single process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (omit to auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Total number of processes of the job (omit to auto-detect).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Index of this process in [0, num_processes) (omit to auto-detect).")
_CPU_COLLECTIVES = flags.DEFINE_enum(
    "cpu_collectives", "gloo", ["gloo", "mpi", "none"],
    "Collectives implementation of multi-process CPU runs (what launch/local_multiprocess.sh uses).")
_PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps", "", "START:STOP writes a jax.profiler trace of those steps to WORKDIR/profile.")

# Environment variables whose presence means a multi-process launcher started us.
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "JOBSET_NAME", "OMPI_COMM_WORLD_SIZE")


def _wants_distributed() -> bool:
  if _DISTRIBUTED.value == "off":
    return False
  if _DISTRIBUTED.value == "on" or _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
    return True
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
    return False
  return any(os.environ.get(name) for name in _CLUSTER_ENV)


def _initialize_distributed(peer_timeout_s: int) -> None:
  import jax

  if _CPU_COLLECTIVES.value != "none":
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  kwargs = {}
  if _COORDINATOR.value:
    kwargs["coordinator_address"] = _COORDINATOR.value
  if _NUM_PROCESSES.value is not None:
    kwargs["num_processes"] = _NUM_PROCESSES.value
  if _PROCESS_ID.value is not None:
    kwargs["process_id"] = _PROCESS_ID.value
  # A process that misses heartbeats this long is lost: the others stop (see train/supervisor.py).
  jax.distributed.initialize(heartbeat_timeout_seconds=int(peer_timeout_s), **kwargs)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and grain log every save at INFO; the progress line is the default output.
    logging.set_verbosity(logging.WARNING)
  from sora_jax import cli
  from sora_jax import config as config_lib
  from sora_jax.train import supervisor

  cli.use_cpu_without_accelerator()

  try:
    if _CONFIG.value is None:
      raise config_lib.ConfigError("--config is required, e.g. --config=configs/tiny.py")
    if not _WORKDIR.value:
      raise config_lib.ConfigError("--workdir is required: the run directory for checkpoints and metrics")
    config = _CONFIG.value
    if config.train.init_from:
      from sora_jax.export import pretrained  # the model's shape comes from the pretrained weights

      overrides = config_flags.get_override_values(flags.FLAGS["config"])
      config = pretrained.apply_model_fields(config, config.train.init_from, overrides)
    config_lib.validate(config)  # device-independent rules first: milliseconds, nothing imported yet
    distributed = _wants_distributed()
    if distributed and not os.environ.get(supervisor.WORKER_ENV):
      sys.exit(supervisor.supervise(sys.argv, _WORKDIR.value, _PROCESS_ID.value, _NUM_PROCESSES.value,
                                    config.train.peer_timeout_s))
    from sora_jax.train import loop

    profile_steps = loop.parse_profile_steps(_PROFILE_STEPS.value)  # a bad flag fails before any device
    if distributed:
      _initialize_distributed(config.train.peer_timeout_s)
    import jax

    config_lib.validate(config, jax.device_count())
    result = loop.train_and_evaluate(config, _WORKDIR.value, profile_steps=profile_steps)
  except Exception as error:  # noqa: BLE001 - every failure becomes one line unless verbose
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"sora_jax.train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
  if result.get("preempted"):
    logging.info("stopped by SIGTERM at step %d after saving a checkpoint", result["step"])


def run() -> None:
  """Console-script entry point (`sora-train`)."""
  from sora_jax import cli

  app.run(main, flags_parser=cli.flags_parser("train"))


if __name__ == "__main__":
  run()
