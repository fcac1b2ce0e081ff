"""The attention backward's key-major products on the XLA CPU backend: dV = P^T dO and dK = dS^T Q as
one contraction against `sora_jax.model.xla_attention.key_major_product`, back to back in one process.

Both contract the rows of the [Nq, Nk] scores, which XLA:CPU hands to a transposed-GEMM path far
below its plain matmul rate; `key_major_product` computes (dO^T P)^T instead. Times the product alone
and the whole `xla` attention (forward + backward, the trainer's per-clip / per-head loop) with each
form, at bench/train_step.py's mid (1 x 2048 tokens, 8 heads of 64) and tiny (16 x 512 tokens, 4
heads of 64) shapes and at 4,096 tokens (`xla_chunked`); median and min of --repeats calls.

  python bench/cpu_attention.py [--repeats=20] [--out_json=bench/results/cpu_attention.json] [--write_docs]
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import docs_section  # noqa: E402  (bench/, beside this script)
import timing  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 20, "timed calls per case and side")
_OUT_JSON = flags.DEFINE_string("out_json", None, "write the rows as JSON here")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace its section of docs/benchmarks.md")

# (label, scores shape, operand shape) of one product, as the per-head / per-clip loops see it.
PRODUCTS = (
    ("mid: one head, 2048 tokens", (1, 1, 2048, 2048), (1, 1, 2048, 64)),
    ("tiny: one clip, 4 heads x 512 tokens", (1, 4, 512, 512), (1, 4, 512, 64)),
)
# (label, attention backend, [B, N, H, Dh]) of a whole attention's forward and backward.
ATTENTIONS = (
    ("mid: xla, 1 x 2048 tokens x 8 heads", "xla", (1, 2048, 8, 64)),
    ("tiny: xla, 16 x 512 tokens x 4 heads", "xla", (16, 512, 4, 64)),
    ("xla_chunked, 1 x 4096 tokens x 8 heads", "xla_chunked", (1, 4096, 8, 64)),
)


def _time(fn, *args) -> tuple[float, float]:
  import jax

  return timing.median_and_min(
      timing.time_calls(lambda: jax.block_until_ready(fn(*args)), _REPEATS.value))


def _one_contraction(scores, operand):
  import jax.numpy as jnp

  return jnp.einsum("bhqk,bhqd->bhkd", scores, operand, preferred_element_type=jnp.float32)


def main(argv: list[str]) -> None:
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sora_jax.model import attention, xla_attention

  load = os.getloadavg()
  rng = np.random.default_rng(0)
  rows = []
  for label, scores_shape, operand_shape in PRODUCTS:
    scores = jnp.asarray(rng.standard_normal(scores_shape), jnp.float32)
    operand = jnp.asarray(rng.standard_normal(operand_shape), jnp.float32)
    flop = 2 * np.prod(scores_shape) * operand_shape[-1]
    plain = _time(jax.jit(_one_contraction), scores, operand)
    ours = _time(jax.jit(xla_attention.key_major_product), scores, operand)
    rows.append({"what": "product", "case": label, "one_contraction_s": plain, "key_major_s": ours,
                 "gflops": (flop / plain[1] / 1e9, flop / ours[1] / 1e9)})
  for label, backend, shape in ATTENTIONS:
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))

    def grads(backend=backend, cotangent=cotangent):  # a new function per side: jit caches by function
      return jax.jit(jax.grad(
          lambda *qkv: jnp.sum(attention.attention(*qkv, backend=backend) * cotangent), argnums=(0, 1, 2)))

    ours = _time(grads(), q, k, v)
    key_major = xla_attention.key_major_product
    xla_attention.key_major_product = _one_contraction  # the backward's products as one contraction
    try:
      plain = _time(grads(), q, k, v)
    finally:
      xla_attention.key_major_product = key_major
    rows.append({"what": "attention", "case": label, "one_contraction_s": plain, "key_major_s": ours})
  for row in rows:
    print(f"{row['case']:<42} one contraction {row['one_contraction_s'][1] * 1e3:8.2f} ms   "
          f"key-major {row['key_major_s'][1] * 1e3:8.2f} ms  (min)", flush=True)
  load_after = os.getloadavg()
  if _OUT_JSON.value:
    import json

    with open(_OUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"load_before": load[0], "load_after": load_after[0], "rows": rows}, f, indent=1)
  if _WRITE_DOCS.value:
    docs_section.write("cpu_attention", _report(rows, load[0], load_after[0]))


def _report(rows: list[dict], load_before: float, load_after: float) -> str:
  lines = [
      "### The attention backward's key-major products on the CPU (bench/cpu_attention.py)",
      "",
      "dV = P^T dO and dK = dS^T Q contract the rows of the [Nq, Nk] scores. As one contraction XLA:CPU "
      "runs them on its transposed-GEMM path; `xla_attention.key_major_product` computes (dO^T P)^T with "
      "the small operand and result transposed. Forward + backward rows time the whole `xla` "
      f"attention with each form. {_REPEATS.value} calls each, one process, load {load_before:.1f} -> "
      f"{load_after:.1f}.",
      "",
      "| case | one contraction, ms median [min] | key-major, ms median [min] | speed-up (min) |",
      "|---|---|---|---|",
  ]
  for row in rows:
    plain, ours = row["one_contraction_s"], row["key_major_s"]
    label = row["case"] + (" (product)" if row["what"] == "product" else " (forward + backward)")
    rate = ""
    if "gflops" in row:
      rate = f" ({row['gflops'][0]:.0f} -> {row['gflops'][1]:.0f} GFLOP/s)"
    lines.append(f"| {label} | {plain[0] * 1e3:.2f} [{plain[1] * 1e3:.2f}] | {ours[0] * 1e3:.2f} "
                 f"[{ours[1] * 1e3:.2f}] | {plain[1] / ours[1]:.2f}x{rate} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
