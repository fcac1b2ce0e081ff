"""Where a CPU train step's time goes: sora_jax's XLA ops and diffusers + torch's aten ops, by kind.

The profiling companion of bench/train_step.py: the same steps (`steps.STEP_BUILDERS`), each side
alone in its own process, first timed without a profiler, then traced for `--steps` steps and its
ops' times summed into kinds (matmul, the attention kernel, elementwise, reductions, copies and
transposes, loop slicing, thread-pool waits, other):

  python bench/step_profile.py [--cases=tiny,mid] [--json=bench/results/step_profile_cpu.json] \
      [--write_docs]

sora_jax: `jax.profiler` trace; each XLA thunk is classed by its HLO (a fusion by the ops it calls).
torch: `torch.profiler`, each aten op's self time. Neither sum equals the step time: XLA runs
independent thunks on its worker threads at once (each at part of the machine's rate) and some plain
`dot` thunks asynchronously (their events hold only the dispatch), and torch's profiler adds its own
overhead per op. --from_json rebuilds the report from a --json file without profiling.
"""

from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import re
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import docs_section  # noqa: E402  (bench/, beside this script)
import steps  # noqa: E402
import timing  # noqa: E402

from sora_jax import host_malloc  # noqa: E402  (jax-free: the parent never imports jax)

_CASES = flags.DEFINE_list("cases", ["tiny", "mid"], f"cases of bench/steps.py: {sorted(steps.HEADLINE)}")
_SIDES = flags.DEFINE_list("sides", ["sora_jax", "diffusers"], "which frameworks to profile")
_PROFILED_STEPS = flags.DEFINE_integer("profiled_steps", 2, "steps under the profiler (kinds are per step)")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 4, "steps timed without the profiler (fastest kept)")
_JSON = flags.DEFINE_string("json", None, "write the rows as JSON here")
_FROM_JSON = flags.DEFINE_string("from_json", None, "rebuild the report from a --json file")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace the step_profile section of docs/benchmarks.md")

KINDS = ("matmul", "attention kernel", "elementwise", "reductions", "copies and transposes",
         "loop slicing", "thread-pool waits", "other")
_TORCH_BOOKKEEPING = ("aten::empty", "aten::view", "aten::as_strided")  # no arithmetic: "other"
_TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")


