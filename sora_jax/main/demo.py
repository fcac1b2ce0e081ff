"""`make demo`: synthetic moving shapes -> prepare -> train the tiny DiT -> eval and sample videos,
then the recipe's next stage: clips twice as long, trained from the first run's weights.

Each stage is the project's own binary run as a subprocess, exactly as a user would run it; a stage
whose output already exists is skipped, so re-running the demo continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

from sora_jax import cli, host_malloc
from sora_jax.files import atomic
from sora_jax.train import checkpoint_layout

_OUT = flags.DEFINE_string("out", "demo_run", "Directory for the demo's videos, dataset and workdir.")
_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "Config file the demo trains.")
_NUM_VIDEOS = flags.DEFINE_integer(
    "num_videos", 2400, "Synthetic moving-shape videos to generate (one training clip each).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", -1, "Training steps; -1 keeps the config's train.num_steps.")
_STAGE2_STEPS = flags.DEFINE_integer(
    "stage2_steps", 300, "Steps of the second stage (clips of twice the frames, started from the first "
    "run with train.init_from); 0 skips it.")

# What the demo model should reach on prompt adherence (chance: 1/5 colours, 1/4 backgrounds, 1/4 moves).
TARGETS = {"color": 0.9, "background": 0.9, "direction": 0.6}


class DemoError(RuntimeError):
  """A stage that failed or left no output where the next stage expects it."""


def _stage(title: str, argv: list[str]) -> float:
  print(f"\n=== {title}\n$ python {' '.join(argv)}", flush=True)
  start = time.time()
  # The demo is a CPU demo: skip probing for accelerators (and libtpu's warnings on CPU hosts), and
  # fault XLA's per-step buffers in huge pages (sora_jax/host_malloc.py).
  env = host_malloc.child_env()
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
  result = subprocess.run([sys.executable, *argv], check=False, env=env)
  if result.returncode:
    raise DemoError(f"stage '{title}' failed with exit code {result.returncode} (its error is above)")
  return time.time() - start


def _skip(title: str, reason: str) -> None:
  print(f"\n=== {title}\nskipped: {reason}", flush=True)


def format_summary(result: dict[str, Any]) -> list[str]:
  """Lines of the eval result `workdir/eval/<step>.json`: per weight set, loss and prompt adherence."""
  lines = []
  for name, weights in result.get("weight_sets", {}).items():
    adherence = weights.get("adherence") or {}
    lines.append(f"  {name}: val loss {weights.get('loss', float('nan')):.4f}, "
                 f"{adherence.get('num_samples', 0)} prompts")
    lines.append("    adherence: " + _attribute_verdicts(adherence))
    files = weights.get("files") or {}
    if files.get("contact_sheet"):
      lines.append(f"    contact sheet: {files['contact_sheet']}")
    for key, continued in (weights.get("continuation") or {}).items():
      k = continued["given_latent_frames"]
      what = "image-to-video" if k == 1 else "extension"
      lines.append(f"    {what} from {k} given latent frame{'s' if k > 1 else ''}, "
                   f"{continued['num_clips']} held-out clips, frames {continued['generated_from_frame']}+ "
                   "against the real clip: " + _attribute_verdicts(continued))
      sheet = ((files.get("continuation") or {}).get(key) or {}).get("contact_sheet")
      if sheet:
        lines.append(f"      contact sheet: {sheet}")
  return lines


def _attribute_verdicts(scores: dict[str, Any]) -> str:
  parts = []
  for attribute in ("color", "background", "direction", "shape"):
    value = scores.get(attribute)
    if value is None:
      continue
    target = TARGETS.get(attribute)
    verdict = "" if target is None else (" (ok)" if value >= target else f" (below {target:.0%})")
    parts.append(f"{attribute} {value:.0%}{verdict}")
  return ", ".join(parts)


def summary_record(result: dict[str, Any], timings: dict[str, float | None],
                   config_path: str) -> dict[str, Any]:
  """What `OUT/demo_summary.json` keeps: stage timings and, per weight set, the scores (no samples)."""
  weight_sets = {}
  for name, weights in result.get("weight_sets", {}).items():
    adherence = weights.get("adherence") or {}
    weight_sets[name] = {
        "loss": weights.get("loss"),
        "adherence": {k: v for k, v in adherence.items() if k != "samples"},
        "continuation": {key: {k: v for k, v in entry.items() if k != "samples"}
                         for key, entry in (weights.get("continuation") or {}).items()}}
  return {"config": config_path, "step": result.get("step"), "targets": TARGETS,
          "seconds": {name: None if value is None else round(value, 1) for name, value in timings.items()},
          "weight_sets": weight_sets}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage of the demo: its data, its run and how it differs from the config."""

  name: str  # "" for the first stage; its directories and timing keys carry it otherwise
  frames: int
  num_videos: int
  num_steps: int
  overrides: tuple[str, ...]  # --config.* flags beyond data.dir and train.num_steps


