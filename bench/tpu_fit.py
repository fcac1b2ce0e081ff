"""The Wan configs on TPU slices, compiled ahead of time on this CPU host: the fit tables of the docs.

Eight studies, each a results file in bench/results/ and a table (needs libtpu, the `[tpu]` extra, not
a TPU):

- `--study=slices` (docs/scaling.md): for configs/wan_1_3b.py and configs/wan_14b.py as shipped (mesh,
  remat, host-held state), one bucket of 81 frames at 480p (480x832) or 720p (720x1280), and each
  topology, the largest global batch one step holds (doubling from one clip per data x fsdp shard)
  and that step: memory per chip by category, host memory, FLOPs with remat recompute, and the
  step-time lower bound at the chip's bf16 peak. bench/results/tpu_fit.json.
- `--study=backends` (docs/benchmarks.md): wan_1_3b at 480p x 81 on a v5p-32 with each attention
  backend, one clip per chip over fsdp 16, then one clip over fsdp 4 x context 4 (context
  parallelism). bench/results/tpu_fit_backends.json.
- `--study=memory` (docs/scaling.md): the 14B on a v5p-8 at 4 clips per step, one config field at a
  time from everything on the device to what ships. bench/results/tpu_fit_memory.json.
- `--study=targets` (docs/benchmarks.md): what `python -m sora_jax.compile --config=configs/NAME.py`
  reports for each shipped config on its mesh.target_topology, and the 14B on a v5p-8 at 4 clips.
  bench/results/tpu_fit_targets.json.
- `--study=recipe` (docs/recipe.md): the same report for each stage of the staged Wan2.1-1.3B recipe
  (configs/wan_1_3b_stage*.py). bench/results/tpu_fit_recipe.json.
- `--study=lora` (docs/scaling.md): the 14B on a v5p-8 at 720p, fully fine-tuned as shipped against
  rank-64 LoRA (fp32 and bf16 frozen weights). bench/results/tpu_fit_lora.json.
- `--study=sparse` (docs/scaling.md): the 14B on a v5p-8 at 720p, 4 clips, dense against tile-sparse
  self-attention (keep 0.5 and 0.25, two tile shapes): model FLOPs and memory.
  bench/results/tpu_fit_sparse.json.
- `--study=eval` (docs/scaling.md): eval's sampler on a v5p-8 (`python -m sora_jax.compile --eval`): the
  14B and the 1.3B at their eval sizes with their raw and EMA weights, one prompt per batch shard (the
  default) against larger calls. bench/results/tpu_fit_eval.json.

  python bench/tpu_fit.py [--topologies=v5p-8,v5p-64,v6e-256] [--limit=64]
  python bench/tpu_fit.py --study=backends --write_docs
  python bench/tpu_fit.py --study=targets --write_docs
  python bench/tpu_fit.py --study=memory --write_docs
  python bench/tpu_fit.py --study=recipe --write_docs
  python bench/tpu_fit.py --study=lora --write_docs
  python bench/tpu_fit.py --study=sparse --write_docs
  python bench/tpu_fit.py --study=eval --write_docs
"""

import argparse
import dataclasses
import json
import os
import time

from sora_jax.main import compile as compile_binary

compile_binary._quiet_libtpu()  # noqa: SLF001 - the binary's own libtpu settings for a CPU host

import docs_section  # noqa: E402  (bench/, beside this script)

