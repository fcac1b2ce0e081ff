"""`python -m sora_jax.eval`: scores a run's checkpoints (val loss per sigma, samples, adherence).

On a slice of several hosts it runs as one process per host (the trainer's --coordinator_address,
--num_processes and --process_id flags, or a cluster's environment), every process on one mesh.

  python -m sora_jax.eval --config=configs/tiny.py --workdir=W --config.data.dir=D            # newest
  python -m sora_jax.eval --config=configs/tiny.py --workdir=W --config.data.dir=D --step=200
  python -m sora_jax.eval --config=configs/tiny.py --workdir=W --config.data.dir=D --watch    # follow a run
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from sora_jax import cli
from sora_jax.files import paths
from sora_jax.language import prompt_extension
from sora_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file of the run (e.g. configs/tiny.py); default: the config saved with the "
    "checkpoint. Override fields with --config.data.dir=D.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/; results go to W/eval/.")
_STEP = flags.DEFINE_integer("step", None, "Evaluate this checkpoint step (default: the newest).")
_ALL = flags.DEFINE_bool("all", False, "Evaluate every checkpoint step in the workdir, oldest first.")
flags.adopt_module_key_flags(distributed)  # --help lists the multi-process flags
_WATCH = flags.DEFINE_bool(
    "watch", False, "Poll for new checkpoints and evaluate each once, until SIGTERM or the final step.")


_EXTEND = prompt_extension.define_flags(
    "Rewrite each of config.eval.prompts into a dense description before sampling (the extended prompts "
    "go to the result JSON and beside each sample)")


def _check_flags() -> None:
  """Every flag's value, before any checkpoint is read or device touched."""
  if not _WORKDIR.value:
    raise cli.FlagError("--workdir is required: the run directory whose checkpoints to evaluate")
  if sum([_STEP.value is not None, _ALL.value, _WATCH.value]) > 1:
    raise cli.FlagError("pass at most one of --step, --all and --watch")
  cli.check_number("step", _STEP.value, "a checkpoint step >= 0", minimum=0)
  if _WATCH.value:  # a watch may start before the trainer makes the workdir
    if not _WORKDIR.value.startswith("gs://"):
      cli.check_output_directory("workdir", _WORKDIR.value, "a run directory (it may not exist yet)")
    if _CONFIG.value is None and not paths.is_dir(_WORKDIR.value):
      raise cli.FlagError(f"--watch on {_WORKDIR.value}, which does not exist yet, needs --config (no "
                          f"checkpoint holds the run's config yet)")
  else:
    cli.check_run_directory("workdir", _WORKDIR.value, "a run directory holding checkpoints/")
  _EXTEND.check()
  distributed.check_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  _check_flags()
  from sora_jax import config as config_lib
  from sora_jax.evaluation import evaluator as evaluator_lib
  from sora_jax.evaluation import report
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import run_weights as weights_lib

  workdir = _WORKDIR.value
  stop_requested = []
  listen = lambda: signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))
  listen()
  if _WATCH.value:
    interval = float(_CONFIG.value.eval.watch_interval_s) if _CONFIG.value is not None else 60.0
    if not evaluator_lib.wait_for_workdir(workdir, interval, lambda: bool(stop_requested)):
      print("watch stopped (SIGTERM) before the workdir appeared", flush=True)
      return
  steps = weights_lib.list_steps(workdir)  # raises on a missing workdir
  if _STEP.value is not None:
    steps = [weights_lib.resolve_step(workdir, _STEP.value)]
  elif not _WATCH.value and not steps:
    raise weights_lib.no_checkpoints(workdir)
  if _CONFIG.value is not None:
    config = _CONFIG.value
  elif steps:
    # The newest readable config (a damaged newer step is warned about once, and not evaluated).
    config_step, config = weights_lib.readable_checkpoint(
        workdir, _STEP.value, lambda step: weights_lib.saved_config(workdir, step),
        warn=lambda line: print(f"sora_jax.eval: {line}", file=sys.stderr, flush=True))
    steps = [step for step in steps if step <= config_step] if _STEP.value is None else steps
  else:
    raise ValueError("--watch on a workdir without checkpoints needs --config")
  config_lib.validate(config)

  extended = None
  extender = _EXTEND.open_model()  # before jax claims the accelerator; released before the evaluation
  if extender is not None:
    extended = {prompt: prompt_extension.extend(extender, prompt, seed=int(config.eval.seed))
                for prompt in config.eval.prompts}
    del extender
  if distributed.wanted():  # one of several processes (a pod slice): one mesh over all of them
    distributed.initialize(config.train.peer_timeout_s)
    listen()  # jax.distributed's preemption notifier took SIGTERM over: --watch polls its own flag
    from sora_jax.parallel import agreement
    from sora_jax.train import checkpoint as checkpoint_lib
    from sora_jax.train import restore_choice

    steps = restore_choice.agreed_steps(steps)  # a bucket's listing may differ between hosts a moment
    if _CONFIG.value is None:  # each host read the newest config it could: process 0's holds for all
      config = config_lib.from_json(agreement.process_0_json(checkpoint_lib.config_to_json(config)))
    if extended is not None:  # an endpoint or a sampled model need not answer every host alike
      extended = agreement.process_0_json(extended)
  mesh = mesh_lib.create_mesh(config)
  evaluator = evaluator_lib.build(config, workdir, mesh,
                                  extend_prompt=extended.__getitem__ if extended is not None else None)
  try:
    if _WATCH.value:
      print(f"watching {workdir} for checkpoints (every {config.eval.watch_interval_s:g} s; SIGTERM stops)",
            flush=True)
      results = evaluator_lib.watch(evaluator, float(config.eval.watch_interval_s),
                                    lambda: bool(stop_requested), final_step=int(config.train.num_steps))
      # SIGTERM on any process stopped every one (`agreed_stop`); this one may not have had it itself.
      reason = "SIGTERM" if evaluator_lib.agreed_stop(lambda: bool(stop_requested)) else "the final step"
      print(f"watch stopped ({reason}) after evaluating {len(results)} new checkpoints", flush=True)
    elif _STEP.value is not None:
      results = evaluator_lib.evaluate_steps(evaluator, steps)  # an explicit step that is damaged fails
    elif _ALL.value:
      results = evaluator_lib.evaluate_steps(evaluator, steps, skip_damaged=True)
      if results and evaluator.is_main:  # the others score no samples
        print(report.table(results))
    else:  # the newest readable step
      results = evaluator_lib.evaluate_steps(evaluator, steps[::-1], first_readable=True)
    if results and evaluator.is_main:
      curves = evaluator_lib.write_curves(evaluator)
      print(evaluator_lib.where_line(results[-1]))
      if curves:
        print("metrics by step: " + ", ".join(curves.values()))
  finally:
    evaluator.out.close()  # uploads what is left and removes the local copies


def run() -> None:
  cli.run(main, "eval")


if __name__ == "__main__":
  run()
