"""LoRA against full fine-tuning on this CPU: step time, held state and the compiled step's memory.

One wan-shaped small DiT (the `mid` size of bench/steps.py's comparison: width 512, 8 layers) on one
CPU device, the same batch for each mode: full fine-tuning, rank-16 adapters on the attention and FFN
projections with fp32 frozen weights, and the same with bf16 frozen weights. The modes are timed
interleaved (A B C, then C B A, ...) so they share whatever else loads the machine.

  python bench/lora_step.py [--repeats=5] [--write_docs]
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import docs_section  # noqa: E402  (bench/, beside this script)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from sora_jax.configs import tiny  # noqa: E402

from sora_jax import config as config_lib  # noqa: E402
from sora_jax.model import dit  # noqa: E402
from sora_jax.parallel import mesh as mesh_lib  # noqa: E402
from sora_jax.train import state as state_lib  # noqa: E402
from sora_jax.train import step as step_lib  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "interleaved rounds")
_STEPS = flags.DEFINE_integer("steps_per_round", 2, "timed steps per mode per round")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "write bench/results/lora_cpu.json and the docs section")
_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lora_cpu.json")

MODES = (("full fine-tuning", {}),
         ("LoRA r=16, fp32 frozen", {"lora_rank": 16}),
         ("LoRA r=16, bf16 frozen", {"lora_rank": 16, "lora_base_dtype": "bfloat16"}))


def _config(overrides):
  config = tiny.get_config()
  m = config.model
  m.dim, m.num_heads, m.ffn_dim, m.num_layers, m.text_dim = 512, 8, 2048, 8, 64
  config.data.buckets, config.data.image_buckets = ((8, 32, 32),), ()
  config.data.text_len = 32
  config.train.global_batch_size = 2
  config.train.ema_decays = (0.999,)
  config.mesh.ici = (1, 1, 1, 1)
  if overrides:
    config.train.update(init_from="/frozen", **overrides)
  config_lib.validate(config, 1)
  return config


def _mode(name, overrides):
  config = _config(overrides)
  mesh = mesh_lib.create_mesh(config, jax.devices()[:1])
  trainable = step_lib.build(config, mesh)
  state = trainable.setup.init(jax.random.PRNGKey(0))
  frozen = ()
  if trainable.frozen is not None:
    weights = dit.init_params(config.model, jax.random.PRNGKey(1), (2, 16, 16, config.model.in_channels), 8)
    frozen = (state_lib.place_frozen(weights, trainable.frozen),)
  rng = np.random.default_rng(0)
  latent = (2, 2, 16, 16, config.model.in_channels)  # the latents of 2 clips of 8x32x32 pixels
  batch = {"latents": rng.standard_normal(latent).astype(np.float32),
           "text_embeds": rng.standard_normal((2, 32, 64)).astype(np.float32)}
  compiled = trainable.train_step.lower(state, batch, *frozen).compile()
  memory = compiled.memory_analysis()
  held = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20
  info = {"mode": name, "trained_params": dit.count_params(state.params),
          "state_mib": held((state.params, state.opt_state, state.ema)),
          "frozen_mib": held(frozen), "temp_mib": memory.temp_size_in_bytes / 2**20}

  def run(count):
    nonlocal state
    for _ in range(count):
      state, metrics = compiled(state, batch, *frozen)
    jax.block_until_ready(metrics["loss"])

  run(2)  # warm
  return info, run


def main(argv):
  del argv
  modes = [_mode(name, overrides) for name, overrides in MODES]
  times = {info["mode"]: [] for info, _ in modes}
  for round_index in range(_REPEATS.value):
    order = modes if round_index % 2 == 0 else modes[::-1]
    for info, run in order:
      start = time.perf_counter()
      run(_STEPS.value)
      times[info["mode"]].append((time.perf_counter() - start) / _STEPS.value)
  rows = []
  for info, _ in modes:
    rows.append({**info, "step_s": times[info["mode"]]})
    print(f"{info['mode']:26s} {statistics.median(times[info['mode']]):.3f} s/step, "
          f"{info['trained_params']:,} trained, state {info['state_mib']:.1f} MiB + frozen "
          f"{info['frozen_mib']:.1f} MiB, temporaries {info['temp_mib']:.1f} MiB")
  text = report(rows)
  print(text)
  if _WRITE_DOCS.value:
    with open(_JSON, "w") as f:
      json.dump({"load": os.getloadavg(), "repeats": _REPEATS.value, "rows": rows}, f, indent=1)
    docs_section.write("lora_cpu", text)


def report(rows) -> str:
  full = rows[0]
  full_s = statistics.median(full["step_s"])
  lines = ["## LoRA against full fine-tuning on this CPU (bench/lora_step.py)", "",
           "Width 512, 8 layers, 2 clips of 8x32x32 pixels per step, one CPU device, fp32 compute; "
           "rank-16 adapters on every attention and FFN projection. Held state: trained parameters, "
           "AdamW moments and one EMA tree; frozen: the weights the adapters train on.", "",
           "| mode | trained parameters | held state (MiB) | frozen (MiB) | step temporaries (MiB) | "
           "step time median [min, max] | vs full |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    step = statistics.median(row["step_s"])
    lines.append(f"| {row['mode']} | {row['trained_params']:,} | {row['state_mib']:.1f} | "
                 f"{row['frozen_mib']:.1f} | {row['temp_mib']:.1f} | {step:.3f} s [{min(row['step_s']):.3f}, "
                 f"{max(row['step_s']):.3f}] | {step / full_s:.2f}x |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
