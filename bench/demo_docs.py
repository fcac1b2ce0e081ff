"""The demo section of docs/benchmarks.md, rendered from a `make demo` run's summary.

`make demo` writes `DIR/demo_summary.json` (timings and scores of both stages); keep it as
bench/results/demo_cpu.json and render the section from it:

  cp demo_run/demo_summary.json bench/results/demo_cpu.json
  python bench/demo_docs.py [--summary=bench/results/demo_cpu.json] [--write_docs]
"""

from __future__ import annotations

import argparse
import json
import os

import docs_section  # bench/, beside this script
import flax.linen as nn

from sora_jax import config as config_lib
from sora_jax.model import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "bench", "results", "demo_cpu.json")
ATTRIBUTES = ("color", "background", "direction", "shape")


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.0f}%"


def _seconds(record, key) -> str:
  value = record["seconds"].get(key)
  return "skipped" if value is None else f"{value:.1f} s"


def _adherence_rows(weight_sets) -> list[str]:
  rows = []
  for name, entry in weight_sets.items():
    scores = entry["adherence"]
    shown = "EMA " + name.removeprefix("ema_") if name.startswith("ema_") else name
    cells = " | ".join(_pct(scores.get(a)) for a in ATTRIBUTES)
    rows.append(f"| {shown} | {entry['loss']:.4f} | {cells} |")
  return rows


def _continuation_rows(weight_sets) -> list[str]:
  rows = []
  for name, entry in weight_sets.items():
    shown = "EMA " + name.removeprefix("ema_") if name.startswith("ema_") else name
    for continued in entry.get("continuation", {}).values():
      k = continued["given_latent_frames"]
      what = f"{k} frame (image-to-video)" if k == 1 else f"{k} frames (extension)"
      cells = " | ".join(_pct(continued.get(a)) for a in ATTRIBUTES)
      rows.append(f"| {shown} | {what} | {cells} |")
  return rows


def render(record: dict) -> str:
  config = config_lib.load(os.path.join(REPO, record["config"]))
  model, train = config.model, config.train
  params = dit.count_params(nn.meta.unbox(dit.abstract_params(model)))
  frames, size = record.get("frames", config.data.buckets[0][0]), config.data.buckets[0][1]
  steps = record["step"]
  train_s = record["seconds"].get("train")
  rate = f" (~{steps / train_s:.1f} steps/s, compile included)" if train_s else ""
  targets = " / ".join(f"{100 * record['targets'][a]:.0f}" for a in ("color", "background", "direction"))
  header = "| weights | val loss | colour | background | direction | shape |\n|---|---|---|---|---|---|"
  given_header = "| weights | given | colour | background | direction | shape |\n|---|---|---|---|---|---|"
  lines = [
      "## Demo", "",
      "`make demo` (`python -m sora_jax.demo --config=configs/demo.py --out=DIR`) end to end, venv "
      "installed, fresh out dir, 2-core machine with nothing else running; the demo writes "
      "`DIR/demo_summary.json`, kept as `bench/results/demo_cpu.json` and rendered here by "
      f"`bench/demo_docs.py`. Model: {params:,} parameters (width {model.dim}, {model.num_layers} layers, "
      f"{model.num_heads} heads; patch {tuple(model.patch_size)}), batch {train.global_batch_size}, "
      f"{model.param_dtype}, {steps} steps, lr {train.learning_rate:g} `{train.schedule}`, training shift "
      f"{config.diffusion.shift:g} then {config.diffusion.final_shift:g} in the last "
      f"{100 * config.diffusion.final_shift_fraction:.0f}%, guidance {config.diffusion.guidance_scale:g}; "
      f"one clip in {round(1 / train.condition_prob)} trains with its first "
      f"{' or '.join(str(k) for k in train.condition_frames)} latent frames given.", "",
      "| stage | what | wall |", "|---|---|---|",
      f"| synthetic | {record.get('num_videos', '?')} videos, {frames} frames of {size}x{size} | "
      f"{_seconds(record, 'synthetic')} |",
      f"| prepare | the pixel-VAE and tiny-umT5 dataset | {_seconds(record, 'prepare')} |",
      f"| train | {steps} steps of {train.global_batch_size} clips{rate} | {_seconds(record, 'train')} |",
      f"| eval | val loss per sigma, text-to-video samples, continuations | {_seconds(record, 'eval')} |",
  ]
  stage2 = record.get("stage2")
  if stage2:
    s2_steps = stage2["step"]
    lines += [
        f"| synthetic, stage 2 | {stage2['num_videos']} videos, {stage2['frames']} frames | "
        f"{_seconds(record, 'synthetic_stage2')} |",
        f"| prepare, stage 2 | | {_seconds(record, 'prepare_stage2')} |",
        f"| train, stage 2 | {s2_steps} steps from step {stage2['started_from_step']} | "
        f"{_seconds(record, 'train_stage2')} |",
        f"| eval, stage 2 | | {_seconds(record, 'eval_stage2')} |"]
  lines += [f"| all | | {_seconds(record, 'all')} |", "",
            f"Text-to-video at step {steps} (one sample per prompt; chance: colour 20%, background 25%, "
            f"direction 25%, shape 33%; targets {targets}):", "", header,
            *_adherence_rows(record["weight_sets"]),
            "", "Continuation of held-out clips: the detector reads the generated frames only and compares "
            "them with the real clip:", "", given_header, *_continuation_rows(record["weight_sets"])]
  if stage2:
    first_s = sum(record["seconds"].get(k) or 0 for k in ("synthetic", "prepare", "train", "eval"))
    second_s = sum(record["seconds"].get(k) or 0 for k in
                   ("synthetic_stage2", "prepare_stage2", "train_stage2", "eval_stage2"))
    share = f" ({100 * second_s / first_s:.0f}% of the first stage's time)" if first_s else ""
    lines += ["", f"Stage 2, the recipe's next stage: clips of {stage2['frames']} frames, trained for "
              f"{stage2['step']} steps with `train.init_from` the first run (pinned to its step "
              f"{stage2['started_from_step']}){share}; scored on its own held-out "
              f"{stage2['frames']}-frame clips:", "", header, *_adherence_rows(stage2["weight_sets"]),
              "", given_header, *_continuation_rows(stage2["weight_sets"])]
  lines += ["", "How the recipe was found (the final shift, where the direction plateau ends, how colour "
            "is read, the configs tried before) is in "
            "[experiments/README.md](../experiments/README.md#the-demo-recipe)."]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--summary", default=DEFAULT)
  parser.add_argument("--write_docs", action="store_true")
  args = parser.parse_args()
  with open(args.summary, encoding="utf-8") as f:
    record = json.load(f)
  text = render(record)
  print(text)
  if args.write_docs:
    docs_section.write("demo", text)


if __name__ == "__main__":
  main()
