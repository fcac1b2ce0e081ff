"""Packed against bucketed training on a mixed-shape dataset: real tokens/s, clips/s and padding share.

Builds an in-memory dataset of the tiny config's latents in five shapes (videos of 64, 128 and 256
tokens, images of 16 and 32; data.image_ratio 0.3), then runs the real jitted train step on it fed by
the real pipeline, once bucketed (train.global_batch_size clips of one shape per step) and once packed
(rows of data.token_budget = the largest clip, first-fit). Both sides run back to back in this process
after warm-up steps that compile every shape; each timed repeat is `--steps` steps, and the report gives
the median with min and max. Real tokens are clip tokens (packing's padding excluded); padding share is
the fraction of the tokens the model computes on that are padding.

  python bench/packing.py [--steps=20] [--repeats=3] [--rows=8] [--out=bench/results/packing_cpu.json]
                          [--write_docs] [--from_results=bench/results/packing_cpu.json]

`--write_docs` puts the table in docs/data.md's `packing` section; `--from_results` renders a results file
without measuring.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import docs_section  # bench/, beside this script
import jax
import numpy as np
from absl import app, flags
from sora_jax.configs import tiny

from sora_jax import cli, patches
from sora_jax import config as config_lib
from sora_jax.data import pipeline
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import step as step_lib

_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per repeat")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats per mode (median, min, max reported)")
_ROWS = flags.DEFINE_integer("rows", 8, "clips per bucketed step, and packed rows per step")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                               "packing_cpu.json"), "where the JSON result goes")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "put the table in docs/data.md's packing section")
_FROM_RESULTS = flags.DEFINE_string("from_results", None, "render this results file instead of measuring")

VIDEO_BUCKETS = ((8, 16, 16), (8, 16, 32), (4, 16, 16))
IMAGE_BUCKETS = ((1, 16, 16), (1, 16, 32))
RECORDS_PER_BUCKET = 48


def build_config(packed: bool):
  config = tiny.get_config()
  config.data.buckets = VIDEO_BUCKETS
  config.data.image_buckets = IMAGE_BUCKETS
  config.data.image_ratio = 0.3
  config.data.read_threads = 1
  config.data.packing = packed
  config.data.max_segments = 16
  config.train.global_batch_size = _ROWS.value
  config.train.warmup_steps = 1
  token_counts = patches.bucket_tokens(config)
  config.data.token_budget = max(token_counts.values())
  config_lib.validate(config)
  return config


def make_source(config) -> list[dict]:
  rng = np.random.default_rng(0)
  records = []
  for bucket in (*VIDEO_BUCKETS, *IMAGE_BUCKETS):
    shape = patches.latent_shape(config, bucket)
    for _ in range(RECORDS_PER_BUCKET):
      text_embeds = np.zeros((config.data.text_len, config.model.text_dim), np.float16)
      text_embeds[:6] = rng.normal(size=(6, config.model.text_dim))
      records.append({"latents": rng.normal(size=shape).astype(np.float16), "text_embeds": text_embeds,
                      "text_len": np.int32(6), "is_image": bucket[0] == 1})
  return records


def _real_tokens(batch: dict, config) -> int:
  if "loss_mask" in batch:
    return int(batch["loss_mask"].sum())
  return patches.num_tokens(batch["latents"].shape[1:], config.model.patch_size) * batch["latents"].shape[0]


def _clips(batch: dict) -> int:
  if "segment_grid" in batch:
    return int((np.prod(batch["segment_grid"], axis=-1) > 0).sum())
  return batch["latents"].shape[0]


def measure(packed: bool, source: list[dict]) -> dict:
  config = build_config(packed)
  mesh = mesh_lib.create_mesh(config)
  trainable = step_lib.build(config, mesh)
  state = trainable.setup.init(jax.random.PRNGKey(0))
  iterator = iter(pipeline.make_dataset(config, source, process_index=0, process_count=1, seed=0,
                                        batch_size_per_process=_ROWS.value))
  shapes = set()

  def run(steps: int) -> tuple[float, int, int, int]:
    nonlocal state
    tokens = clips = padded = 0
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(iterator)
      shapes.add(batch["latents"].shape)
      tokens += _real_tokens(batch, config)
      clips += _clips(batch)
      padded += int(np.prod(batch["latents"].shape[:2])) if packed else 0
      state, metrics = trainable.train_step(
          state, pipeline.to_global(batch, mesh, trainable.batch_sharding))
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, tokens, clips, padded

  with sharding_lib.mesh_context(mesh, trainable.rules):
    # Warm up until every shape the stream yields has compiled (bucketed: one per bucket).
    for _ in range(6):
      run(5)
    compiled = len(shapes)
    repeats = []
    for _ in range(_REPEATS.value):
      seconds, tokens, clips, padded = run(_STEPS.value)
      repeats.append({"seconds": seconds, "tokens_per_s": tokens / seconds, "clips_per_s": clips / seconds,
                      "padding_share": 1 - tokens / padded if packed else 0.0})
  iterator.close()
  summary = {"mode": "packed" if packed else "bucketed", "compiled_shapes": compiled,
             "token_budget": int(config.data.token_budget) if packed else None, "repeats": repeats}
  for key in ("tokens_per_s", "clips_per_s", "padding_share"):
    values = [r[key] for r in repeats]
    summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
  return summary


def report(result: dict) -> str:
  """The docs/data.md section: how it was measured, the table, and packed over bucketed."""
  rows = result["results"]
  lines = [
      "`python bench/packing.py --write_docs` (results in `bench/results/packing_cpu.json`): the tiny "
      "config's real train step on a mixed-shape dataset (videos of 64, 128 and 256 tokens, images of 16 "
      f"and 32, image ratio 0.3), {result['rows_per_step']} clips or packed rows per step, "
      f"{result['steps_per_repeat']} steps per timed repeat, on {result['devices']} (load "
      f"{result['load_before']} -> {result['load_after']}).",
      "",
      "| mode | real tokens/s (median, min-max) | clips/s | padding share | compiled shapes |",
      "|---|---|---|---|---|",
  ]
  for row in rows:
    t, c, p = row["tokens_per_s"], row["clips_per_s"], row["padding_share"]
    lines.append(f"| {row['mode']} | {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | {c['median']:.1f} | "
                 f"{p['median']:.1%} | {row['compiled_shapes']} |")
  ratio = rows[1]["tokens_per_s"]["median"] / rows[0]["tokens_per_s"]["median"]
  lines += ["", f"Packed over bucketed, real tokens/s: {ratio:.2f}x."]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  if _FROM_RESULTS.value:
    with open(_FROM_RESULTS.value, encoding="utf-8") as f:
      result = json.load(f)
  else:
    result = _measure()
  text = report(result)
  print(text)
  if _WRITE_DOCS.value:
    docs_section.write("packing", text, docs_section.DATA)


def _measure() -> dict:
  cli.use_cpu_without_accelerator()
  load_before = os.getloadavg()[0]
  source = make_source(build_config(False))
  rows = [measure(False, source), measure(True, source)]
  result = {"load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "rows_per_step": _ROWS.value,
            "steps_per_repeat": _STEPS.value, "results": rows}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"written to {_OUT.value}")
  return result


if __name__ == "__main__":
  app.run(main)