from sora_jax import config as config_lib  # noqa: E402
from sora_jax import tpu_fit  # noqa: E402
from sora_jax.parallel import mesh as mesh_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280),
               # Wan2.2 TI2V's clips: 121 frames at 704x1280 (a multiple of its VAE's 16 x patch 2)
               "720p121": (121, 704, 1280)}


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
  sizes = mesh_lib.resolved_sizes(config, len(devices))
  divisor = sizes["data"][0] * sizes["data"][1] * sizes["fsdp"][0] * sizes["fsdp"][1]
  tried, best, batch = {}, None, divisor
  while batch <= max(limit, divisor):
    report = tpu_fit.compile_train_step(_config(name, bucket, batch), devices, topology, hbm_gib)
    tried[batch] = report.fits
    print(f"  {name} {bucket} {topology} batch {batch}: {report.total_gib:.1f} GiB, "
          f"{'fits' if report.fits else 'does not fit'} ({report.compile_s:.0f} s)", flush=True)
    if not report.fits:
      if best is None:
        best = report  # the smallest batch, to show what it would need
      break
    best, batch = report, batch * 2
  return best, tried


# (topology, mesh.ici as (data, fsdp, context, tensor), global batch, attention backend)
BACKEND_ROWS = tuple(("v5p-32", (1, 16, 1, 1), 16, backend) for backend in ("xla", "xla_chunked", "splash")) \
    + tuple(("v5p-32", (1, 4, 4, 1), 4, backend) for backend in ("xla", "xla_chunked", "ring", "all_to_all"))
# (config, topology or None for its mesh.target_topology, global batch or None for the config's,
#  train field overrides)
TARGET_ROWS = (("wan_1_3b", None, None, {}), ("wan_14b", None, None, {}), ("wan_14b", "v5p-8", 4, {}),
               ("wan2_2_ti2v_5b", None, None, {}), ("wan2_2_t2v_a14b", None, None, {}),
               ("wan2_2_t2v_a14b", "v5p-8", 4, {}),
               # Fine-tuning one expert: the other frozen, without AdamW moments or EMA.
               ("wan2_2_t2v_a14b", "v5p-8", 4, {"train_experts": ("low",)}))
# The staged Wan2.1-1.3B recipe (docs/recipe.md), each stage on its config's target topology.
RECIPE_ROWS = (("wan_1_3b_stage1_256px", None, None, {}), ("wan_1_3b_stage2_480p", None, None, {}),
               ("wan_1_3b_stage3_720p", None, None, {}))

# LoRA on the 14B (docs/scaling.md): full fine-tuning as shipped against rank-64 adapters on frozen
# weights (what train.init_from names is never read by a compile), at 720p x 81 on a v5p-8.
_LORA = {"lora_rank": 64, "init_from": "/pretrained/Wan2.1-T2V-14B"}
LORA_ROWS = (("wan_14b", "v5p-8", 4, {}),
             ("wan_14b", "v5p-8", 4, _LORA),
             ("wan_14b", "v5p-8", 4, {**_LORA, "lora_base_dtype": "bfloat16"}),
             ("wan_14b", "v5p-8", 4, {**_LORA, "lora_base_dtype": "bfloat16",
                                      "host_state": ("opt_state", "frozen")}),
             ("wan_14b", "v5p-8", 8, {**_LORA, "lora_base_dtype": "bfloat16"}))

# Tile-sparse self-attention on the 14B (docs/scaling.md): dense as shipped against keep 0.5 and 0.25 of
# the key tiles, at 720p x 81 on a v5p-8, 4 clips per step: `window` (splash skips its blocks), and
# `window_topk` on `tile_splash` and on the XLA `tile_attention` it replaces on TPU.
_SPARSE = {"model.sparse_attention_rule": "window"}
_PER_INPUT = {"model.sparse_attention_rule": "window_topk", "model.sparse_attention_keep": 0.25,
              "model.sparse_attention_tile": (3, 16, 16)}
SPARSE_ROWS = (("wan_14b", "v5p-8", 4, {}),
               ("wan_14b", "v5p-8", 4, {**_SPARSE, "model.sparse_attention_keep": 0.5}),
               ("wan_14b", "v5p-8", 4, {**_SPARSE, "model.sparse_attention_keep": 0.25}),
               ("wan_14b", "v5p-8", 4, {**_SPARSE, "model.sparse_attention_keep": 0.25,
                                        "model.sparse_attention_tile": (3, 16, 16)}),
               ("wan_14b", "v5p-8", 4, _PER_INPUT),
               ("wan_14b", "v5p-8", 4, {**_PER_INPUT, "model.attention_backend": "xla"}))

