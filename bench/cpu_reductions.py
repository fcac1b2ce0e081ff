"""The scale gradients of a DiT block on the XLA CPU backend: autodiff of `x * scale` against
`sora_jax.model.layers.scale_features`, back to back in one process.

A norm's weight and a clip's modulation are broadcast over tokens; the gradient of such a scale is a
sum over the broadcast axes. Autodiff writes it as multiply + reduce, which XLA's CPU backend fuses
into a loop far slower than the same sum as a `dot_general`. Times one VJP (value, inputs' and
scale's gradients) per shape of bench/train_step.py's tiny and mid cases; median and min of
--repeats calls.

  python bench/cpu_reductions.py [--repeats=30] [--out_json=bench/results/cpu_reductions.json] [--write_docs]
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import docs_section  # noqa: E402  (bench/, beside this script)
import timing  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 30, "timed calls per shape and side")
_OUT_JSON = flags.DEFINE_string("out_json", None, "write the rows as JSON here")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace its section of docs/benchmarks.md")

# (what, inputs shape, scale shape): bench/train_step.py's mid (1 x 2048 tokens, width 512, 8 heads)
# and tiny (16 x 512 tokens, width 256, 4 heads) cases.
SHAPES = (
    ("mid: modulation over tokens", (1, 2048, 512), (1, 1, 512)),
    ("mid: norm weight", (1, 2048, 512), (512,)),
    ("mid: q/k norm weight over heads", (1, 2048, 8, 64), (8, 64)),
    ("tiny: modulation over tokens", (16, 512, 256), (16, 1, 256)),
    ("tiny: norm weight", (16, 512, 256), (256,)),
)


def _time(fn, *args) -> tuple[float, float]:
  import jax

  return timing.median_and_min(
      timing.time_calls(lambda: jax.block_until_ready(fn(*args)), _REPEATS.value))


def main(argv: list[str]) -> None:
  del argv
  import jax
  import numpy as np

  from sora_jax.model import layers

  load = os.getloadavg()
  rows = []
  for what, inputs_shape, scale_shape in SHAPES:
    rng = np.random.default_rng(0)
    inputs, cotangent = (jax.numpy.asarray(rng.standard_normal(inputs_shape), np.float32) for _ in range(2))
    scale = jax.numpy.asarray(rng.standard_normal(scale_shape), np.float32)
    row = {"what": what, "inputs": list(inputs_shape), "scale": list(scale_shape)}
    for side, product in (("autodiff", lambda x, s: x * s), ("scale_features", layers.scale_features)):
      vjp = jax.jit(lambda x, s, g, product=product: jax.vjp(product, x, s)[1](g))
      row[side] = dict(zip(("median_ms", "min_ms"), (1e3 * t for t in _time(vjp, inputs, scale, cotangent)),
                           strict=True))
    row["ratio"] = row["scale_features"]["median_ms"] / row["autodiff"]["median_ms"]
    rows.append(row)
    print(f"{what:34s} autodiff {row['autodiff']['median_ms']:7.3f} ms  scale_features "
          f"{row['scale_features']['median_ms']:7.3f} ms  ratio {row['ratio']:.3f}", flush=True)
  load_end = os.getloadavg()
  lines = [f"`python bench/cpu_reductions.py --out_json=bench/results/cpu_reductions.json --write_docs`: one "
           f"VJP of `x * scale` (value and both gradients), median of {_REPEATS.value} calls, one process, "
           f"{os.cpu_count()} CPUs, load {load[0]:.1f} -> {load_end[0]:.1f}.", "",
           "| scale | inputs | autodiff ms | `scale_features` ms | ratio |", "|---|---|---|---|---|"]
  lines += [f"| {r['what']} {tuple(r['scale'])} | {tuple(r['inputs'])} | {r['autodiff']['median_ms']:.3f} | "
            f"{r['scale_features']['median_ms']:.3f} | {r['ratio']:.3f} |" for r in rows]
  text = "\n".join(lines)
  print(text)
  if _OUT_JSON.value:
    import json

    with open(_OUT_JSON.value, "w") as f:
      json.dump({"load": [load[0], load_end[0]], "repeats": _REPEATS.value, "rows": rows}, f, indent=1)
  if _WRITE_DOCS.value:
    heading = "### Scale gradients on the CPU (bench/cpu_reductions.py)"
    docs_section.write("cpu_reductions", f"{heading}\n\n{text}")


if __name__ == "__main__":
  app.run(main)
