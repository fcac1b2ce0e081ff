"""Train-step benchmark: one optimizer step of sora_jax against diffusers + torch on CPU.

Owns the step-time comparison (same model size, batch, shapes, fp32, flow-matching loss), the
tokens-per-clip sweep, its plot (docs/train_step_vs_tokens.png) and the docs/benchmarks.md section.

Each side runs in its own worker process (one process tree, so thread pools never spin against each
other), and the parent interleaves them (A B, B A, ...) so both share whatever else loads the machine:

  python bench/train_step.py [--cases=tiny,mid] [--sweep] [--repeats=5] [--write_docs]

The two steps (and the cases) are defined in bench/steps.py.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import docs_section  # noqa: E402  (bench/, beside this script)
import steps as step_defs  # noqa: E402  (bench/steps.py; `steps` is a count here)

from sora_jax import host_malloc  # noqa: E402  (jax-free: the parent never imports jax)

_CASES = flags.DEFINE_list("cases", ["tiny", "mid", "tiny_1024"],
                           "headline cases (ratio goal applies): tiny, mid, tiny_1024")
_SWEEP = flags.DEFINE_bool("sweep", True, "also time each model over tokens per clip for the plot")
_REPEATS = flags.DEFINE_integer("repeats", 5, "interleaved rounds per case (A B, then B A, ...)")
_STEPS = flags.DEFINE_integer("steps_per_round", 2, "timed steps per side per round")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per side after compile")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace the train_step section of docs/benchmarks.md")
_PLOT = flags.DEFINE_string(
    "plot", None, "PNG path of the step-time plot (default docs/train_step_vs_tokens.png with --write_docs)")
_JSON = flags.DEFINE_string("json", None, "also write the measured rows as JSON here")
_SIDES = flags.DEFINE_list("sides", ["sora_jax", "diffusers"], "which frameworks to time")
_HOST_MALLOC = flags.DEFINE_bool(
    "host_malloc", True, "start both workers with sora_jax.host_malloc's glibc tunable (a "
    "glibc.malloc.hugetlb already in the environment wins)")
_FROM_JSON = flags.DEFINE_string(
    "from_json", None, "rebuild the report and plot from a --json file (pass the same --repeats etc.)")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_PLOT = os.path.join(_ROOT, "docs", "train_step_vs_tokens.png")


def _worker(side: str, connection) -> None:
  """Serves ("setup", case) / ("run", steps) / ("close",) with one framework's step."""
  session: dict[str, Any] = {}

  def setup(case: step_defs.Case) -> dict[str, Any]:
    session.clear()
    session["step"], info = step_defs.STEP_BUILDERS[side](case)
    return {"compile_s": info["compile_s"], "params": info["params"]}

  def run(steps: int) -> list[tuple[float, float]]:
    times = []
    for _ in range(steps):
      start, cpu_start = time.perf_counter(), time.process_time()
      loss = session["step"]()
      times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    if not math.isfinite(loss):
      raise RuntimeError(f"{side} step gave a non-finite loss {loss}")
    return times

  _serve(connection, setup, run)


def _serve(connection, setup, run) -> None:
  while True:
    message = connection.recv()
    try:
      if message[0] == "setup":
        connection.send(("ok", setup(message[1])))
      elif message[0] == "run":
        connection.send(("ok", run(message[1])))
      else:
        connection.send(("ok", None))
        return
    except Exception as error:  # reported to the parent, which stops with one line
      connection.send(("error", f"{type(error).__name__}: {error}"))


class Worker:
  """A framework's worker process and the pipe that drives it."""

  def __init__(self, name: str) -> None:
    context = multiprocessing.get_context("spawn")
    self.name = name
    self.connection, child = context.Pipe()
    self.process = context.Process(target=_worker, args=(name, child), daemon=True)
    self.process.start()

  def call(self, *message) -> Any:
    self.connection.send(message)
    status, payload = self.connection.recv()
    if status != "ok":
      raise RuntimeError(f"{self.name} worker: {payload}")
    return payload

  def close(self) -> None:
    if self.process.is_alive():
      self.call("close")
    self.process.join(timeout=30)


# ------------------------------------------------------------------------------------------ driver