# Eval's sampler (docs/scaling.md): one call of eval.sample_batch_size prompts at the config's eval size
# with its raw and EMA weights held, on a v5p-8: the default (one prompt per batch shard) against larger
# calls up to the shipped 36-prompt suite in one call. (config, topology, eval.sample_batch_size)
EVAL_ROWS = (("wan_14b", "v5p-8", 0), ("wan_14b", "v5p-8", 8), ("wan_14b", "v5p-8", 16),
             ("wan_14b", "v5p-8", 36), ("wan_1_3b", "v5p-8", 0), ("wan_1_3b", "v5p-8", 36))

# wan_14b on a v5p-8, 4 clips per step: (what changes, remat_policy, train.host_state, train.ema_decays)
# (what changes, remat_policy, train.host_state, train.ema_decays, model.residual_dtype, global batch)
MEMORY_ROWS = (
    ("`remat_policy=\"full\"`, everything on the device", "full", (), (0.9999,), "float32", 4),
    ("`remat_policy=\"offload\"`: each block's input in host memory until its recompute", "offload", (),
     (0.9999,), "float32", 4),
    ("+ `train.host_state=(\"opt_state\",)`: AdamW moments in host memory", "offload",
     ("opt_state",), (0.9999,), "float32", 4),
    ("+ `train.host_state=(\"ema\", \"opt_state\")` with two EMA trees", "offload", ("ema", "opt_state"),
     (0.999, 0.9999), "float32", 4),
    ("+ `model.residual_dtype=\"bfloat16\"`: the stream between blocks (and so each offloaded block "
     "input) in bf16 (what ships)", "offload", ("opt_state",), (0.9999,), "bfloat16", 4),
    ("the same at 8 clips per step", "offload", ("opt_state",), (0.9999,), "bfloat16", 8),
    ("8 clips per step with the fp32 stream", "offload", ("opt_state",), (0.9999,), "float32", 8),
)


def _row(report, **fields) -> dict:
  return {**fields, "report": {k: v for k, v in dataclasses.asdict(report).items() if k != "oom"},
          "oom": report.oom[:200], "fits": report.fits, "total_gib": report.total_gib,
          "step_time_lower_bound_s": report.step_time_lower_bound_s}


def backends_study() -> list[dict]:
  rows = []
  for topology_name, ici, batch, backend in BACKEND_ROWS:
    topology, devices, hbm_gib = tpu_fit.topology_devices(topology_name)
    config = _config("wan_1_3b", RESOLUTIONS["480p"], batch)
    config.mesh.ici = ici
    config.model.attention_backend = backend
    report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
    print(f"  {backend} {ici}: {report.argument_gib:.2f} + {report.temp_gib:.2f} GiB "
          f"({report.compile_s:.0f} s)", flush=True)
    rows.append(_row(report, config="wan_1_3b", resolution="480p", topology=topology_name, backend=backend,
                     global_batch=batch, remat=config.model.remat_policy,
                     ema_trees=len(config.train.ema_decays)))
  return rows


def targets_study(target_rows=TARGET_ROWS) -> list[dict]:
  rows = []
  for name, topology_name, batch, overrides in target_rows:
    config = config_lib.load(os.path.join(REPO, "configs", f"{name}.py"))
    for key, value in overrides.items():  # "group.field", or a train field
      group, field = key.split(".") if "." in key else ("train", key)
      config[group][field] = value
    if batch is not None:
      config.train.global_batch_size, config.train.grad_accum_steps = batch, 1
    topology_name = topology_name or config.mesh.target_topology
    topology, devices, hbm_gib = tpu_fit.topology_devices(topology_name)
    report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
    print(f"  {name} on {topology_name}: {report.total_gib:.1f} GiB ({report.compile_s:.0f} s)", flush=True)
    rows.append(_row(report, config=name, topology=topology_name, overrides=_overrides_text(overrides),
                     global_batch=int(config.train.global_batch_size),
                     grad_accum_steps=int(config.train.grad_accum_steps), remat=config.model.remat_policy,
                     host_state=list(config.train.host_state), ema_trees=len(config.train.ema_decays),
                     bucket=list(max(config.data.buckets, key=lambda b: b[0] * b[1] * b[2]))))
  return rows