def _run_stage(stage: Stage, out: str, config_path: str, size: int, fps: int, first: int,
               total: int) -> tuple[str, dict[str, float | None]]:
  """Synthetic videos -> prepare -> train -> eval of one stage, skipping what is done; returns the
  eval result's path and the timings."""
  suffix = f"_{stage.name}" if stage.name else ""
  videos, dataset, workdir = (os.path.join(out, name + suffix) for name in ("videos", "dataset", "workdir"))
  captions = os.path.join(videos, "captions.csv")
  overrides = [f"--config.data.dir={dataset}", f"--config.train.num_steps={stage.num_steps}",
               *stage.overrides]
  timings: dict[str, float | None] = {}
  label = lambda index, text: f"{first + index}/{total} {text}"

  title = label(0, f"synthetic moving-shape videos of {stage.frames} frames")
  if os.path.exists(captions):  # written last, after every video
    _skip(title, f"{captions} exists")
    timings["synthetic" + suffix] = None
  else:
    # One clip per video: the clip shows the whole motion, the clearest signal for a short run.
    timings["synthetic" + suffix] = _stage(title, [
        "-m", "sora_jax.data.synthetic", f"--out={videos}", f"--num_videos={stage.num_videos}",
        f"--frames={stage.frames}", f"--size={size}", f"--fps={fps}"])

  # prepare resumes by itself and returns at once when the dataset is complete.
  title = label(1, "prepare: decode, VAE-encode, text-encode, write ArrayRecord")
  timings["prepare" + suffix] = _stage(title, [
      "-m", "sora_jax.prepare", f"--captions={captions}", f"--out={dataset}", f"--config={config_path}",
      "--noprogress", *stage.overrides])

  what = f"the tiny DiT for {stage.num_steps} steps on the CPU" if not stage.name else (
      f"the second stage for {stage.num_steps} steps, started from the first run")
  title = label(2, f"train {what}")
  if stage.num_steps in checkpoint_layout.committed_steps(workdir):
    _skip(title, f"{workdir} has the checkpoint of step {stage.num_steps}")
    timings["train" + suffix] = None
  else:
    # The trainer resumes from the newest checkpoint in the workdir.
    timings["train" + suffix] = _stage(title, [
        "-m", "sora_jax.train", f"--config={config_path}", f"--workdir={workdir}", *overrides])

  result_path = os.path.join(workdir, "eval", f"{stage.num_steps}.json")
  title = label(3, "eval: validation loss per sigma, sample videos, prompt adherence")
  if os.path.exists(result_path):
    _skip(title, f"{result_path} exists")
    timings["eval" + suffix] = None
  else:
    timings["eval" + suffix] = _stage(title, [
        "-m", "sora_jax.eval", f"--config={config_path}", f"--workdir={workdir}",
        f"--step={stage.num_steps}", *overrides])
  return result_path, timings


