"""How well the demo DiT learns the high-noise prior E[x0 | caption]: training at sigma 0.99 only.

Before an object is visible in the noisy input, a sampler follows the model's conditional mean; this
probe trains the DiT (x0 prediction) at one high sigma on the clips of an `adherence_sweep.py export`
npz and prints the MSE against the data's own floors (knowing background, + colour, + direction,
+ speed) and how far the mean prediction's object moves along each direction word. It compares what
the DiT cross-attends to (experiments/README.md, "Fourth round"):

  python experiments/high_sigma_probe.py --clips=clips.npz --data_dir=DIR --text=dataset   # stored embeds
  python experiments/high_sigma_probe.py --clips=clips.npz --data_dir=DIR --text=bias:1.0  # re-encoded
  python experiments/high_sigma_probe.py --clips=clips.npz --data_dir=DIR --text=slots     # a token each
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CAPTION = re.compile(r"a (\w+) (\w+) moves (\w+) ?(\w*) on a (\w+) background")
_ATTRIBUTES = ("color", "shape", "direction", "speed", "background")


def attributes(caption: str) -> dict[str, str]:
  match = _CAPTION.match(caption)
  if not match:
    raise ValueError(f"caption {caption!r} is not a synthetic caption ('a red circle moves left on a ...')")
  return dict(zip(_ATTRIBUTES, match.groups(), strict=True))


def groups(captions: list[str], known: tuple[str, ...]) -> list[list[int]]:
  """Indices of the captions that share the `known` attributes, one list per distinct value."""
  rows = collections.defaultdict(list)
  for index, caption in enumerate(captions):
    named = attributes(caption)
    rows[tuple(named[a] for a in known)].append(index)
  return list(rows.values())


def floor(x0: np.ndarray, captions: list[str], known: tuple[str, ...]) -> float:
  """MSE of predicting each clip by the mean of the clips that share the `known` attributes."""
  return float(sum(((x0[i] - x0[i].mean(0)) ** 2).sum() for i in groups(captions, known)) / x0.size)


def probe_config(path: str, data_dir: str, text_mode: str, abs_pos: bool):
  """(config, pixel size) of the probe's DiT: x0 prediction, and the text encoder `text_mode` names."""
  import adherence_sweep

  config, size = adherence_sweep._load_config(path, {"data.pixel_size": 16})
  config.data.dir = data_dir
  config.model.abs_pos_embedding = abs_pos
  config.model.prediction = "x0"
  if text_mode.startswith("bias:"):
    config.data.text_encoder_position_bias_std = float(text_mode.split(":", 1)[1])
  elif text_mode not in ("dataset", "slots"):
    raise ValueError(f"--text={text_mode!r}; expected dataset, slots or bias:STD")
  return config, size