def eval_study() -> list[dict]:
  rows = []
  for name, topology_name, size in EVAL_ROWS:
    config = config_lib.load(os.path.join(REPO, "configs", f"{name}.py"))
    config.eval.sample_batch_size = size
    _, devices, hbm_gib = tpu_fit.topology_devices(topology_name)
    report = tpu_fit.compile_eval_sampler(config, devices, hbm_gib)
    print(f"  {name} on {topology_name}, {report.prompts_per_call} prompts: {report.total_gib:.1f} GiB "
          f"({report.compile_s:.0f} s)", flush=True)
    rows.append({"config": name, "topology": topology_name, "sample_batch_size": size,
                 "report": {k: v for k, v in dataclasses.asdict(report).items() if k != "oom"},
                 "oom": report.oom[:200], "fits": report.fits, "total_gib": report.total_gib})
  return rows


def eval_table(rows) -> str:
  lines = ["| config on a v5p-8 | eval sample size | eval.sample_batch_size: prompts per call | per chip: "
           "weight sets + sampler (GiB) | result | compile |", "|---|---|---|---|---|---|"]
  for row in rows:
    r = row["report"]
    frames, height, width = r["pixel_shape"]
    held = r["weight_sets"] * r["weight_set_gib"]
    size = f"{row['sample_batch_size']} ({r['prompts_per_call']})" if not row["sample_batch_size"] else str(
        r["prompts_per_call"])
    result = (f"fits ({row['total_gib']:.1f} of {r['hbm_gib']:.0f})" if row["fits"]
              else f"does not fit ({row['total_gib']:.1f} of {r['hbm_gib']:.0f}: XLA's request)")
    lines.append(f"| {row['config']} | {frames} x {height}x{width}, {r['steps']} steps | {size} | "
                 f"{held:.2f} + {row['total_gib'] - held:.2f} | {result} | {r['compile_s']:.0f} s |")
  return "\n".join(lines)


def _overrides_text(overrides: dict) -> str:
  return ", ".join(f"{key if '.' in key else 'train.' + key}={value!r}" for key, value in overrides.items())


def memory_study() -> list[dict]:
  rows = []
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5p-8")
  for change, remat, host_state, ema_decays, residual, batch in MEMORY_ROWS:
    config = config_lib.load(os.path.join(REPO, "configs", "wan_14b.py"))
    config.train.global_batch_size, config.train.grad_accum_steps = batch, 1
    config.model.remat_policy, config.model.residual_dtype = remat, residual
    config.train.host_state, config.train.ema_decays = host_state, ema_decays
    report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
    print(f"  {change}: {report.total_gib:.1f} GiB, host {report.host_gib:.1f} ({report.compile_s:.0f} s)",
          flush=True)
    rows.append(_row(report, config="wan_14b", topology="v5p-8", change=change, global_batch=batch))
  return rows


def memory_table(rows) -> str:
  lines = ["| step (wan_14b, 720x1280 x 81 on a v5p-8) | clips per step | per chip: args + temps (GiB) | "
           "compile |", "|---|---|---|---|"]
  for row in rows:
    fit = _fit_text(row)
    if row["oom"]:
      fit = f"XLA asks for {row['total_gib']:.0f} of {row['report']['hbm_gib']:.0f}: does not fit"
    lines.append(f"| {row['change']} | {row.get('global_batch', 4)} | {fit} | "
                 f"{row['report']['compile_s']:.0f} s |")
  return "\n".join(lines)


