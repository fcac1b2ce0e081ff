"""Input pipeline throughput: batches/s and MB/s of sora_jax.data.pipeline against an in-memory ceiling.

Writes small temporary prepared datasets (tiny config; 1.3B-shaped bf16 records), reads them with the
real pipeline, and compares with a numpy loader that stacks the same records already in memory. For
the 1.3B shape it also estimates what the trainer consumes on an accelerator, from FLOPs.

The `mixture` row reads three datasets of the same shape as one weighted mixture (data.sources),
against the one-dataset in-process row: what drawing batches from several sources costs.

  python bench/data_pipeline.py [--records=64] [--repeats=3] [--write_docs]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import statistics
import tempfile
import time

import docs_section  # bench/, beside this script
import numpy as np
from absl import app, flags
from sora_jax.configs import tiny, wan_1_3b

from sora_jax import config as config_lib
from sora_jax.data import buckets, pipeline, schema
from sora_jax.model import flops as model_flops
from sora_jax.offline import tfds_builder
from sora_jax.train import metrics

_RECORDS = flags.DEFINE_integer("records", 64, "records per temporary dataset")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats per row (median, min, max reported)")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "minimum seconds per timed repeat")
_WORKERS = flags.DEFINE_integer("workers", 2, "data.worker_count of the multiprocess rows")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace the pipeline section of docs/benchmarks.md")
_JSON = flags.DEFINE_string(
    "json", None, "write the measured rows here (with --write_docs, default "
    "bench/results/data_pipeline_cpu.json)")
_CASES = flags.DEFINE_list("cases", ["tiny", "wan_1_3b"], "record shapes to measure")
_LOADERS = flags.DEFINE_list("loaders", ["ceiling", "in_process", "workers", "packed", "mixture"],
                             "loaders to measure")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the temporary datasets go (default: a temp dir)")
_MALLOC = flags.DEFINE_integer(
    "malloc_mmap_threshold_mb", None, "overrides data.malloc_mmap_threshold_mb (0 = glibc's default "
    "malloc; process-wide, so compare separate runs)")

_DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline_cpu.json")

# Accelerator assumption for the trainer's consumption estimate (stated in the output).
_PEAK_FLOPS = metrics.peak_flops_per_device("H100")
_MFU = 0.40
_DEVICES_PER_HOST = 8
_HEADROOM_GOAL = 5.0
_MIXTURE = (0.5, 0.3, 0.2)  # weights of the mixture row's three datasets


@dataclasses.dataclass
class Case:
  name: str
  config: object
  batch_size: int  # clips per process per batch
  text_tokens: int  # valid caption tokens per record


def _cases() -> list[Case]:
  small = tiny.get_config()
  small.data.image_ratio = 0.0
  large = wan_1_3b.get_config()
  # One bucket of 1.3B 480p clips: latents 21x60x104x16, text 512x4096, bf16 on disk.
  large.data.buckets = ((81, 480, 832),)
  large.data.image_buckets = ()
  large.data.image_ratio = 0.0
  cases = [Case("tiny", small, 16, small.data.text_len // 2),
           Case("wan_1_3b", large, 8, large.data.text_len)]
  unknown = set(_CASES.value) - {c.name for c in cases}
  if unknown:
    raise ValueError(f"--cases has unknown {sorted(unknown)}; expected tiny and/or wan_1_3b")
  return [c for c in cases if c.name in _CASES.value]


def _expand(latent_shape, text_len, text_tokens, text_dim, record_dtype, index):
  rng = np.random.default_rng(index)
  text_embeds = np.zeros((text_len, text_dim), np.float32)
  text_embeds[:text_tokens] = rng.standard_normal((text_tokens, text_dim), np.float32)
  record = dict(
      latents=rng.standard_normal(latent_shape, np.float32), text_embeds=text_embeds,
      text_len=text_tokens, caption=f"clip {index}", source=f"bench/{index}.mp4", clip_start_s=0.0,
      fps=16.0, num_frames=latent_shape[0], height=latent_shape[1], width=latent_shape[2],
      is_image=False)
  yield f"clip-{index:06d}", schema.encode(record, record_dtype)


def _write(case: Case, root: str, name: str | None = None) -> str:
  config = case.config
  table = buckets.bucket_table(config)
  out = os.path.join(root, name or case.name)
  expand = functools.partial(_expand, table[0].latent_shape, config.data.text_len, case.text_tokens,
                             config.model.text_dim, config.data.record_dtype)
  # As prepare does: the shape index comes with the dataset, so no reader scans the split.
  shapes = {f"clip-{index:06d}": (*table[0].latent_shape, 0) for index in range(_RECORDS.value)}
  tfds_builder.write_dataset(
      out, latent_channels=config.model.in_channels, text_dim=config.model.text_dim,
      record_dtype=config.data.record_dtype, splits={"train": (list(range(_RECORDS.value)), expand)},
      metadata={"schema_version": schema.SCHEMA_VERSION}, num_shards=4,
      latent_shapes={"train": shapes})
  return out


def _batch_bytes(batch) -> int:
  return sum(v.nbytes for v in batch.values())


def _clips(batch) -> int:
  """Clips in a batch: one per example, or one per segment of each packed row."""
  if "segment_ids" in batch:
    return int(batch["segment_ids"].max(axis=1).sum())
  return len(batch["latents"])


def _time(next_batch, min_seconds: float) -> tuple[float, float, float, float]:
  """(batches/s, clips/s, output MB/s, CPU ms per clip of this process) over >= `min_seconds`.

  CPU time counts every thread of this process (not worker processes): unlike wall time it does
  not depend on how busy the machine is, so it says how many cores a given clip rate needs.
  """
  next_batch()  # warm: threads / workers start, first epoch plan
  count, clips, nbytes = 0, 0, 0
  start, cpu_start = time.perf_counter(), time.process_time()
  while count < 5 or time.perf_counter() - start < min_seconds:
    batch = next_batch()
    nbytes += _batch_bytes(batch)
    clips += _clips(batch)
    count += 1
  elapsed = time.perf_counter() - start
  cpu = time.process_time() - cpu_start
  return count / elapsed, clips / elapsed, nbytes / elapsed / 1e6, 1e3 * cpu / clips


def _numpy_ceiling(case: Case, data_dir: str):
  """The same batches from records decoded into memory: only stack + float32 conversion remain."""
  source = schema.open_split(data_dir, "train")
  records = [schema.decode(source[i]) for i in range(len(source))]
  order = np.random.default_rng(0).permutation(len(records))
  position = 0

  def next_batch():
    nonlocal position
    picked = [records[order[(position + k) % len(records)]] for k in range(case.batch_size)]
    position += case.batch_size
    return {"latents": np.stack([r["latents"] for r in picked]).astype(np.float32),
            "text_embeds": np.stack([r["text_embeds"] for r in picked]).astype(np.float32)}

  return next_batch


def _pipeline(case: Case, data_dir: str | list[tuple[str, float]], worker_count: int,
              packing: bool = False):
  config = case.config.copy_and_resolve_references()
  config.data.worker_count = worker_count
  if _MALLOC.value is not None:
    config.data.malloc_mmap_threshold_mb = _MALLOC.value
  if packing:
    config.data.packing = True
    config.data.token_budget = 2 * buckets.bucket_table(config)[0].num_tokens
  iterator = pipeline.make_iterator(config, data_dir, "train", process_index=0, process_count=1,
                                    seed=0, batch_size_per_process=case.batch_size)
  return iterator


def _mixture_dirs(case: Case, data_dir: str, root: str) -> list[tuple[str, float]]:
  """(dir, weight) of the mixture row: `data_dir` and two more datasets of the case."""
  dirs = [data_dir] + [_write(case, root, f"{case.name}_source{index}") for index in range(1, len(_MIXTURE))]
  return list(zip(dirs, _MIXTURE, strict=True))


def _trainer_clips_per_s(case: Case) -> tuple[float, float]:
  """(FLOPs per training clip, clips/s one host of accelerators consumes) at the stated MFU."""
  bucket = buckets.bucket_table(case.config)[0]
  flops = model_flops.train_flops_per_example(case.config.model, bucket.latent_shape,
                                              int(case.config.data.text_len))
  step_s = flops / (_PEAK_FLOPS * _MFU)
  return flops, _DEVICES_PER_HOST / step_s


def _summary(values: list[float]) -> str:
  return f"{statistics.median(values):9.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv):
  del argv
  load = os.getloadavg()
  cores = os.cpu_count()
  print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {cores} CPUs")
  if load[0] > cores:
    print("warning: the machine is busy; numbers are lower bounds and noisy")
  root = _WORKDIR.value or tempfile.mkdtemp(prefix="sora_bench_data_")
  rows = []
  try:
    for case in _cases():
      config_lib.validate(case.config)
      start = time.perf_counter()
      data_dir = _write(case, root)
      print(f"{case.name}: wrote {_RECORDS.value} records in {time.perf_counter() - start:.1f}s")
      # The mixture's other datasets are written before any timing, as the first one was.
      sources = _mixture_dirs(case, data_dir, root) if "mixture" in _LOADERS.value else []
      mixture = lambda c=case, m=sources: _pipeline(c, m, 0)
      loaders = {
          "ceiling": ("numpy in-memory (ceiling)", lambda c=case, d=data_dir: _numpy_ceiling(c, d)),
          "in_process": ("pipeline, in-process", lambda c=case, d=data_dir: _pipeline(c, d, 0)),
          "workers": (f"pipeline, {_WORKERS.value} workers",
                      lambda c=case, d=data_dir: _pipeline(c, d, _WORKERS.value)),
          "packed": ("pipeline, packed", lambda c=case, d=data_dir: _pipeline(c, d, 0, packing=True)),
          "mixture": (f"pipeline, {len(_MIXTURE)}-source mixture", mixture),
      }
      for key in _LOADERS.value:
        if key not in loaders:
          raise ValueError(f"--loaders has unknown {key!r}; expected some of {sorted(loaders)}")
        name, make = loaders[key]
        rates, clips, mbs, cpu_ms, start_s = [], [], [], [], []
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          loader = make()
          start_s.append(time.perf_counter() - start)
          next_batch = loader.__next__ if hasattr(loader, "get_state") else loader
          rate, clip_rate, mb, cpu = _time(next_batch, _SECONDS.value)
          rates.append(rate)
          clips.append(clip_rate)
          mbs.append(mb)
          cpu_ms.append(cpu)
          if hasattr(loader, "close"):
            loader.close()
        rows.append((case, name, rates, clips, mbs, cpu_ms, start_s))
        print(f"  {name:28s} {_summary(rates)} batches/s {_summary(clips)} clips/s {_summary(mbs)} MB/s "
              f"{statistics.median(cpu_ms):.1f} CPU ms/clip, start-up {statistics.median(start_s):.2f} s")
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(root, ignore_errors=True)
  text = _report(rows, load)
  print(text)
  json_path = _JSON.value or (_DEFAULT_JSON if _WRITE_DOCS.value else None)
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"load_start": load, "load_end": os.getloadavg(), "records": _RECORDS.value,
                 "seconds_per_repeat": _SECONDS.value,
                 "rows": [{"case": case.name, "batch_size": case.batch_size, "loader": name,
                           "batches_per_s": rates, "clips_per_s": clips, "mb_per_s": mbs,
                           "cpu_ms_per_clip": cpu, "start_up_s": start}
                          for case, name, rates, clips, mbs, cpu, start in rows]}, f, indent=1)
    print(f"wrote {json_path}")
  if _WRITE_DOCS.value:
    docs_section.write("data_pipeline", f"## Input pipeline (bench/data_pipeline.py)\n\n{text}")


def _report(rows, load) -> str:
  lines = [
      "| records | loader | batch | batches/s median [min, max] | clips/s median [min, max] | "
      "output MB/s median [min, max] | CPU ms/clip (this process) | start-up s |",
      "|---|---|---|---|---|---|---|---|"]
  pipeline_rates = {}
  for case, name, rates, clip_rates, mbs, cpu_ms, start_s in rows:
    batch = f"{case.batch_size} rows" if "packed" in name else f"{case.batch_size} clips"
    cpu = "(in workers)" if "workers" in name else f"{statistics.median(cpu_ms):.1f}"
    # The ceiling's start-up is decoding every record into memory: not comparable, so not shown.
    start = "-" if "ceiling" in name else f"{statistics.median(start_s):.2f}"
    lines.append(f"| {case.name} | {name} | {batch} | {_summary(rates).strip()} | "
                 f"{_summary(clip_rates).strip()} | {_summary(mbs).strip()} | {cpu} | {start} |")
    if name == "pipeline, in-process":
      pipeline_rates[case.name] = (case, statistics.median(clip_rates), statistics.median(cpu_ms))
  lines.append("")
  lines.append(f"Machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start and "
               f"{os.getloadavg()[0]:.1f} at the end; {_REPEATS.value} repeats "
               f"of >= {_SECONDS.value:.0f} s each. Start-up: `make_iterator` to the iterator (opening "
               f"the split, its shape index and the plan), median.")
  mixture_rows = [(case, statistics.median(c)) for case, name, _, c, _, _, _ in rows if "mixture" in name]
  for case, clips in mixture_rows:
    if case.name in pipeline_rates:
      one = pipeline_rates[case.name][1]
      lines.append("")
      lines.append(
          f"Mixture, {case.name}: {len(_MIXTURE)} datasets at weights {list(_MIXTURE)} deliver "
          f"{clips:.1f} clips/s against {one:.1f} from one dataset in the same run "
          f"({clips / one:.2f}x).")
  if "wan_1_3b" in pipeline_rates:
    case, clips, cpu_ms = pipeline_rates["wan_1_3b"]
    flops, needed = _trainer_clips_per_s(case)
    lines.append("")
    lines.append(
        f"Trainer demand, 1.3B at 480p x 81 frames (32760 tokens/clip): {flops:.2e} training FLOPs per "
        f"clip (`sora_jax.model.flops`, as bench/model_flops.py counts it), on H100 "
        f"({_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16) at "
        f"{_MFU:.0%} MFU = {flops / (_PEAK_FLOPS * _MFU):.2f} s per clip per GPU, so one host of "
        f"{_DEVICES_PER_HOST} GPUs consumes {needed:.2f} clips/s. The in-process pipeline on this "
        f"machine delivers {clips:.1f} clips/s: {clips / needed:.1f}x headroom "
        f"(goal >= {_HEADROOM_GOAL:.0f}x). Load-independent: at {cpu_ms:.0f} CPU ms per clip the "
        f"host's {needed:.2f} clips/s take {needed * cpu_ms / 1e3:.2f} cores, so "
        f"{_HEADROOM_GOAL:.0f}x headroom needs {_HEADROOM_GOAL * needed * cpu_ms / 1e3:.2f} cores "
        f"(data.read_threads / data.worker_count).")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
