"""`python -m sora_jax.train`: the trainer binary (flags, distributed start-up, then the loop).

Owns flag parsing and checking, the pretrained model fields of `train.init_from`, `jax.distributed`
initialisation and, for multi-process jobs, starting the trainer under `train.supervisor` (`cli.run`
turns errors into one stderr line); the work is `sora_jax.train.loop.train(config, workdir)`.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sora_jax import cli

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


def _profile_steps() -> tuple[int, int] | None:
  """--profile_steps 'a:b' -> (a, b) with 0 <= a < b; '' -> None."""
  text = _PROFILE_STEPS.value
  if not text:
    return None
  try:
    start, stop = (int(part) for part in text.split(":"))
  except ValueError:
    raise cli.FlagError(f"--profile_steps={text!r}; expected START:STOP step numbers, e.g. 10:15") from None
  if not 0 <= start < stop:
    raise cli.FlagError(f"--profile_steps={text!r}; expected 0 <= START < STOP")
  return start, stop


def _check_flags() -> tuple[int, int] | None:
  """Every flag's value, before the pretrained config, the supervisor (which creates WORKDIR/logs),
  jax.distributed or any device; returns the parsed --profile_steps."""
  workdir = _WORKDIR.value
  if "://" in workdir and not workdir.startswith("gs://"):
    raise cli.FlagError(f"--workdir={workdir!r} is a URL of an unsupported kind; expected a filesystem path "
                        f"or a Cloud Storage bucket path gs://BUCKET/RUN")
  if "://" not in workdir:  # a bucket path is checked by writing to it, in the trainer
    cli.check_output_directory("workdir", workdir, "a run directory for checkpoints and metrics")
  cli.check_number("num_processes", _NUM_PROCESSES.value, "at least 1 process", minimum=1)
  processes = _NUM_PROCESSES.value
  if processes is not None:
    cli.check_number("process_id", _PROCESS_ID.value, f"an index in [0, --num_processes={processes})",
                     minimum=0, below=processes)
  cli.check_number("process_id", _PROCESS_ID.value, "an index >= 0", minimum=0)
  address = _COORDINATOR.value
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise cli.FlagError(f"--coordinator_address={address!r}; expected HOST:PORT of process 0, e.g. "
                          f"10.0.0.2:1234")
  return _profile_steps()


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


def _run_origin_fields(train: ml_collections.ConfigDict) -> str:
  """The train.init_* fields of the `train` group set away from their defaults ("" if none): they only
  mean something for a run started from another run."""
  fields = [f"train.init_weights={train.init_weights!r}"] if train.init_weights != "raw" else []
  fields += ([f"train.init_optimizer={train.init_optimizer!r}"] if train.init_optimizer != "restart"
             else [])
  return " and ".join(fields)


def main(argv: list[str]) -> None:
  from sora_jax import config as config_lib
  from sora_jax.train import supervisor

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  if _CONFIG.value is None:
    raise config_lib.ConfigError("--config is required, e.g. --config=configs/tiny.py")
  if not _WORKDIR.value:
    raise config_lib.ConfigError("--workdir is required: the run directory for checkpoints and metrics")
  profile_steps = _check_flags()
  config = _CONFIG.value
  if config.train.init_from:
    from sora_jax.train import stages

    pinned = stages.pin(config, _WORKDIR.value)  # the next stage: RUN@STEP recorded in config.json
    if pinned is not None:
      config = pinned
    else:
      if _run_origin_fields(config.train):
        raise config_lib.ConfigError(
            f"{_run_origin_fields(config.train)}: what to take from another run, but "
            f"train.init_from={config.train.init_from} is not a sora_jax run directory")
      from sora_jax.export import pretrained  # the model's shape comes from the pretrained weights

      overrides = config_flags.get_override_values(flags.FLAGS["config"])
      config = pretrained.apply_model_fields(config, config.train.init_from, overrides)
  elif _run_origin_fields(config.train):
    raise config_lib.ConfigError(
        f"{_run_origin_fields(config.train)}: what to take from the run this one starts from, but "
        f"train.init_from is empty; pass --config.train.init_from=RUN (the previous stage's workdir)")
  config_lib.validate(config)  # device-independent rules first: milliseconds, nothing imported yet
  distributed = _wants_distributed()
  if distributed and not os.environ.get(supervisor.WORKER_ENV):
    sys.exit(supervisor.supervise(sys.argv, _WORKDIR.value, _PROCESS_ID.value, _NUM_PROCESSES.value,
                                  config.train.peer_timeout_s))
  from sora_jax.train import loop

  if distributed:
    _initialize_distributed(config.train.peer_timeout_s)
  import jax

  config_lib.validate(config, jax.device_count())
  result = loop.train(config, _WORKDIR.value, profile_steps=profile_steps)
  if result.get("preempted"):
    logging.info("stopped by SIGTERM at step %d after saving a checkpoint", result["step"])


def run() -> None:
  """Console-script entry point (`sora-train`)."""
  cli.run(main, "train")


if __name__ == "__main__":
  run()