def text_embeddings(mode: str, config, captions: list[str], stored: np.ndarray) -> np.ndarray:
  """What the DiT cross-attends to; `config` is `probe_config`'s for the same mode."""
  if mode == "dataset":
    return stored.astype(np.float32)
  if mode == "slots":
    rng, table = np.random.default_rng(1), {}
    text = np.zeros(stored.shape, np.float32)
    for row, caption in enumerate(captions):
      for slot, value in enumerate(attributes(caption).values()):
        if (slot, value) not in table:
          table[(slot, value)] = rng.standard_normal(stored.shape[-1]).astype(np.float32)
        text[row, slot] = table[(slot, value)]
    return text
  from sora_jax.encoders import text_encoder as text_encoder_lib

  encoder = text_encoder_lib.get_text_encoder(config)
  return np.concatenate([encoder.encode(captions[i:i + 256])[0] for i in range(0, len(captions), 256)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clips", required=True, help="npz written by adherence_sweep.py export")
  parser.add_argument("--data_dir", required=True, help="the prepared dataset (its tokenizer)")
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--text", default="dataset", help="dataset | slots | bias:STD")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--sigma", type=float, default=0.99)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warmup (0: none)")
  parser.add_argument("--clip_norm", type=float, default=0.0,
                      help="clip gradients to this global norm, as the trainer does (0: off; the "
                      "recorded rounds ran without, and their long runs spiked)")
  parser.add_argument("--drift_every", type=int, default=500, help="print the drift every N steps")
  parser.add_argument("--save_params", default="", help="write the trained parameters here (msgpack)")
  parser.add_argument("--no_abs_pos", action="store_true", help="RoPE only")
  parser.add_argument("--group_mean_targets", action="store_true",
                      help="train on each clip's attribute-group mean (no per-clip variance in targets)")
  args = parser.parse_args()

  import adherence_sweep
  import jax
  import jax.numpy as jnp
  import optax

  from sora_jax.encoders import vae as vae_lib
  from sora_jax.model.dit import DiT, init_params
  from sora_jax.offline import synthetic

  config, size = probe_config(args.config, args.data_dir, args.text, not args.no_abs_pos)
  data = np.load(args.clips)
  captions = [str(c) for c in data["captions"]]
  x0 = adherence_sweep._latents(config, size, data["pixels"]).astype(np.float32)
  text = text_embeddings(args.text, config, captions, data["text_embeds"])
  targets = x0
  if args.group_mean_targets:  # separates gradient noise from what the model cannot represent
    targets = x0.copy()
    # shape left out: ~3 clips per group would be too few to average
    for rows in groups(captions, ("color", "direction", "speed", "background")):
      targets[rows] = x0[rows].mean(0)
  for known in [(), ("background",), ("background", "color"), ("background", "color", "direction"),
                ("background", "color", "direction", "speed")]:
    print(f"floor knowing {'+'.join(known) or 'nothing'}: {floor(x0, captions, known):.4f}")

  model, sigma = DiT(config.model), args.sigma
  params = init_params(config.model, jax.random.key(0), x0.shape[1:], text.shape[1])
  schedule = (optax.linear_schedule(0.0, args.learning_rate, args.warmup_steps) if args.warmup_steps
              else args.learning_rate)
  optimizer = optax.adam(schedule)
  if args.clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(args.clip_norm), optimizer)
  opt_state = optimizer.init(params)

  def predict(params, clean, text, rng):
    noisy = (1 - sigma) * clean + sigma * jax.random.normal(rng, clean.shape)
    velocity = model.apply({"params": params}, noisy, jnp.full((clean.shape[0],), 1000 * sigma), text)
    return noisy - sigma * velocity

  def loss_fn(params, clean, text, rng):
    return jnp.mean((predict(params, clean, text, rng) - clean) ** 2)

  @jax.jit
  def step(params, opt_state, clean, text, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, clean, text, rng)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  vae = vae_lib.get_vae(config)
  drift_rows = {word: [i for i, c in enumerate(captions) if attributes(c)["direction"] == word][:64]
                for word in synthetic.DIRECTIONS}

  def travel(video, unit) -> float:
    pixels = np.asarray(vae.decode(np.asarray(video)))  # [n, F, H, W, 3]
    weight = np.abs(pixels - np.median(pixels, axis=(2, 3), keepdims=True)).sum(-1) + 1e-9
    return float(np.mean(adherence_sweep.centroid_travel(weight, unit)))

  data_travel = {word: travel(x0[rows], synthetic.DIRECTIONS[word]) for word, rows in drift_rows.items()}

  def print_drift() -> None:
    for word, rows in drift_rows.items():
      predicted = travel(predict(params, x0[rows], text[rows], jax.random.key(5)), synthetic.DIRECTIONS[word])
      print(f"  'moves {word}': mean prediction travels {predicted:.2f} px along it "
            f"(data: {data_travel[word]:.2f})")

  order, losses = np.random.default_rng(0), []
  for index in range(1, args.steps + 1):
    picked = order.integers(0, len(x0), args.batch_size)
    params, opt_state, loss = step(params, opt_state, targets[picked], text[picked], jax.random.key(index))
    losses.append(float(loss))
    if index % 100 == 0 or index == args.steps:
      print(f"step {index}: train MSE {np.mean(losses[-100:]):.4f}", flush=True)
    if index % args.drift_every == 0 and index != args.steps:
      print_drift()
  held = [float(loss_fn(params, x0[i:i + 16], text[i:i + 16], jax.random.key(10**6 + i)))
          for i in range(0, 256, 16)]
  print(f"MSE over 256 clips, fixed noise: {np.mean(held):.4f}")
  print_drift()
  if args.save_params:  # for experiments/prior_handoff.py
    from flax import serialization

    with open(args.save_params, "wb") as f:
      f.write(serialization.msgpack_serialize(jax.device_get(params)))
    print(f"wrote the parameters to {args.save_params}")


if __name__ == "__main__":
  main()
