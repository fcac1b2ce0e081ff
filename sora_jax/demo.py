"""`make demo`: synthetic moving shapes -> prepare -> train the tiny DiT -> eval and sample videos.

Each stage is the project's own binary run as a subprocess, exactly as a user would run it; a stage
whose output already exists is skipped, so re-running the demo continues where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "demo_run", "Directory for the demo's videos, dataset and workdir.")
_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Config file the demo trains.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 1200, "Synthetic moving-shape videos to generate.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", -1, "Training steps; -1 keeps the config's train.num_steps.")


def _stage(title: str, argv: list[str]) -> float:
  print(f"\n=== {title}\n$ {' '.join(argv)}", flush=True)
  start = time.time()
  # The demo is a CPU demo: skip probing for accelerators (and libtpu's warnings on CPU hosts).
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  result = subprocess.run([sys.executable, *argv], check=False, env=env)
  if result.returncode:
    raise SystemExit(f"demo: stage '{title}' failed with exit code {result.returncode}")
  return time.time() - start


def main(argv: list[str]) -> None:
  del argv
  out = os.path.abspath(_OUT.value)
  videos, dataset, workdir = (os.path.join(out, name) for name in ("videos", "dataset", "workdir"))
  captions = os.path.join(videos, "captions.csv")
  overrides = [f"--config.data.dir={dataset}"]
  if _NUM_STEPS.value >= 0:
    overrides.append(f"--config.train.num_steps={_NUM_STEPS.value}")
  timings = {}

  if not os.path.exists(captions):
    timings["synthetic"] = _stage("1/4 synthetic moving-shape videos", [
        "-m", "sora_jax.data.synthetic", f"--out={videos}", f"--num_videos={_NUM_VIDEOS.value}"])
  timings["prepare"] = _stage("2/4 prepare: decode, VAE-encode, text-encode, write ArrayRecord", [
      "-m", "sora_jax.prepare", f"--captions={captions}", f"--out={dataset}", f"--config={_CONFIG.value}"])
  timings["train"] = _stage("3/4 train the tiny DiT", [
      "-m", "sora_jax.train", f"--config={_CONFIG.value}", f"--workdir={workdir}", *overrides])
  timings["eval"] = _stage("4/4 eval: validation loss per sigma, samples, prompt adherence", [
      "-m", "sora_jax.eval", f"--config={_CONFIG.value}", f"--workdir={workdir}", *overrides])

  print("\n=== demo finished")
  for name, seconds in timings.items():
    print(f"  {name:<10} {seconds:7.1f} s")
  print(f"  metrics:        {workdir}/metrics.jsonl (TensorBoard: tensorboard --logdir {workdir})")
  print(f"  eval results:   {workdir}/eval/")
  print(f"  sample videos:  {workdir}/samples/")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
