"""Quality of tile-sparse self-attention: dense against keep 0.5 and 0.25, each tile rule, equal steps.

Two settings, each run with the project's binaries exactly as a user runs them (synthetic videos ->
prepare -> train -> eval, one workdir per variant, the same data, seed and steps):

- `demo`: configs/demo.py (32 tokens per clip: 8 frames of 2 x 2 patches) in tiles of one frame, so a
  query frame attends 4 (keep 0.5) or 2 (keep 0.25) of the 8 frames; adherence is read where the short
  run learns it (colour and background; direction needs the demo's full 8000 steps).
- `wan_small`: a Wan-shaped DiT (RoPE only, 2x2 patches, head_dim 64, 4 layers, width 128) on 8 x 32 x 32
  clips: 512 tokens per clip in 16 tiles of 2 x 4 x 4.

Reports each variant's held-out loss (raw weights) over the eval's sigma grid and its adherence, into
bench/results/sparse_attention_cpu.json and docs/scaling.md ("Sparse attention: quality").

  python bench/sparse_attention_quality.py [--settings=demo,wan_small] [--variant="window_topk 0.5" ...]
                                           [--out=/tmp/sparse_ab] [--write_docs]

`--variant` (repeatable) runs only those variants of each setting and keeps the others' entries from the
results file, which must hold the same setting (config, steps, overrides: the same data, seed and steps,
so the rows stay comparable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import docs_section  # bench/, beside this script
from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JSON = os.path.join(_ROOT, "bench", "results", "sparse_attention_cpu.json")

_OUT = flags.DEFINE_string("out", "/tmp/sparse_attention_ab", "directory for the videos, datasets and runs")
_SETTINGS = flags.DEFINE_list("settings", ["demo", "wan_small"], "which settings to run")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, f"write {_JSON} and the docs section")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "rewrite the docs section from the results file")
_VARIANTS = flags.DEFINE_multi_string("variant", None, "run only this variant (repeatable; default: all); "
                                      "keep the others' results from the results file")

VARIANTS = {
    "dense": {},
    # The same dense model from another initialisation and noise draw: the spread between two dense runs
    # is the yardstick a sparse variant's difference is read against.
    "dense, seed 1": {"train.seed": 1},
    "window 0.5": {"model.sparse_attention_keep": 0.5, "model.sparse_attention_rule": "window"},
    "window 0.25": {"model.sparse_attention_keep": 0.25, "model.sparse_attention_rule": "window"},
    "topk 0.5": {"model.sparse_attention_keep": 0.5, "model.sparse_attention_rule": "topk"},
    "topk 0.25": {"model.sparse_attention_keep": 0.25, "model.sparse_attention_rule": "topk"},
    "window_topk 0.5": {"model.sparse_attention_keep": 0.5, "model.sparse_attention_rule": "window_topk"},
    "window_topk 0.25": {"model.sparse_attention_keep": 0.25, "model.sparse_attention_rule": "window_topk"},
}

SETTINGS = {
    "demo": {
        "config": "configs/demo.py", "size": 16, "frames": 8, "num_videos": 1200, "steps": 2000,
        "overrides": {"model.sparse_attention_tile": (1, 2, 2), "checkpoint.every_steps": 2000},
    },
    "wan_small": {
        "config": "configs/tiny.py", "size": 32, "frames": 8, "num_videos": 1200, "steps": 800,
        "overrides": {
            "model.dim": 128, "model.num_heads": 2, "model.ffn_dim": 512, "model.num_layers": 4,
            "model.sparse_attention_tile": (2, 4, 4), "data.buckets": ((8, 32, 32),),
            "data.image_buckets": (), "data.image_ratio": 0.0, "train.global_batch_size": 4,
            "eval.height": 32, "eval.width": 32, "checkpoint.every_steps": 800,
        },
    },
}


def _flag(key, value) -> str:
  text = repr(value).replace(" ", "") if isinstance(value, tuple) else str(value)
  return f"--config.{key}={text}"


def _run(argv: list[str]) -> float:
  start = time.time()
  print("+ python " + " ".join(argv), flush=True)
  subprocess.run([sys.executable, *argv], check=True, cwd=_ROOT)
  return time.time() - start


def _setting(name: str, out: str, previous: dict | None) -> dict:
  """The setting's results: the variants run (all, or --variants), the others kept from `previous`."""
  spec = SETTINGS[name]
  root = os.path.join(out, name)
  videos, dataset = os.path.join(root, "videos"), os.path.join(root, "dataset")
  base = [_flag(k, v) for k, v in spec["overrides"].items()]
  if not os.path.exists(os.path.join(videos, "captions.csv")):
    _run(["-m", "sora_jax.data.synthetic", f"--out={videos}", f"--num_videos={spec['num_videos']}",
          f"--frames={spec['frames']}", f"--size={spec['size']}"])
  _run(["-m", "sora_jax.prepare", f"--captions={videos}/captions.csv", f"--out={dataset}",
        f"--config={spec['config']}", "--noprogress", *base])
  overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in spec["overrides"].items()}
  if _VARIANTS.value and previous and (previous["config"], previous["steps"], previous["overrides"]) != (
      spec["config"], spec["steps"], json.loads(json.dumps(overrides))):
    raise app.UsageError(f"--variant: the results file's {name!r} setting was run with other settings; "
                         f"run every variant (no --variant)")
  results = {}
  sigma_grid = previous["sigma_grid"] if previous else None
  for variant, fields in VARIANTS.items():
    if _VARIANTS.value and variant not in _VARIANTS.value:
      if previous and variant in previous["variants"]:
        results[variant] = previous["variants"][variant]
      continue
    workdir = os.path.join(root, variant.replace(",", "").replace(" ", "_"))
    flags_ = [f"--config={spec['config']}", f"--workdir={workdir}", f"--config.data.dir={dataset}",
              f"--config.train.num_steps={spec['steps']}", *base, *(_flag(k, v) for k, v in fields.items())]
    result_path = os.path.join(workdir, "eval", f"{spec['steps']}.json")
    seconds = None
    if not os.path.exists(result_path):
      seconds = _run(["-m", "sora_jax.train", *flags_])
      _run(["-m", "sora_jax.eval", f"--step={spec['steps']}", *flags_])
    with open(result_path) as f:
      result = json.load(f)
    raw = result["weight_sets"]["raw"]
    adherence = {k: v for k, v in (raw.get("adherence") or {}).items() if k not in ("samples", "num_samples")}
    results[variant] = {"loss": raw["loss"], "loss_by_sigma": raw["loss_by_sigma"],
                        "adherence": adherence, "train_s": seconds}
    sigma_grid = result["sigma_grid"]
  return {"config": spec["config"], "steps": spec["steps"], "overrides": overrides,
          "sigma_grid": sigma_grid, "variants": results}