def _read_result(result_path: str) -> dict[str, Any]:
  try:
    with open(result_path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise DemoError(f"eval left no readable result at {result_path}: {error}") from error


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  from sora_jax import config as config_lib

  config = config_lib.load(_CONFIG.value)
  config_lib.validate(config)
  num_steps = _NUM_STEPS.value if _NUM_STEPS.value >= 0 else int(config.train.num_steps)
  frames, height, width = config.data.buckets[0]
  if height != width:
    raise DemoError(f"{_CONFIG.value}: data.buckets[0]={tuple(config.data.buckets[0])}; the synthetic "
                    f"videos are square, so the demo expects height == width")
  if _STAGE2_STEPS.value < 0:
    raise DemoError(f"--stage2_steps={_STAGE2_STEPS.value}; expected 0 (no second stage) or more")

  out = os.path.abspath(_OUT.value)
  stages = [Stage("", frames, _NUM_VIDEOS.value, num_steps, ())]
  if _STAGE2_STEPS.value:
    # The recipe's next stage: clips of twice the frames from the first run's weights, on a quarter
    # of the videos, at the same learning rate with a short warmup of its own.
    long_frames = 2 * frames
    first_workdir = os.path.join(out, "workdir")
    batch = int(config.train.global_batch_size)
    stages.append(Stage("stage2", long_frames, max(_NUM_VIDEOS.value // 4, 2 * batch), _STAGE2_STEPS.value, (
        f"--config.data.buckets=(({long_frames},{height},{width}),)", "--config.data.image_buckets=()",
        "--config.data.image_ratio=0.0",
        f"--config.eval.num_frames={long_frames}", f"--config.train.init_from={first_workdir}",
        f"--config.train.warmup_steps={max(1, _STAGE2_STEPS.value // 10)}",
        f"--config.checkpoint.every_steps={_STAGE2_STEPS.value}")))
  total = 4 * len(stages)
  timings: dict[str, float | None] = {}
  results = []
  demo_start = time.time()
  for index, stage in enumerate(stages):
    result_path, stage_timings = _run_stage(stage, out, _CONFIG.value, height, int(config.data.fps),
                                            1 + 4 * index, total)
    timings.update(stage_timings)
    results.append((stage, result_path, _read_result(result_path)))

  total_s = time.time() - demo_start
  print(f"\n=== demo finished in {total_s:.0f} s")
  for name, seconds in timings.items():
    print(f"  {name:<17} " + ("skipped (done before)" if seconds is None else f"{seconds:7.1f} s"))
  for stage, _, result in results:
    what = (f"{stage.frames}-frame clips" if not stage.name
            else f"stage 2, {stage.frames}-frame clips from the first run's step {num_steps}")
    print(f"{what}: checkpoint step {result.get('step', stage.num_steps)} (targets: "
          + ", ".join(f"{name} >= {value:.0%}" for name, value in TARGETS.items()) + ")")
    for line in format_summary(result):
      print(line)
  summary_path = os.path.join(out, "demo_summary.json")
  record = summary_record(results[0][2], {**timings, "all": total_s}, _CONFIG.value)
  record.update(num_videos=stages[0].num_videos, frames=stages[0].frames)
  if len(results) > 1:
    stage, _, result = results[1]
    record["stage2"] = {**summary_record(result, {}, _CONFIG.value), "frames": stage.frames,
                        "num_videos": stage.num_videos, "started_from_step": num_steps}
    del record["stage2"]["seconds"], record["stage2"]["config"], record["stage2"]["targets"]
  atomic.write_json(summary_path, record)
  for stage, result_path, _ in results:
    workdir = os.path.dirname(os.path.dirname(result_path))
    print(f"  {stage.name or 'first stage'}: metrics {workdir}/metrics.jsonl, eval results {result_path}, "
          f"sample videos {workdir}/samples/{stage.num_steps}/<weight set>/*.mp4")
  print(f"  summary: {summary_path} (TensorBoard: tensorboard --logdir {out})")


def run() -> None:
  """Console-script entry point."""
  cli.run(main, "demo", quiet_libraries=False, cpu_without_accelerator=False)


if __name__ == "__main__":
  run()