def _measure(case: step_defs.Case, workers: dict[str, Worker], repeats: int, steps: int, warmup: int) -> dict:
  row: dict[str, Any] = {"case": case.name, "model": case.model, "batch": case.batch,
                         "latent_shape": list(case.latent_shape), "tokens_per_clip": case.tokens_per_clip,
                         "headline": case.headline, "load_before": os.getloadavg()[0]}
  for name, worker in workers.items():
    info = worker.call("setup", case)
    worker.call("run", warmup)
    row[name] = {"params": info["params"], "compile_s": info["compile_s"], "times": [], "cpu_times": []}
  order = list(workers)
  for round_index in range(repeats):
    for name in order if round_index % 2 == 0 else order[::-1]:
      for wall_s, cpu_s in workers[name].call("run", steps):
        row[name]["times"].append(wall_s)
        row[name]["cpu_times"].append(cpu_s)
  row["load_after"] = os.getloadavg()[0]
  for name in workers:
    times = row[name]["times"]
    row[name].update(median=statistics.median(times), min=min(times), max=max(times),
                     cpu_median=statistics.median(row[name]["cpu_times"]))
  if len(workers) == 2:
    ours, theirs = row["sora_jax"]["median"], row["diffusers"]["median"]
    row["ratio"] = ours / theirs
  return row


def _format(row: dict) -> str:
  parts = [f"{row['case']:<18} {row['tokens_per_clip']:>5} tok/clip x{row['batch']:<3}"]
  for name in ("sora_jax", "diffusers"):
    if name in row:
      r = row[name]
      parts.append(f"{name} {r['median']:.3f}s [{r['min']:.3f}, {r['max']:.3f}] (cpu {r['cpu_median']:.2f}s)")
  if "ratio" in row:
    parts.append(f"ratio {row['ratio']:.2f}")
  parts.append(f"load {row['load_before']:.1f}->{row['load_after']:.1f}")
  return "  ".join(parts)


def main(argv: list[str]) -> None:
  del argv
  unknown = [name for name in _CASES.value if name not in step_defs.HEADLINE]
  if unknown:
    raise app.UsageError(f"--cases has {unknown}; expected names from {sorted(step_defs.HEADLINE)}")
  bad_sides = [side for side in _SIDES.value if side not in step_defs.STEP_BUILDERS]
  if bad_sides:
    raise app.UsageError(f"--sides has {bad_sides}; expected names from {sorted(step_defs.STEP_BUILDERS)}")
  if _FROM_JSON.value:
    with open(_FROM_JSON.value, encoding="utf-8") as f:
      saved = json.load(f)
    _finish(saved["rows"], tuple(saved["load_start"]), saved.get("malloc_env", {}))
    return
  cases = [step_defs.HEADLINE[name] for name in _CASES.value]
  if _SWEEP.value:
    cases += [case for name in _CASES.value for case in step_defs.SWEEP_CASES.get(name, [])]

  if _HOST_MALLOC.value:  # spawned workers inherit os.environ; glibc reads it at their start
    os.environ.update(host_malloc.child_env())
  malloc_env = {key: os.environ[key] for key in host_malloc.CPU_MALLOC_ENV if key in os.environ}
  load = os.getloadavg()
  print(f"cpus {os.cpu_count()}  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
  workers = {side: Worker(side) for side in _SIDES.value}
  rows = []
  try:
    for case in cases:
      row = _measure(case, workers, _REPEATS.value, _STEPS.value, _WARMUP.value)
      rows.append(row)
      print(_format(row), flush=True)
  finally:
    for worker in workers.values():
      worker.close()

  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"load_start": load, "malloc_env": malloc_env, "rows": rows}, f, indent=1)
  _finish(rows, load, malloc_env)


