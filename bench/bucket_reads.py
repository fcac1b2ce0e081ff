"""Reading a prepared dataset straight from a bucket (gs://) against reading it from local disk.

Writes the temporary datasets of bench/data_pipeline.py, uploads each to a local GCS JSON API server
(fake-gcs-server, from the [test] extra) and reads both copies with the real pipeline (in-process and
with worker processes). The server is on loopback: the ratio shows what the bucket path costs in the
client (one HTTP range read per record, metadata lookups), not a real bucket's network latency, which
adds to every record read and is hidden only by read threads and workers.

  python bench/bucket_reads.py [--records=32] [--repeats=3] [--write_docs]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import data_pipeline  # bench/, beside this script: datasets, loaders and timing
import docs_section
from absl import app, flags

from sora_jax import config as config_lib
from sora_jax.files import paths

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import gcs_emulator  # noqa: E402 - tests/, the emulator the bucket tests use

_WRITE = flags.DEFINE_bool("write_bucket_docs", False,
                           "replace the bucket_reads section of docs/benchmarks.md")
_OUT = flags.DEFINE_string("bucket_json", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "bucket_reads_cpu.json"), "results file")


def _measure(case, data_dir: str, workers: int) -> dict[str, float]:
  clips, mbs, starts = [], [], []
  for _ in range(data_pipeline._REPEATS.value):
    start = time.perf_counter()
    loader = data_pipeline._pipeline(case, data_dir, workers)
    starts.append(time.perf_counter() - start)
    _, clip_rate, mb, _ = data_pipeline._time(loader.__next__, data_pipeline._SECONDS.value)
    clips.append(clip_rate)
    mbs.append(mb)
    loader.close()
  return {"clips_per_s": statistics.median(clips), "clips_per_s_min": min(clips),
          "clips_per_s_max": max(clips), "mb_per_s": statistics.median(mbs),
          "start_s": statistics.median(starts)}


def main(argv):
  del argv
  load = os.getloadavg()
  print(f"load average {load[0]:.2f} on {os.cpu_count()} CPUs")
  root = tempfile.mkdtemp(prefix="sora_bench_bucket_")
  rows = []
  try:
    with gcs_emulator.running() as server:
      os.environ.update(server.environment())
      bucket = server.make_bucket("bench")
      for case in data_pipeline._cases():
        config_lib.validate(case.config)
        local = data_pipeline._write(case, root)
        remote = f"{bucket}/{case.name}"
        paths.upload_tree(local, remote)
        for workers in (0, data_pipeline._WORKERS.value):
          measured = {where: _measure(case, path, workers) for where, path in (("local", local),
                                                                                ("bucket", remote))}
          ratio = measured["bucket"]["clips_per_s"] / measured["local"]["clips_per_s"]
          rows.append({"case": case.name, "workers": workers, **{f"{where}_{key}": round(value, 3)
                       for where, values in measured.items() for key, value in values.items()},
                       "bucket_over_local": round(ratio, 3)})
          print(json.dumps(rows[-1]))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  result = {"bench": "bucket_reads", "records": data_pipeline._RECORDS.value, "cpus": os.cpu_count(),
            "load_average": round(load[0], 2), "rows": rows}
  text = _report(result)
  print(text)
  if _WRITE.value:
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    docs_section.write("bucket_reads", text)


def _report(result) -> str:
  lines = [
      "## A dataset read from a bucket (bench/bucket_reads.py)",
      "",
      f"The pipeline reading the same prepared dataset ({result['records']} records) from local disk and "
      "from a local GCS JSON API server (fake-gcs-server on loopback), on this "
      f"{result['cpus']}-CPU machine; clips/s is the median of the repeats. Loopback has no network "
      "latency: the ratio is the client's own cost per record (an HTTP range read each). On a real "
      "bucket each read also waits a round trip, which data.read_threads and worker processes overlap. "
      f"Raw rows: `bench/results/bucket_reads_cpu.json`.",
      "",
      "| record shape | loader | local clips/s | bucket clips/s | bucket / local | bucket MB/s "
      "| bucket start-up s |",
      "|---|---|---|---|---|---|---|",
  ]
  for row in result["rows"]:
    loader = "in-process" if row["workers"] == 0 else f"{row['workers']} workers"
    lines.append(f"| {row['case']} | {loader} | {row['local_clips_per_s']:.1f} "
                 f"| {row['bucket_clips_per_s']:.1f} | {row['bucket_over_local']:.2f} "
                 f"| {row['bucket_mb_per_s']:.0f} | {row['bucket_start_s']:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
