"""Accelerator checks of the trainer's step: cudnn attention parity, bf16 train-step time and MFU.

Run on a machine with a GPU (one process, nothing else on the card):

  python bench/gpu_step.py --frames=33 --height=480 --width=832 --layers=30 --out=gpu_step.json
  # the 81-frame clip (21x60x104 latents = 32,760 tokens), 2 clips per step, remat policies incl. offload:
  python bench/gpu_step.py --frames=81 --batch=2 --skip_parity \
      --rows=cudnn:full,cudnn:offload,cudnn:dots_saveable,cudnn:offload_dots --out=gpu_step_81.json
  # dense against tile-sparse attention (a row's third field is model.sparse_attention_keep, its fourth
  # model.sparse_attention_rule, default window):
  python bench/gpu_step.py --frames=81 --batch=1 --skip_parity \
      --rows=cudnn:full,cudnn:full:0.5,cudnn:full:0.25,xla:full:0.25,xla:full:0.25:window_topk \
      --out=gpu_step_sparse.json

1. cudnn attention against the `xla` backend and the fp32 reference (forward and gradients, bf16
   inputs, with and without a packing segment mask).
2. The 1.3B Wan config's real train step (trainer assembly: `step.build`), `--batch` clips per step,
   for each (attention backend, remat policy[, sparse keep[, rule]]) row: compile time, median/min/max
   step time over the timed steps, model TFLOP/s and MFU against the device's dense bf16 peak
   (train/metrics.py table), peak device memory. A `cudnn` row with the `window` rule runs cuDNN under
   the tile mask (dense cost, so its MFU, which counts only the kept pairs' FLOPs, reads low); `xla`
   rows and the per-input rules run `tile_attention` (keep x the dense FLOPs). Rows that run out of
   memory are reported as such, not dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

import docs_section  # bench/, beside this script
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def attention_parity() -> list[dict[str, Any]]:
  import jax
  import jax.numpy as jnp

  from sora_jax.model import attention as attention_lib

  rows = []
  rng = np.random.default_rng(0)
  batch, tokens, heads, head_dim = 2, 1024, 12, 128
  shape = (batch, tokens, heads, head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
  d_out = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  segments = jnp.asarray(np.repeat(np.array([[1] * 700 + [2] * 300 + [0] * 24]), batch, axis=0), jnp.int32)
  for name, seg in (("no mask", None), ("segment mask", segments)):
    mask = attention_lib.segment_mask(seg, seg)

    def run(backend, q=q, k=k, v=v, seg=seg, mask=mask):
      def loss(q, k, v):
        if backend == "reference":
          out = attention_lib.reference_attention(
              q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
        else:
          out = attention_lib.attention(q, k, v, backend=backend, query_segment_ids=seg, kv_segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32) * d_out), out
      (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
      return [np.asarray(x, np.float32) for x in (out, *grads)]

    reference = run("reference")
    # Padding rows (segment 0) attend to nothing; compare only real query rows.
    valid = np.ones(tokens, bool) if seg is None else np.asarray(seg[0]) > 0
    for backend in ("xla", "cudnn"):
      try:
        result = run(backend)
      except Exception as e:  # noqa: BLE001 - report what the backend refused, keep going
        rows.append({"case": name, "backend": backend, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        continue
      errors = {}
      for label, got, want in zip(("out", "dq", "dk", "dv"), result, reference, strict=True):
        got, want = got[:, valid], want[:, valid]
        errors[label] = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-12))
      rows.append({"case": name, "backend": backend, "max_rel_err": errors})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def train_step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  import jax
  from sora_jax.configs import wan_1_3b

  from sora_jax import patches
  from sora_jax.model import attention as attention_lib
  from sora_jax.model import flops as flops_lib
  from sora_jax.model import sparse_attention as sparse_lib
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import metrics as metrics_lib
  from sora_jax.train import step as step_lib

  device = jax.devices()[0]
  peak = metrics_lib.peak_flops_per_device(device.device_kind)
  rows = []
  for spec in args.rows.split(","):
    backend, remat, *sparse = spec.split(":")
    keep = float(sparse[0]) if sparse else 1.0
    rule = sparse[1] if len(sparse) > 1 else "window"
    config = wan_1_3b.get_config()
    config.model.attention_backend = backend
    config.model.remat_policy = remat
    config.model.sparse_attention_keep = keep
    config.model.sparse_attention_rule = rule
    config.model.num_layers = args.layers
    config.train.global_batch_size = args.batch
    config.mesh.ici = (1, 1, 1, 1)
    latent = patches.latent_shape(config, (args.frames, args.height, args.width))
    tokens = int(np.prod([n // p for n, p in zip(latent[:3], config.model.patch_size, strict=True)]))
    layout = sparse_lib.model_plan(config.model, patches.grid(latent, config.model.patch_size))
    row: dict[str, Any] = {"backend": backend, "remat": remat, "sparse_attention_keep": keep,
                           "sparse_attention_rule": rule,
                           "kernel": attention_lib.sparse_kernel(backend, layout) if layout else backend,
                           "layers": args.layers, "batch": args.batch,
                           "latent": list(latent), "tokens": tokens, "device": device.device_kind}
    try:
      mesh = mesh_lib.create_mesh(config, [device])
      trainable = step_lib.build(config, mesh)
      state = trainable.setup.init(jax.random.PRNGKey(0))
      rng = np.random.default_rng(0)
      batch = jax.device_put({
          "latents": rng.standard_normal((args.batch, *latent), np.float32),
          "text_embeds": rng.standard_normal((args.batch, config.data.text_len, config.model.text_dim),
                                             np.float32)}, trainable.batch_sharding)
      start = time.perf_counter()
      compiled = trainable.train_step.lower(state, batch).compile()
      row["compile_s"] = round(time.perf_counter() - start, 1)
      for _ in range(2):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times = []
      for _ in range(args.steps):
        begin = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
      flops = args.batch * flops_lib.train_flops_per_example(config.model, latent, config.data.text_len)
      median = float(np.median(times))
      row.update(step_s_median=round(median, 4), step_s_min=round(min(times), 4),
                 step_s_max=round(max(times), 4), model_tflops_per_s=round(flops / median / 1e12, 1),
                 mfu=round(flops / median / peak, 3) if peak else None, loss=float(metrics["loss"]))
      stats = device.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        row["peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 1)
      del state, compiled, trainable
    except Exception as e:  # noqa: BLE001 - an OOM or unsupported row is a result too
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(json.dumps(row), flush=True)
    rows.append(row)
    jax.clear_caches()
  return rows


def _error_text(error: str) -> str:
  """An out-of-memory row's reason, from XLA's message."""
  match = re.search(r"allocate ([0-9.]+)\s*GiB", error)
  if "RESOURCE_EXHAUSTED" in error and match:
    return f"out of memory: XLA asked for {float(match.group(1)):.1f} GiB in one buffer"
  return " ".join(error.split())[:120]


def report(result: dict[str, Any], results_path: str) -> str:
  """The docs/benchmarks.md GPU section, every figure read from `result` (a results file)."""
  from sora_jax.train import metrics as metrics_lib

  args, rows = result["args"], result["train_step"]
  device = rows[0]["device"] if rows else result["device"]
  peak = metrics_lib.peak_flops_per_device(device) / 1e12
  first = rows[0]
  frames, (t, h, w, _) = args["frames"], first["latent"]
  lines = [f"## On an {device} (bench/gpu_step.py)", "",
           f"jax {result['jax']}, one process alone on the card. Raw output: `{results_path}`.", ""]
  if result.get("attention_parity"):
    lines += ["cudnn attention (`model.attention_backend=\"cudnn\"`) against the fp32 reference, bf16 "
              "inputs, forward and all three input gradients, max |error| / max |reference| over real "
              "(non-padding) query rows:", "", "| case | backend | out | dq | dk | dv |",
              "|---|---|---|---|---|---|"]
    for row in result["attention_parity"]:
      errors = row["max_rel_err"]
      lines.append(f"| {row['case']} | {row['backend']} | " + " | ".join(
          f"{errors[key]:.1e}" for key in ("out", "dq", "dk", "dv")) + " |")
    lines.append("")
  lines += [f"The trainer's own step (`step.build`: DiT, AdamW, EMA, clipping, flow-matching loss), "
            f"{first['layers']} layers, {args['batch']} clip(s) of {frames} frames at {args['height']}x"
            f"{args['width']} = {t}x{h}x{w} latents = {first['tokens']:,} tokens, bf16 compute, fp32 "
            f"parameters; {args['steps']} timed steps (median; min-max in the raw file); model FLOPs from "
            f"`model/flops.py` (remat not counted) against the card's {peak:,.0f} TFLOP/s dense bf16:", "",
            "| attention | remat | step s | model TFLOP/s | MFU | peak GiB | compile s |",
            "|---|---|---|---|---|---|---|"]
  for row in rows:
    keep, rule = row.get("sparse_attention_keep", 1.0), row.get("sparse_attention_rule", "window")
    kernel = row.get("kernel", "tile_attention")
    attention = row["backend"] + (f", sparse {rule} keep {keep:g} ({kernel})" if keep < 1 else "")
    if "error" in row:
      lines.append(f"| {attention} | {row['remat']} | {_error_text(row['error'])} | | | | "
                   f"{row.get('compile_s', '')} |")
    else:
      lines.append(f"| {attention} | {row['remat']} | {row['step_s_median']:.3f} | "
                   f"{row['model_tflops_per_s']:.0f} | {100 * row['mfu']:.1f}% | "
                   f"{row['peak_memory_gib']:.1f} | {row['compile_s']} |")
  timed = {(row["backend"], row["remat"]): row["step_s_median"] for row in rows
           if "error" not in row and row.get("sparse_attention_keep", 1.0) == 1.0}
  reading = []
  if ("cudnn", "full") in timed and ("xla", "full") in timed:
    reading.append(f"cudnn's fused attention takes {timed['cudnn', 'full'] / timed['xla', 'full']:.2f}x the "
                   f"xla backend's step time at {first['tokens']:,} tokens")
  if ("cudnn", "full") in timed and ("cudnn", "dots_saveable") in timed:
    ratio = timed["cudnn", "full"] / timed["cudnn", "dots_saveable"]
    reading.append(f"`remat_policy=\"full\"` takes {ratio:.2f}x dots_saveable's")
  lines += ["", "peak GiB is the process's high-water mark (`peak_bytes_in_use`), so a row can show an "
            "earlier row's peak."]
  if reading:
    lines += ["", "Reading: " + "; ".join(reading) + "."]
  lines += ["", "These rows predate the current backward pass and activation sharding rules: rerun "
            "`python bench/gpu_step.py --out=bench/results/gpu_step_<card>.json` when a GPU is lent, then "
            "`--from_results=... --write_docs`. `make test-gpu` (tests/test_gpu.py: cudnn attention parity "
            "with and without packing, a bf16 train step per attention backend) is the GPU check; the "
            "81-frame clip, batch > 1 and `remat_policy=\"offload\"` are this script's prepared cases "
            "(its docstring), not yet run on a GPU."]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=33)
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=832)
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rows", default="cudnn:full,xla:full,cudnn:dots_saveable,cudnn:none",
                      help="comma-separated backend:remat_policy rows")
  parser.add_argument("--skip_parity", action="store_true")
  parser.add_argument("--out", default=None)
  parser.add_argument("--from_results", default=None,
                      help="a results file: print (and with --write_docs put in docs/benchmarks.md) its "
                      "section, running nothing")
  parser.add_argument("--write_docs", action="store_true")
  args = parser.parse_args()
  if args.from_results:
    with open(args.from_results) as f:
      text = report(json.load(f), os.path.relpath(args.from_results, REPO))
    print(text)
    if args.write_docs:
      docs_section.write("gpu", text)
    return
  import jax

  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "args": vars(args)}
  print(json.dumps(result), flush=True)
  if not args.skip_parity:
    result["attention_parity"] = attention_parity()
  result["train_step"] = train_step_rows(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
