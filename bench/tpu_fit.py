"""The shipped Wan configs on TPU slices, compiled ahead of time on this CPU host: the docs/scaling.md table.

For each of configs/wan_1_3b.py and configs/wan_14b.py (their mesh, remat and host-held state as
shipped), one bucket of 81 frames at 480p (480x832) or 720p (720x1280), and each topology, searches by
compiles for the largest global batch one step holds (multiples of the data x fsdp mesh size) and
reports that step: memory per chip by category, host memory, FLOPs per step with remat recompute,
and the step-time lower bound at the chip's bf16 peak. Needs libtpu (the `[tpu]` extra), not a TPU.

  python bench/tpu_fit.py [--topologies=v5p-8,v5p-64,v6e-256] [--limit=64] [--out=bench/results/tpu_fit.json]
"""

import argparse
import dataclasses
import json
import os
import sys
import time

from sora_jax.main import compile as compile_binary

compile_binary._quiet_libtpu()  # noqa: SLF001 - the binary's own libtpu settings for a CPU host

from sora_jax import aot  # noqa: E402
from sora_jax import config as config_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}


def _config(name: str, bucket: tuple[int, int, int], batch: int):
  config = config_lib.load(os.path.join(REPO, "configs", f"{name}.py"))
  config.data.buckets = (bucket,)
  config.data.image_buckets = ()
  config.data.image_ratio = 0.0
  config.train.global_batch_size = batch
  config.train.grad_accum_steps = 1
  return config


def _largest_fitting(name, bucket, devices, topology, hbm_gib, limit):
  """(largest fitting report or None, {batch: fits}) by doubling from one clip per data x fsdp shard."""
  config = _config(name, bucket, len(devices))
  sizes = config_lib.mesh_shape(config, len(devices))
  divisor = sizes["data"][0] * sizes["data"][1] * sizes["fsdp"][0] * sizes["fsdp"][1]
  tried, best, batch = {}, None, divisor
  while batch <= max(limit, divisor):
    report = aot.compile_train_step(_config(name, bucket, batch), devices, topology, hbm_gib)
    tried[batch] = report.fits
    print(f"  {name} {bucket} {topology} batch {batch}: {report.total_gib:.1f} GiB, "
          f"{'fits' if report.fits else 'does not fit'} ({report.compile_s:.0f} s)", flush=True)
    if not report.fits:
      if best is None:
        best = report  # the smallest batch, to show what it would need
      break
    best, batch = report, batch * 2
  return best, tried


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topologies", default="v5p-8,v5p-64,v6e-256")
  parser.add_argument("--configs", default="wan_1_3b,wan_14b")
  parser.add_argument("--resolutions", default="480p,720p")
  parser.add_argument("--limit", type=int, default=64, help="largest global batch to try")
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "tpu_fit.json"))
  args = parser.parse_args()
  rows = []
  for topology_name in args.topologies.split(","):
    topology, devices, hbm_gib = aot.topology_devices(topology_name)
    for name in args.configs.split(","):
      for resolution in args.resolutions.split(","):
        start = time.time()
        report, tried = _largest_fitting(name, RESOLUTIONS[resolution], devices, topology, hbm_gib,
                                         args.limit)
        row = {"config": name, "resolution": resolution, "topology": topology_name,
               "tried": {str(k): v for k, v in tried.items()}, "seconds": round(time.time() - start),
               "report": {k: v for k, v in dataclasses.asdict(report).items() if k != "oom"},
               "oom": report.oom[:200], "fits": report.fits, "total_gib": report.total_gib,
               "step_time_lower_bound_s": report.step_time_lower_bound_s}
        rows.append(row)
        with open(args.out, "w") as f:
          json.dump(rows, f, indent=1)
  print(table(rows))


def table(rows) -> str:
  lines = ["| config | clip | topology | max batch / step | per chip GiB (params, opt, EMA, temporaries) | "
           "host GiB / chip | PFLOP / step (with remat) | step time >= |",
           "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    r = row["report"]
    fitting = [int(b) for b, ok in row["tried"].items() if ok]
    state = r["state_gib"]
    part = lambda key, state=state: next((f"{v:.1f}{' host' if k.endswith('(host)') else ''}"
                                          for k, v in state.items() if k.startswith(key)), "0")
    if fitting:
      memory = (f"{row['total_gib']:.1f} of {r['hbm_gib']:.0f} ({part('params')}, {part('opt_state')}, "
                f"{part('ema')}, {r['temp_gib']:.1f})")
      bound = f"{row['step_time_lower_bound_s']:.1f} s"
      flops = f"{r['hardware_flops_per_step'] / 1e15:,.0f}"
      batch = str(max(fitting))
      if max(fitting) == max(int(b) for b in row["tried"]):
        batch = f">= {batch} (search limit)"
    else:
      memory = f"does not fit: {row['total_gib']:.0f} GiB at {min(int(b) for b in row['tried'])} clips"
      bound = flops = "-"
      batch = "0"
    host = f"{r['host_gib']:.0f} of {r['host_capacity_gib']:.0f}" if r["host_gib"] else "-"
    lines.append(f"| {row['config']} | {row['resolution']} x 81 | {row['topology']} | {batch} | {memory} | "
                 f"{host} | {flops} | {bound} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--table":
    with open(sys.argv[2]) as f:
      print(table(json.load(f)))
  else:
    main()
