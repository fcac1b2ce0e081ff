"""CPU roofline of the train-step benchmark: the fp32 matmul peak of this machine (XLA and torch) and
what bench/train_step.py's headline rows need from it.

For each headline case it prints the model FLOPs of one step (`sora_jax.model.flops`, no
rematerialisation counted), the step time if every FLOP ran at the best measured matmul rate, and the
rate a step must sustain to meet a ratio goal against a measured torch step:

  python bench/cpu_roofline.py [--train_step_json=bench/results/train_step_cpu.json] \
      [--out_json=bench/results/cpu_roofline.json] [--write_docs]

Both frameworks run in this one process, one after the other, on all cores.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import steps  # noqa: E402  (bench/, beside this script; jax-free)
import timing  # noqa: E402

_TRAIN_STEP_JSON = flags.DEFINE_string(
    "train_step_json", "bench/results/train_step_cpu.json", "bench/train_step.py --json output to compare")
_OUT_JSON = flags.DEFINE_string("out_json", None, "write the figures as JSON here")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace the cpu_roofline section of docs/benchmarks.md")
_PRODUCTS = flags.DEFINE_integer("products", 20, "timed products per shape and framework (fastest kept)")

# The products the DiT's steps are made of: projections, FFN, attention scores and values.
_SHAPES = ((2048, 512, 512), (2048, 512, 1536), (8192, 256, 768), (2048, 64, 2048), (2048, 2048, 2048))


def _fastest(fn, repeats: int) -> float:
  return min(timing.time_calls(fn, repeats, warmup=2))


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from sora_jax.model import flops

  torch.set_num_threads(os.cpu_count() or 1)
  matmuls = []
  for m, k, n in _SHAPES:
    a = np.random.default_rng(0).standard_normal((m, k), np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), np.float32)
    product = jax.jit(lambda x, y: x @ y)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    gflop = 2 * m * k * n / 1e9
    row = {"shape": [m, k, n],
           "xla_gflops": gflop / _fastest(lambda p=product, x=ja, y=jb: p(x, y).block_until_ready(),
                                          _PRODUCTS.value),
           "torch_gflops": gflop / _fastest(lambda x=ta, y=tb: x @ y, _PRODUCTS.value)}
    matmuls.append(row)
    print(f"matmul {m}x{k} @ {k}x{n}: XLA {row['xla_gflops']:.0f} GFLOP/s, torch {row['torch_gflops']:.0f}")
  peak = max(max(row["xla_gflops"], row["torch_gflops"]) for row in matmuls)

  measured = {}
  if _TRAIN_STEP_JSON.value and os.path.exists(_TRAIN_STEP_JSON.value):
    with open(_TRAIN_STEP_JSON.value, encoding="utf-8") as f:
      measured = {row["case"]: row for row in json.load(f)["rows"]}
  cases = []
  for case in steps.HEADLINE.values():
    config = steps.build_config(case)
    gflop = case.batch * flops.train_flops_per_example(
        config.model, case.latent_shape, config.data.text_len) / 1e9
    row = {"case": case.name, "train_gflop": gflop, "seconds_at_peak": gflop / peak}
    line = f"{case.name}: {gflop:.0f} GFLOP per step, {gflop / peak:.2f} s at the {peak:.0f} GFLOP/s peak"
    if case.name in measured and "diffusers" in measured[case.name]:
      ours, theirs = measured[case.name]["sora_jax"]["min"], measured[case.name]["diffusers"]["min"]
      goal_seconds = steps.RATIO_GOAL * theirs
      row.update(sora_jax_s=ours, diffusers_s=theirs, sora_jax_gflops=gflop / ours,
                 diffusers_gflops=gflop / theirs, gflops_needed_for_goal=gflop / goal_seconds,
                 share_of_peak_needed=gflop / goal_seconds / peak)
      line += (f"; torch runs it at {gflop / theirs:.0f} GFLOP/s ({gflop / theirs / peak:.0%} of peak), "
               f"sora_jax at {gflop / ours:.0f} ({gflop / ours / peak:.0%}); ratio {steps.RATIO_GOAL} "
               f"needs {gflop / goal_seconds:.0f} GFLOP/s = {gflop / goal_seconds / peak:.0%} of peak "
               f"over the whole step")
    cases.append(row)
    print(line)
  if _OUT_JSON.value:
    with open(_OUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"cpus": os.cpu_count(), "load": os.getloadavg(), "peak_gflops": peak, "matmuls": matmuls,
                 "cases": cases}, f, indent=1)
  if _WRITE_DOCS.value:
    import docs_section

    docs_section.write("cpu_roofline", _report(peak, matmuls, cases))


def _report(peak: float, matmuls: list[dict], cases: list[dict]) -> str:
  xla = [row["xla_gflops"] for row in matmuls]
  torch = [row["torch_gflops"] for row in matmuls]
  lines = [
      "### The CPU roofline (bench/cpu_roofline.py)",
      "",
      f"`python bench/cpu_roofline.py --out_json=bench/results/cpu_roofline.json --write_docs`, after "
      f"bench/train_step.py (its fastest steps, `{_TRAIN_STEP_JSON.value}`). The best fp32 matmul rate on "
      f"the step's shapes is {peak:.0f} GFLOP/s (XLA {min(xla):.0f}-{max(xla):.0f}, torch "
      f"{min(torch):.0f}-{max(torch):.0f}); model FLOPs per step from `sora_jax.model.flops` (the "
      "backward's recomputed attention scores, which both sides compute, not counted).",
      "",
      f"| case | model GFLOP per step | s at {peak:.0f} GFLOP/s | torch: GFLOP/s (share of peak) | "
      f"sora_jax: GFLOP/s (share of peak) | ratio {steps.RATIO_GOAL} needs |",
      "|---|---|---|---|---|---|",
  ]
  out_of_reach = []
  for row in cases:
    if "sora_jax_gflops" not in row:
      continue
    lines.append(
        f"| {row['case']} | {row['train_gflop']:.0f} | {row['seconds_at_peak']:.2f} | "
        f"{row['diffusers_gflops']:.0f} ({row['diffusers_gflops'] / peak:.0%}) | "
        f"{row['sora_jax_gflops']:.0f} ({row['sora_jax_gflops'] / peak:.0%}) | "
        f"{row['gflops_needed_for_goal']:.0f} GFLOP/s ({row['share_of_peak_needed']:.0%}) |")
    if row["gflops_needed_for_goal"] > max(row["diffusers_gflops"], row["sora_jax_gflops"]):
      out_of_reach.append(row["case"])
  if out_of_reach:
    lines += ["", f"On {', '.join(out_of_reach)} the ratio goal needs a larger share of the matmul peak, "
              "held over the whole step (norms, softmax, RoPE and AdamW included), than either framework "
              "sustains on this machine."]
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