def _mesh_text(report: dict) -> str:
  return " x ".join(f"{axis} {size}" for axis, size in report["mesh_shape"].items() if size > 1)


def _fit_text(row: dict) -> str:
  r = row["report"]
  text = f"{r['argument_gib']:.2f} + {r['temp_gib']:.2f} = {row['total_gib']:.1f} of {r['hbm_gib']:.0f}"
  text += ": fits" if row["fits"] else ": does not fit"
  if r["host_gib"]:
    text += f"; host {r['host_gib']:.1f} of {r['host_capacity_gib']:.0f}"
  return text


def backends_table(rows) -> str:
  lines = ["| attention backend | topology | mesh | global batch | per chip: args + temps (GiB) | compile |",
           "|---|---|---|---|---|---|"]
  lines += [f"| `{row['backend']}` | {row['topology']} | {_mesh_text(row['report'])} | "
            f"{row['global_batch']} | {_fit_text(row)} | {row['report']['compile_s']:.0f} s |"
            for row in rows]
  return "\n".join(lines)


def targets_table(rows) -> str:
  lines = ["| config | topology | mesh | global batch (micro x accum) | per chip: args + temps (GiB) | "
           "held: params / Adam / EMA (GiB) | model TFLOP per step (with remat) | step time >= | compile |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    r, accum = row["report"], row["grad_accum_steps"]
    held = " / ".join(next((f"{v:.2f}{' (host)' if k.endswith('(host)') else ''}"
                            for k, v in r["state_gib"].items() if k.startswith(key)), "0")
                      for key in ("params", "opt_state", "ema"))
    frames, height, width = row["bucket"]
    bound = row["step_time_lower_bound_s"]
    lines.append(
        f"| {row['config']}{_with(row)}, {height}x{width} x {frames} | {row['topology']} | "
        f"{_mesh_text(r)}; remat "
        f"`{row['remat']}` | {row['global_batch']} ({row['global_batch'] // accum} x {accum}) | "
        f"{_fit_text(row)} | {held} | {r['model_flops_per_step'] / 1e12:,.0f} "
        f"({r['hardware_flops_per_step'] / 1e12:,.0f}) | {f'{bound:.1f} s' if bound else '-'} | "
        f"{r['compile_s']:.0f} s |")
  return "\n".join(lines)


def lora_table(rows) -> str:
  lines = ["| wan_14b, 720x1280 x 81 on a v5p-8 | global batch | per chip: args + temps (GiB) | held: "
           "trained params / Adam / EMA / frozen (GiB) | compile |", "|---|---|---|---|---|"]
  for row in rows:
    r = row["report"]
    held = " / ".join(next((f"{v:.2f}{' (host)' if k.endswith('(host)') else ''}"
                            for k, v in r["state_gib"].items() if k.startswith(key)), "-")
                      for key in ("params", "opt_state", "ema", "frozen"))
    shown = row["overrides"].replace(f", train.init_from={_LORA['init_from']!r}", "")
    what = f"LoRA ({shown})" if shown else "full fine-tuning (as shipped)"
    lines.append(f"| {what} | {row['global_batch']} | {_fit_text(row)} | {held} | {r['compile_s']:.0f} s |")
  return "\n".join(lines)


def sparse_table(rows) -> str:
  lines = ["| wan_14b, 720x1280 x 81 on a v5p-8, 4 clips | self-attention | model TFLOP per step "
           "(vs dense) | per chip: args + temps (GiB) | step time >= | compile |",
           "|---|---|---|---|---|---|"]
  dense = rows[0]["report"]["model_flops_per_step"]
  for row in rows:
    r = row["report"]
    what = r.get("sparse_attention") or "dense (as shipped)"
    bound = row["step_time_lower_bound_s"]
    lines.append(f"| {row['overrides'] or '-'} | {what} | {r['model_flops_per_step'] / 1e12:,.0f} "
                 f"({r['model_flops_per_step'] / dense:.0%}) | {_fit_text(row)} | "
                 f"{f'{bound:.1f} s' if bound else '-'} | {r['compile_s']:.0f} s |")
  return "\n".join(lines)


def _with(row: dict) -> str:
  return f" ({row['overrides']})" if row.get("overrides") else ""


def _run_study(study: str, out: str, write_docs: bool, from_results: bool) -> None:
  study_rows, table_of = {"backends": (backends_study, backends_table),
                          "targets": (targets_study, targets_table),
                          "memory": (memory_study, memory_table),
                          "recipe": (lambda: targets_study(RECIPE_ROWS), targets_table),
                          "lora": (lambda: targets_study(LORA_ROWS), lora_table),
                          "sparse": (lambda: targets_study(SPARSE_ROWS), sparse_table),
                          "eval": (eval_study, eval_table)}[study]
  if from_results:
    with open(out) as f:
      rows = json.load(f)
  else:
    rows = study_rows()
    with open(out, "w") as f:
      json.dump(rows, f, indent=1)
  text = table_of(rows)
  print(text)
  if write_docs:
    page = {"memory": docs_section.SCALING, "recipe": docs_section.RECIPE,
            "lora": docs_section.SCALING, "sparse": docs_section.SCALING,
            "eval": docs_section.SCALING}.get(study, docs_section.DOCS)
    docs_section.write(f"tpu_fit_{study}", text, page)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topologies", default="v5p-8,v5p-64,v6e-256")
  parser.add_argument("--configs", default="wan_1_3b,wan_14b")
  parser.add_argument("--resolutions", default="480p,720p")
  parser.add_argument("--limit", type=int, default=64, help="largest global batch to try")
  parser.add_argument("--study", default="slices",
                      choices=("slices", "backends", "targets", "memory", "recipe", "lora", "sparse", "eval"))
  parser.add_argument("--write_docs", action="store_true",
                      help="replace the study's table in docs/benchmarks.md (backends, targets) or "
                      "docs/scaling.md (memory, slices)")
  parser.add_argument("--out", default=None, help="results JSON; default bench/results/tpu_fit[_STUDY].json")
  parser.add_argument("--from_results", action="store_true",
                      help="print (and --write_docs) the table of --out's saved rows, compiling nothing")
  args = parser.parse_args()
  suffix = "" if args.study == "slices" else f"_{args.study}"
  args.out = args.out or os.path.join(REPO, "bench", "results", f"tpu_fit{suffix}.json")
  if args.study != "slices":
    _run_study(args.study, args.out, args.write_docs, args.from_results)
    return
  if args.from_results:
    with open(args.out) as f:
      rows = json.load(f)
    print(table(rows))
    _write_slices(args, rows)
    return
  rows = []
  for topology_name in args.topologies.split(","):
    topology, devices, hbm_gib = tpu_fit.topology_devices(topology_name)
    for name in args.configs.split(","):
      for resolution in args.resolutions.split(","):
        start = time.time()
        report, tried = _largest_fitting(name, RESOLUTIONS[resolution], devices, topology, hbm_gib,
                                         args.limit)
        rows.append(_row(report, config=name, resolution=resolution, topology=topology_name,
                         tried={str(k): v for k, v in tried.items()}, seconds=round(time.time() - start)))
        with open(args.out, "w") as f:
          json.dump(rows, f, indent=1)
  print(table(rows))
  _write_slices(args, rows)


def _write_slices(args, rows) -> None:
  """--write_docs for the slices study: its table in docs/scaling.md, under the results file's name."""
  if args.write_docs:
    docs_section.write(os.path.splitext(os.path.basename(args.out))[0], table(rows), docs_section.SCALING)


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
    frames = RESOLUTIONS[row["resolution"]][0]
    resolution = row["resolution"].removesuffix(str(frames))
    lines.append(f"| {row['config']} | {resolution} x {frames} | {row['topology']} | {batch} | {memory} | "
                 f"{host} | {flops} | {bound} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
