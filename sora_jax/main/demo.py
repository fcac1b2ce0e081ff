"""`make demo`: synthetic moving shapes -> prepare -> train the tiny DiT -> eval and sample videos.

Each stage is the project's own binary run as a subprocess, exactly as a user would run it; a stage
whose output already exists is skipped, so re-running the demo continues where it stopped.
"""

from __future__ import annotations

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

  out = os.path.abspath(_OUT.value)
  videos, dataset, workdir = (os.path.join(out, name) for name in ("videos", "dataset", "workdir"))
  captions = os.path.join(videos, "captions.csv")
  overrides = [f"--config.data.dir={dataset}", f"--config.train.num_steps={num_steps}"]
  timings: dict[str, float | None] = {}
  demo_start = time.time()

  title = "1/4 synthetic moving-shape videos"
  if os.path.exists(captions):  # written last, after every video
    _skip(title, f"{captions} exists")
    timings["synthetic"] = None
  else:
    # One clip per video: the clip shows the whole motion, the clearest signal for a short run.
    timings["synthetic"] = _stage(title, [
        "-m", "sora_jax.data.synthetic", f"--out={videos}", f"--num_videos={_NUM_VIDEOS.value}",
        f"--frames={frames}", f"--size={height}", f"--fps={config.data.fps}"])

  # prepare resumes by itself and returns at once when the dataset is complete.
  timings["prepare"] = _stage("2/4 prepare: decode, VAE-encode, text-encode, write ArrayRecord", [
      "-m", "sora_jax.prepare", f"--captions={captions}", f"--out={dataset}", f"--config={_CONFIG.value}",
      "--noprogress"])

  title = f"3/4 train the tiny DiT for {num_steps} steps on the CPU"
  if num_steps in checkpoint_layout.committed_steps(workdir):
    _skip(title, f"{workdir} has the checkpoint of step {num_steps}")
    timings["train"] = None
  else:
    # The trainer resumes from the newest checkpoint in the workdir.
    timings["train"] = _stage(title, [
        "-m", "sora_jax.train", f"--config={_CONFIG.value}", f"--workdir={workdir}", *overrides])

  result_path = os.path.join(workdir, "eval", f"{num_steps}.json")
  title = "4/4 eval: validation loss per sigma, sample videos, prompt adherence"
  if os.path.exists(result_path):
    _skip(title, f"{result_path} exists")
    timings["eval"] = None
  else:
    timings["eval"] = _stage(title, [
        "-m", "sora_jax.eval", f"--config={_CONFIG.value}", f"--workdir={workdir}", f"--step={num_steps}",
        *overrides])

  total = time.time() - demo_start
  print(f"\n=== demo finished in {total:.0f} s")
  for name, seconds in timings.items():
    print(f"  {name:<10} " + ("skipped (done before)" if seconds is None else f"{seconds:7.1f} s"))
  try:
    with open(result_path) as f:
      result = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise DemoError(f"eval left no readable result at {result_path}: {error}") from error
  print(f"checkpoint step {result.get('step', num_steps)} (targets: "
        + ", ".join(f"{name} >= {value:.0%}" for name, value in TARGETS.items()) + ")")
  for line in format_summary(result):
    print(line)
  summary_path = os.path.join(out, "demo_summary.json")
  atomic.write_json(summary_path, summary_record(result, {**timings, "all": total}, _CONFIG.value))
  print(f"  metrics:        {workdir}/metrics.jsonl (TensorBoard: tensorboard --logdir {workdir})")
  print(f"  eval results:   {result_path}")
  print(f"  sample videos:  {workdir}/samples/{num_steps}/<weight set>/*.mp4 and *.gif "
        "(continued clips: continued_given_<k>/)")
  print(f"  summary:        {summary_path}")


def run() -> None:
  """Console-script entry point."""
  cli.run(main, "demo", quiet_libraries=False, cpu_without_accelerator=False)


if __name__ == "__main__":
  run()