def _finish(rows: list[dict], load: tuple[float, float, float], malloc_env: dict[str, str]) -> None:
  for row in rows:
    if row["headline"] and "ratio" in row:
      fastest = row["sora_jax"]["min"] / row["diffusers"]["min"]
      verdict = "meets" if fastest <= step_defs.RATIO_GOAL else "misses"
      print(f"{row['case']}: ours / theirs = {fastest:.2f} on the fastest steps ({verdict} the "
            f"<= {step_defs.RATIO_GOAL} goal), {row['ratio']:.2f} on medians")
  plot_path = _PLOT.value or (_DEFAULT_PLOT if _WRITE_DOCS.value else None)
  if plot_path:
    _plot(rows, plot_path)
  if _WRITE_DOCS.value:
    docs_section.write("train_step", _report(rows, load, malloc_env))


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(6.4, 4.2))
  styles = {"sora_jax": "o-", "diffusers": "s--"}
  for model in sorted({row["model"] for row in rows}):
    model_rows = sorted((row for row in rows if row["model"] == model), key=lambda r: r["tokens_per_clip"])
    for side in ("sora_jax", "diffusers"):
      if side not in model_rows[0]:
        continue
      tokens = [row["tokens_per_clip"] for row in model_rows]
      medians = [row[side]["median"] for row in model_rows]
      low = [row[side]["median"] - row[side]["min"] for row in model_rows]
      high = [row[side]["max"] - row[side]["median"] for row in model_rows]
      label = f"{side} ({model}, batch {model_rows[0]['batch']})"
      axes.errorbar(tokens, medians, yerr=[low, high], fmt=styles[side], capsize=3, label=label)
  axes.set_xscale("log", base=2)
  axes.set_yscale("log")
  axes.set_xlabel("tokens per clip")
  axes.set_ylabel("train step time (s), median [min, max]")
  axes.set_title("fp32 train step on CPU: sora_jax vs diffusers + torch")
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _report(rows: list[dict], load: tuple[float, float, float], malloc_env: dict[str, str]) -> str:
  lines = [
      "## Train step against diffusers + torch (bench/train_step.py)",
      "",
      "One optimizer step, fp32, on this CPU: sora_jax's trainer step (jit, one device, donated state) "
      "against diffusers' `WanTransformer3DModel` + `torch.optim.AdamW` with the same loss, clip and EMA.",
      "",
      "| case | params | batch x tokens/clip | sora_jax s/step median [min, max] | diffusers s/step "
      "median [min, max] | ours / theirs (medians) | ours / theirs (fastest steps) "
      "| CPU s/step ours / theirs "
      "| load (before -> after) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    ours, theirs = row["sora_jax"], row["diffusers"]
    name = f"**{row['case']}**" if row["headline"] else row["case"]
    lines.append(
        f"| {name} | {ours['params']:,} | {row['batch']} x {row['tokens_per_clip']} | "
        f"{ours['median']:.3f} [{ours['min']:.3f}, {ours['max']:.3f}] | "
        f"{theirs['median']:.3f} [{theirs['min']:.3f}, {theirs['max']:.3f}] | {row['ratio']:.2f} | "
        f"{ours['min'] / theirs['min']:.2f} | "
        f"{ours['cpu_median']:.2f} / {theirs['cpu_median']:.2f} | "
        f"{row['load_before']:.1f} -> {row['load_after']:.1f} |")
  repeats, steps = _REPEATS.value, _STEPS.value
  lines += [
      "",
      f"Machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start; torch threads = "
      f"{os.cpu_count()}, XLA on all cores{_xla_flags_note()}; {_malloc_note(malloc_env)}. "
      f"{repeats} interleaved rounds x {steps} "
      f"steps per side after {_WARMUP.value} warm-up steps (and compile). Goal: ours / theirs <= "
      f"{step_defs.RATIO_GOAL} on the bold rows, read on the fastest steps (the ones least disturbed by "
      f"other jobs on a shared machine).",
      "",
      "![train step time against tokens per clip](train_step_vs_tokens.png)",
      "",
  ]
  for row in rows:
    if row["headline"]:
      fastest = row["sora_jax"]["min"] / row["diffusers"]["min"]
      verdict = "meets" if fastest <= step_defs.RATIO_GOAL else "misses"
      ours, theirs = row["sora_jax"], row["diffusers"]
      lines.append(f"- {row['case']}: fastest steps {ours['min']:.3f} s against {theirs['min']:.3f} s, "
                   f"ratio {fastest:.2f} ({verdict} the goal); CPU seconds per step "
                   f"{ours['cpu_median']:.2f} against {theirs['cpu_median']:.2f}; "
                   f"load {row['load_before']:.1f} -> {row['load_after']:.1f}.")
  return "\n".join(lines)


def _xla_flags_note() -> str:
  flags_env = os.environ.get("XLA_FLAGS", "").strip()
  return f" (XLA_FLAGS={flags_env})" if flags_env else ""


def _malloc_note(malloc_env: dict[str, str]) -> str:
  if not malloc_env:
    return "glibc malloc defaults"
  return "both sides started with " + " ".join(f"{key}={value}" for key, value in sorted(malloc_env.items()))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  try:
    run()
  except RuntimeError as error:
    print(f"train_step: {error}", file=sys.stderr)
    sys.exit(1)
