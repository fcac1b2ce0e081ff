"""Model FLOPs per training clip of the shipped Wan configs at their clip sizes (analytic: model/flops.py).

What one clip costs each model to train (forward + backward, no remat recompute: the FLOPs of MFU), its
tokens, and the share of its forward FLOPs in attention's score and value products (self and cross),
so the Wan2.2 TI2V-5B at 720p x 121 (16x VAE) sets against the Wan2.1 models at 480p / 720p x 81
(8x VAE). A two-expert model (Wan2.2 A14B) holds two DiTs; each clip trains one, so its FLOPs per clip
are one expert's. The numbers are what
`sora_jax.compile` reports as model FLOPs per step divided by the clips of the step.

  python bench/model_flops.py [--out_json=bench/results/model_flops.json] [--write_docs]
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import docs_section  # noqa: E402  (bench/, beside this script)

_OUT_JSON = flags.DEFINE_string("out_json", None, "write the rows as JSON here")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace its section of docs/scaling.md")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (config, clip frames x height x width)
ROWS = (("wan_1_3b", (81, 480, 832)), ("wan_14b", (81, 720, 1280)), ("wan2_2_ti2v_5b", (121, 704, 1280)),
        ("wan2_2_t2v_a14b", (81, 720, 1280)))


def main(argv: list[str]) -> None:
  del argv
  from sora_jax import config as config_lib
  from sora_jax import patches
  from sora_jax.model import dit, flops

  rows = []
  for name, clip in ROWS:
    config = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"))
    shape = patches.latent_shape(config, clip)
    parts = flops.flops_breakdown(config.model, shape, int(config.data.text_len))
    train = flops.train_flops_per_example(config.model, shape, int(config.data.text_len))
    forward = parts["embed"] + parts["blocks"] + parts["head"]
    rows.append({"config": name, "clip": list(clip), "latent": list(shape),
                 "tokens": patches.num_tokens(shape, config.model.patch_size),
                 "params": dit.count_params(dit.abstract_params(config.model)),
                 "experts": int(config.model.experts),
                 "train_flops": train, "attention_share": parts["attention"] / forward})
  text = _report(rows)
  print(text)
  if _OUT_JSON.value:
    with open(_OUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  if _WRITE_DOCS.value:
    docs_section.write("model_flops", text, docs_section.SCALING)


def _experts(row: dict) -> str:
  """"2 x " before the parameters of a two-expert model (a clip runs one of them)."""
  return f"{row['experts']} x " if row.get("experts", 1) > 1 else ""


def _report(rows: list[dict]) -> str:
  base = next(r for r in rows if r["config"] == "wan_14b")["train_flops"]
  lines = ["### Model FLOPs per training clip (bench/model_flops.py)", "",
           "| config | clip | latent (T', H', W', C) | tokens | parameters | PFLOP per clip (train) | "
           "attention share (self + cross scores and values) | vs wan_14b at 720p x 81 |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    frames, height, width = r["clip"]
    lines.append(f"| {r['config']} | {frames} x {height} x {width} | {tuple(r['latent'])} | "
                 f"{r['tokens']:,} | "
                 f"{_experts(r)}{r['params'] / 1e9:.2f} B | {r['train_flops'] / 1e15:.1f} | "
                 f"{r['attention_share']:.0%} | "
                 f"{r['train_flops'] / base:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