def hlo_kinds(hlo: str) -> dict[str, str]:
  """Instruction name -> kind, for every instruction of an HLO module's text; a fusion by its body."""
  bodies = {}
  for match in re.finditer(r"\n%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S):
    bodies[match.group(1)] = match.group(2)
  kinds = {}
  for match in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^=]*? ([a-z][\w\-]*)\(([^\n]*)$", hlo, re.M):
    name, opcode, rest = match.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else ""
    kinds[name] = _kind(name, opcode, body)
  return kinds


def _kind(name: str, opcode: str, body: str) -> str:
  if opcode == "dot" or " dot(" in body:
    return "matmul"
  if opcode in ("reduce", "reduce-window") or " reduce(" in body or " reduce-window(" in body:
    return "reductions"
  if "dynamic-slice" in name or "dynamic-update-slice" in name or opcode in (
      "dynamic-slice", "dynamic-update-slice"):
    return "loop slicing"
  if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
    return "copies and transposes"
  if opcode == "fusion":
    return "elementwise"
  return "other"


def _jax_kinds(one_step, hlo: str, steps: int) -> dict[str, float]:
  import jax

  kinds = hlo_kinds(hlo)
  totals: collections.Counter = collections.Counter()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      one_step()
    jax.profiler.stop_trace()
    trace = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(trace[0])
  for plane in data.planes:
    for line in plane.lines:
      if "Eigen" not in line.name:  # XLA's worker threads run the thunks; the rest wait on them
        continue
      for event in line.events:
        if event.name.startswith("ThunkExecutor"):  # encloses the thunks it runs
          continue
        kind = "thread-pool waits" if "Await" in event.name else kinds.get(event.name, "other")
        totals[kind] += event.duration_ns / 1e9 / steps
  return dict(totals)


def _torch_kinds(one_step, steps: int) -> dict[str, float]:
  from torch import profiler

  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as trace:
    for _ in range(steps):
      one_step()
  totals: collections.Counter = collections.Counter()
  for op in trace.key_averages():
    seconds = op.self_cpu_time_total / 1e6 / steps
    if "scaled_dot_product" in op.key:
      totals["attention kernel"] += seconds
    elif op.key in _TORCH_MATMULS:
      totals["matmul"] += seconds
    elif op.key in ("aten::sum", "aten::mean", "aten::norm", "aten::linalg_vector_norm", "aten::max"):
      totals["reductions"] += seconds
    elif op.key in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::transpose", "aten::t"):
      totals["copies and transposes"] += seconds
    elif op.key.startswith("aten::") and not op.key.startswith(_TORCH_BOOKKEEPING):
      totals["elementwise"] += seconds
    else:
      totals["other"] += seconds
  return dict(totals)


def _profile_side(side: str, case: steps.Case, timed_steps: int, profiled_steps: int, queue) -> None:
  try:
    one_step, info = steps.STEP_BUILDERS[side](case)
    times = timing.time_calls(one_step, timed_steps, warmup=2)
    if side == "sora_jax":
      kinds = _jax_kinds(one_step, info["hlo"], profiled_steps)
    else:
      kinds = _torch_kinds(one_step, profiled_steps)
    queue.put({"case": case.name, "side": side, "step_s": min(times), "step_times": times, "kinds": kinds})
  except Exception as error:  # reported to the parent, which stops with one line
    queue.put({"error": f"{side} on {case.name}: {type(error).__name__}: {error}"})


def _run_alone(side: str, case: steps.Case) -> dict:
  context = multiprocessing.get_context("spawn")
  queue = context.Queue()
  process = context.Process(target=_profile_side,
                            args=(side, case, _TIMED_STEPS.value, _PROFILED_STEPS.value, queue))
  process.start()
  row = queue.get()
  process.join(timeout=60)
  if "error" in row:
    raise RuntimeError(row["error"])
  return row


def report(rows: list[dict], load: tuple[float, float], malloc_note: str) -> str:
  header = "| case | side | fastest step s (no profiler) | " + " | ".join(KINDS) + " | sum of ops |"
  lines = [
      "### Where the CPU train step's time goes (bench/step_profile.py)",
      "",
      "bench/train_step.py's steps, each side alone in its own process: the fastest of "
      f"{_TIMED_STEPS.value} steps without a profiler, then seconds per step by kind of op over "
      f"{_PROFILED_STEPS.value} profiled steps (sora_jax: XLA thunks classed by their HLO; torch: aten "
      "ops' self time; `attention kernel` is torch's fused flash attention, forward and backward, whose "
      "products and softmax sora_jax counts under matmul, elementwise and reductions). A sum of ops is not "
      "a step time: XLA runs independent thunks on its worker threads at once (each at part of the "
      "machine's rate, so the sum exceeds the step) and dispatches some plain `dot`s asynchronously; "
      "torch's profiler adds its own cost per op. "
      f"Load average {load[0]:.1f} before, {load[1]:.1f} after; {malloc_note}.",
      "",
      header,
      "|" + "---|" * (len(KINDS) + 4),
  ]
  for row in rows:
    kinds = row["kinds"]
    cells = " | ".join(f"{kinds[k]:.2f}" if kinds.get(k) else "" for k in KINDS)
    lines.append(f"| {row['case']} | {row['side']} | {row['step_s']:.2f} | {cells} | "
                 f"{sum(kinds.values()):.2f} |")
  return "\n".join(lines)


def _malloc_note() -> str:
  env = {key: os.environ[key] for key in host_malloc.CPU_MALLOC_ENV if key in os.environ}
  return ", ".join(f"{k}={v}" for k, v in env.items()) or "glibc malloc defaults"


def main(argv: list[str]) -> None:
  del argv
  unknown = [name for name in _CASES.value if name not in steps.HEADLINE]
  bad_sides = [side for side in _SIDES.value if side not in steps.STEP_BUILDERS]
  if unknown or bad_sides:
    raise app.UsageError(f"--cases {unknown} / --sides {bad_sides} unknown; expected cases from "
                         f"{sorted(steps.HEADLINE)} and sides from {sorted(steps.STEP_BUILDERS)}")
  if _FROM_JSON.value:
    with open(_FROM_JSON.value, encoding="utf-8") as f:
      saved = json.load(f)
    _finish(saved["rows"], tuple(saved["load"]), saved["malloc_env"])
    return
  os.environ.update(host_malloc.child_env())  # as bench/train_step.py starts its workers
  load_before = os.getloadavg()[0]
  rows = []
  for name in _CASES.value:
    for side in _SIDES.value:
      row = _run_alone(side, steps.HEADLINE[name])
      kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["kinds"].items(), key=lambda kv: -kv[1]))
      print(f"{row['case']:<16} {side:<9} step {row['step_s']:.3f} s; per step: {kinds}", flush=True)
      rows.append(row)
  load = (load_before, os.getloadavg()[0])
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"load": load, "malloc_env": _malloc_note(), "rows": rows}, f, indent=1)
  _finish(rows, load, _malloc_note())


def _finish(rows: list[dict], load: tuple[float, float], malloc_note: str) -> None:
  text = report(rows, load, malloc_note)
  print(text)
  if _WRITE_DOCS.value:
    docs_section.write("step_profile", text)


if __name__ == "__main__":
  try:
    app.run(main)
  except RuntimeError as error:
    print(f"step_profile: {error}", file=sys.stderr)
    sys.exit(1)