def _report(data: dict) -> str:
  lines = []
  for name, setting in data["settings"].items():
    grid = setting["sigma_grid"]
    picks = [i for i, s in enumerate(grid) if i in (0, len(grid) // 4, len(grid) // 2, 3 * len(grid) // 4,
                                                        len(grid) - 1)]
    attrs = [a for a in ("color", "background", "direction") if a in
             next(iter(setting["variants"].values()))["adherence"]]
    lines += [f"**{name}** (`{setting['config']}` + {json.dumps(setting['overrides'])}, "
              f"{setting['steps']} steps, raw weights):", "",
              "| variant | val loss | vs dense | " + " | ".join(f"σ={grid[i]:.2f}" for i in picks)
              + "".join(f" | {a}" for a in attrs) + " |",
              "|---|---:|---:|" + "---:|" * (len(picks) + len(attrs))]
    dense = setting["variants"].get("dense", {}).get("loss")
    for variant, entry in setting["variants"].items():
      row = [variant, f"{entry['loss']:.4f}", f"{entry['loss'] / dense - 1:+.1%}" if dense else "-"]
      row += [f"{entry['loss_by_sigma'][i]:.4f}" for i in picks]
      row += [f"{entry['adherence'][a]:.0%}" for a in attrs]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  lines.append("From `bench/sparse_attention_quality.py` "
               "(results: `bench/results/sparse_attention_cpu.json`).")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = sorted(set(_VARIANTS.value or ()) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variant {unknown}; expected some of {sorted(VARIANTS)}")
  if _REPORT_ONLY.value:
    with open(_JSON) as f:
      data = json.load(f)
  else:
    data = {"settings": {}}
    if os.path.exists(_JSON):
      with open(_JSON) as f:
        data = json.load(f)
    for name in _SETTINGS.value:
      data["settings"][name] = _setting(name, _OUT.value, data["settings"].get(name))
      print(_report({"settings": {name: data["settings"][name]}}), flush=True)
    if _WRITE_DOCS.value:
      with open(_JSON, "w") as f:
        json.dump(data, f, indent=1)
  print(_report(data))
  if _WRITE_DOCS.value:
    docs_section.write("sparse_attention_quality", _report(data), docs_section.SCALING)


if __name__ == "__main__":
  app.run(main)
