"""Tile-sparse attention's speed on this CPU: `tile_attention` at keep 0.5 and 0.25 against dense
`xla_chunked`, forward + backward of self-attention over one clip's tokens, in the same process.

The clip is 8 x 32 x 32 patch tokens (8,192) in (2, 8, 8) tiles (64 tiles of 128 tokens), 8 heads of
64; the cases are timed interleaved (dense, 0.5, 0.25, then again) so they share the machine's load.
The ratio against dense is the figure: the sparse kernel's FLOPs are keep x dense.

  python bench/sparse_attention_speed.py [--repeats=5] [--write_docs]
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import docs_section  # noqa: E402  (bench/, beside this script)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "interleaved rounds")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "write the results file and the docs section")
_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sparse_attention_speed_cpu.json")

GRID, TILE, HEADS, HEAD_DIM = (8, 32, 32), (2, 8, 8), 8, 64
CASES = (("dense (xla_chunked)", 1.0), ("tile-sparse, keep 0.5", 0.5), ("tile-sparse, keep 0.25", 0.25))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from sora_jax.model import attention as attention_lib
  from sora_jax.model import sparse_attention as sparse_lib

  tokens = int(np.prod(GRID))
  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.standard_normal((1, tokens, HEADS, HEAD_DIM)), jnp.float32) for _ in range(4))
  steps = {}
  for name, keep in CASES:
    layout = sparse_lib.plan(GRID, TILE, keep, "window")

    def loss(q, k, v, layout=layout):
      if layout is None:
        return jnp.sum(attention_lib.attention(q, k, v, backend="xla_chunked") * w)
      tiled = [sparse_lib.to_tiles(layout, x) for x in (q, k, v)]
      out = attention_lib.attention(*tiled, backend="xla", sparse=layout)
      return jnp.sum(sparse_lib.from_tiles(layout, out) * w)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    steps[name] = step
  times = {name: [] for name in steps}
  for round_ in range(_REPEATS.value):
    for name in (list(steps) if round_ % 2 == 0 else list(steps)[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(steps[name](q, k, v))
      times[name].append(time.perf_counter() - start)
  dense = statistics.median(times[CASES[0][0]])
  rows = [{"case": name, "keep": keep, "median_s": statistics.median(times[name]),
           "vs_dense": statistics.median(times[name]) / dense} for name, keep in CASES]
  text = report(rows)
  print(text)
  if _WRITE_DOCS.value:
    with open(_JSON, "w") as f:
      json.dump({"grid": GRID, "tile": TILE, "heads": HEADS, "head_dim": HEAD_DIM, "rows": rows}, f, indent=1)
    docs_section.write("sparse_attention_speed", text)


def report(rows) -> str:
  lines = ["### Tile-sparse attention on the CPU (bench/sparse_attention_speed.py)", "",
           f"Self-attention forward + backward over one clip of {GRID[0]}x{GRID[1]}x{GRID[2]} patch tokens "
           f"({int(np.prod(GRID)):,}), {HEADS} heads of {HEAD_DIM}, tiles of {TILE} "
           "(`bench/sparse_attention_speed.py`, one CPU process, cases interleaved):", "",
           "| attention | median s | vs dense | time per FLOP vs dense |", "|---|---:|---:|---:|"]
  lines += [f"| {row['case']} | {row['median_s']:.3f} | {row['vs_dense']:.2f}x | "
            f"{row['vs_dense'] / row['keep']:.2f}x |" for row in rows]
  lines += ["", "`tile_attention` computes keep x the dense FLOPs, in 128 x 128 products per kept "
            "tile with a gather of its keys and a scatter-add of their gradients; on XLA:CPU that costs "
            "more per FLOP than the dense key-blocked kernel's large products (the last column), so it "
            "gains only where few tiles are kept. No GPU was at hand to time it there "
            "(bench/gpu_step.py has the rows)."]
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
