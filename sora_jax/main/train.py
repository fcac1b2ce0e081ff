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
from sora_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (e.g. configs/tiny.py); override fields with --config.train.num_steps=N.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints/, metrics.jsonl, tensorboard/, config.json; resumes if it "
    "holds checkpoints.")
flags.adopt_module_key_flags(distributed)  # --help lists the multi-process flags
_PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps", "", "START:STOP writes a jax.profiler trace of those steps to WORKDIR/profile.")

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
  distributed.check_flags()
  return _profile_steps()


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
  several = distributed.wanted()
  if several and not os.environ.get(supervisor.WORKER_ENV):
    sys.exit(supervisor.supervise(sys.argv, _WORKDIR.value, distributed.PROCESS_ID.value,
                                  distributed.NUM_PROCESSES.value, config.train.peer_timeout_s))
  from sora_jax.train import loop

  if several:
    distributed.initialize(config.train.peer_timeout_s)
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
