"""How fast demo-sized configs learn prompt adherence: train variants, score samples every N steps.

The demo's config (configs/tiny.py) was chosen with this tool. Training a variant for N steps gives the
same model on any backend, so an accelerator can sweep many variants quickly; what a variant costs per
step on the demo's 2-core CPU is measured separately (`cost` below) and the two together say which
config reaches the adherence targets inside the demo's time budget.

  # on the CPU host: clips and caption / prompt embeddings of a prepared synthetic dataset -> one npz
  python experiments/adherence_sweep.py export --config=configs/tiny.py --data_dir=DIR --out=clips.npz
  # anywhere: train each variant, score adherence of raw and EMA weights at each eval step
  python experiments/adherence_sweep.py train --clips=clips.npz --variants=experiments/variants.json \
      --eval_steps=300,700,1400 --out=results.jsonl
  # on an accelerator: 500 steps per call (clips stay on the device), stop past 400 s
  python experiments/adherence_sweep.py train ... --eval_steps=1000,2000,4000 --steps_per_call=500 \
      --deadline_s=400 --extra_sample_shifts=3
  # CPU seconds per step of each variant (same variants file)
  python experiments/adherence_sweep.py cost --clips=clips.npz --variants=experiments/variants.json

Each row also holds `drift` per weight set (npz files exported since it was added): pixels the mean
predicted x0 at sigma 0.95 moves along each prompted direction (see `direction_drift`), a continuous
read-out of whether the model uses the direction word at all, long before samples are clean.

A variants file is {name: {dotted config key: value}} applied over --config. `data.pixel_size`
(16 or 32) picks the clip resolution: 32-pixel clips are area-downsampled for 16, which is what
rendering the synthetic videos at 16 pixels gives up to H.264 noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _load_config(path: str, overrides: dict[str, Any]):
  import importlib.util

  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  size = int(overrides.get("data.pixel_size", 32))
  for key, value in overrides.items():
    if key == "data.pixel_size":
      continue
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    if isinstance(value, list):  # JSON lists -> the tuples config fields hold
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    node[leaf] = value
  frames = config.data.buckets[0][0]
  config.data.buckets = ((frames, size, size),)
  config.data.image_buckets = ((1, size, size),)
  config.eval.height = config.eval.width = size
  return config, size


def export(args: argparse.Namespace) -> None:
  from sora_jax.data import schema
  from sora_jax.encoders import text_encoder as text_encoder_lib
  from sora_jax.encoders import vae as vae_lib
  from sora_jax.evaluation import adherence
  from sora_jax.offline import synthetic

  config, _ = _load_config(args.config, {})
  config.data.dir = args.data_dir
  vae = vae_lib.get_vae(config)
  split = schema.open_split(args.data_dir, config.data.train_split)
  count = min(args.max_clips, len(split))
  pixels, text, captions = [], [], []
  for index in range(count):
    record = schema.decode(split[index])
    video = vae.decode(np.asarray(record["latents"], np.float32)[None])[0]
    pixels.append(np.round((np.clip(video, -1, 1) + 1) * 127.5).astype(np.uint8))
    text.append(np.asarray(record["text_embeds"], np.float16))
    captions.append(record["caption"])
  prompts = adherence.synthetic_prompts(args.num_prompts, seed=7)
  encoder = text_encoder_lib.get_text_encoder(config)
  cond, _ = encoder.encode(prompts)
  drift_embeds = np.stack(
      [encoder.encode(_drift_prompts(direction))[0] for direction in synthetic.DIRECTIONS])
  np.savez_compressed(args.out, pixels=np.stack(pixels), text_embeds=np.stack(text),
                      captions=np.asarray(captions), prompts=np.asarray(prompts),
                      prompt_embeds=np.asarray(cond, np.float16),
                      drift_embeds=np.asarray(drift_embeds, np.float16))
  size_mib = os.path.getsize(args.out) / 2**20
  print(f"wrote {count} clips and {len(prompts)} prompts to {args.out} ({size_mib:.1f} MiB)")


DRIFT_SIGMA = 0.95


def _drift_prompts(direction: str) -> list[str]:
  from sora_jax.offline import synthetic

  return [synthetic.caption_for(color, shape, direction, "black", speed)
          for color in ("white", "yellow", "green") for shape in synthetic.SHAPES
          for speed in ("quickly", None)]


def direction_drift(model, params, vae, drift_embeds: np.ndarray, latent_shape) -> dict[str, float]:
  """Pixels the mean predicted x0 at sigma 0.95 moves along each prompted direction, first to last frame.

  Bright shapes on black, noise shared by all directions: a model that ignores the direction word
  gives the same path for every direction (opposite signs for opposite directions); the data's own
  mean moves ~8 pixels at 16x16. A continuous read-out of what adherence's sampled detector
  sees only once samples are clean.
  """
  import jax
  import jax.numpy as jnp

  from sora_jax.offline import synthetic

  drifts = {}
  # drift_embeds [directions, prompts, L, D] in the order of synthetic.DIRECTIONS (as `export` wrote them)
  for direction, embeds in zip(synthetic.DIRECTIONS, drift_embeds, strict=True):
    count = embeds.shape[0]
    noise = jax.random.normal(jax.random.key(1), (count, *latent_shape))
    velocity = model.apply({"params": params}, noise, jnp.full((count,), 1000.0 * DRIFT_SIGMA),
                           jnp.asarray(embeds, jnp.float32))
    mean = np.asarray(vae.decode(np.asarray(noise - DRIFT_SIGMA * velocity))).mean(axis=0)  # [F, H, W, 3]
    weight = mean.mean(axis=-1) + 1.0
    weight = weight - weight.min(axis=(1, 2), keepdims=True)
    drifts[direction] = round(float(centroid_travel(weight, synthetic.DIRECTIONS[direction])), 2)
  return drifts


def centroid_travel(weight: np.ndarray, unit: tuple[int, int]) -> np.ndarray:
  """Pixels the weighted centroid of `weight [..., F, H, W]` moves along `unit` (dx, dy), frame 0 to last."""
  total = weight.sum(axis=(-2, -1))
  cx = (weight.sum(axis=-2) * np.arange(weight.shape[-1])).sum(-1) / total  # [..., F]
  cy = (weight.sum(axis=-1) * np.arange(weight.shape[-2])).sum(-1) / total
  return (cx[..., -1] - cx[..., 0]) * unit[0] + (cy[..., -1] - cy[..., 0]) * unit[1]


def _latents(config, size: int, pixels: np.ndarray) -> np.ndarray:
  from sora_jax.encoders import vae as vae_lib

  video = pixels.astype(np.float32)
  if size != video.shape[2]:
    f = video.shape[2] // size
    video = video.reshape(*video.shape[:2], size, f, size, f, 3).mean(axis=(3, 5))
  return vae_lib.get_vae(config).encode(video / 127.5 - 1.0).astype(np.float32)


def _variants(path: str, names: str | None) -> dict[str, dict[str, Any]]:
  with open(path) as f:
    variants = json.load(f)
  if names:
    variants = {name: variants[name] for name in names.split(",")}
  return variants


def train(args: argparse.Namespace) -> None:
  import jax

  from sora_jax.encoders import vae as vae_lib
  from sora_jax.evaluation import adherence, sampling
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import step as step_lib

  data = np.load(args.clips)
  prompts = [str(p) for p in data["prompts"]]
  cond = np.asarray(data["prompt_embeds"], np.float32)
  eval_steps = sorted(int(s) for s in args.eval_steps.split(","))
  deadline = time.perf_counter() + args.deadline_s if args.deadline_s else None
  for name, overrides in _variants(args.variants, args.only).items():
    config, size = _load_config(args.config, overrides)
    config.train.num_steps = int(overrides.get("train.num_steps", eval_steps[-1]))
    latents = _latents(config, size, data["pixels"])
    text = np.asarray(data["text_embeds"], np.float32)
    mesh = mesh_lib.create_mesh(config, jax.devices()[:1])
    trainable = step_lib.build(config, mesh)
    state = trainable.setup.init(jax.random.PRNGKey(int(config.train.seed)))
    settings = sampling.SampleSettings.from_config(config)
    sampler = sampling.Sampler(trainable.model, config, settings, mesh)
    extra_samplers = {
        f"@shift{shift:g}": sampling.Sampler(
            trainable.model, config, sampling.SampleSettings.from_config(config, shift=shift), mesh)
        for shift in (float(v) for v in args.extra_sample_shifts.split(",") if v)}
    vae = vae_lib.get_vae(config)
    batch_size = int(config.train.global_batch_size)
    run_steps = _step_runner(trainable, latents, text)
    rng = np.random.default_rng(0)
    order = np.zeros(0, np.int64)
    start, losses, step = time.perf_counter(), [], 0
    for eval_step in eval_steps:
      while step < eval_step:
        count = min(args.steps_per_call, eval_step - step)
        while len(order) < count * batch_size:
          order = np.concatenate([order, rng.permutation(len(latents))])
        picked, order = order[:count * batch_size], order[count * batch_size:]
        state, chunk_losses = run_steps(state, picked.reshape(count, batch_size))
        losses.extend(np.asarray(chunk_losses).tolist())
        step += count
      loss = float(np.mean(losses[-100:]))
      train_s = time.perf_counter() - start
      weight_sets = {"raw": state.params, **{f"ema_{k}": v for k, v in state.ema.items()}}
      row = {"variant": name, "overrides": overrides, "step": step, "train_loss": loss,
             "train_s": round(train_s, 1)}
      for set_name, params in weight_sets.items():
        videos, _ = sampling.decode_to_frames(vae, sampler.latents(params, cond, np.zeros_like(cond)))
        score = adherence.score(videos, prompts)
        row[set_name] = {k: round(float(score[k]), 3) for k in ("color", "background", "direction", "shape")}
        if "drift_embeds" in data:
          row[set_name]["drift"] = direction_drift(trainable.model, params, vae, data["drift_embeds"],
                                                   sampler.shape)
        for suffix, extra in extra_samplers.items():
          videos, _ = sampling.decode_to_frames(vae, extra.latents(params, cond, np.zeros_like(cond)))
          score = adherence.score(videos, prompts)
          row[set_name + suffix] = {k: round(float(score[k]), 3)
                                    for k in ("color", "background", "direction", "shape")}
      print(json.dumps(row), flush=True)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
      start = time.perf_counter()
      if deadline is not None and time.perf_counter() > deadline:
        print(json.dumps({"variant": name, "stopped_at_deadline": step}), flush=True)
        break


def _step_runner(trainable, latents: np.ndarray, text: np.ndarray):
  """(state, indices [K, B]) -> (state, losses [K]): K trainer steps in one call, clips kept on device.

  On an accelerator a demo-sized step is a few hundred tiny kernels; scanning K of them in one
  executable keeps the host out of the loop (same batches, same order as one call per step).
  """
  import jax

  # Arguments, not closed-over constants: XLA would bake the clips into every compiled executable.
  clips = jax.device_put((latents, text))

  def run(state, indices, clips):
    def body(state, picked):
      batch = jax.lax.with_sharding_constraint(
          {"latents": clips[0][picked], "text_embeds": clips[1][picked]}, trainable.batch_sharding)
      state, metrics = trainable.train_step(state, batch)
      return state, metrics["loss"]

    return jax.lax.scan(body, state, indices)

  compiled = jax.jit(run, donate_argnums=(0,))
  return lambda state, indices: compiled(state, indices, clips)


def cost(args: argparse.Namespace) -> None:
  import jax

  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import step as step_lib

  data = np.load(args.clips)
  for name, overrides in _variants(args.variants, args.only).items():
    config, size = _load_config(args.config, overrides)
    latents = _latents(config, size, data["pixels"][: config.train.global_batch_size])
    text = np.asarray(data["text_embeds"][: config.train.global_batch_size], np.float32)
    mesh = mesh_lib.create_mesh(config, jax.devices()[:1])
    trainable = step_lib.build(config, mesh)
    state = trainable.setup.init(jax.random.PRNGKey(0))
    batch = jax.device_put({"latents": latents, "text_embeds": text}, trainable.batch_sharding)
    state, metrics = trainable.train_step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
      begin = time.perf_counter()
      state, metrics = trainable.train_step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - begin)
    print(json.dumps({"variant": name, "s_per_step_median": round(float(np.median(times)), 3),
                      "min": round(min(times), 3), "max": round(max(times), 3),
                      "load": os.getloadavg()[0]}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("export")
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--max_clips", type=int, default=2400)
  p.add_argument("--num_prompts", type=int, default=40)
  for command in ("train", "cost"):
    p = sub.add_parser(command)
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--clips", required=True)
    p.add_argument("--variants", required=True)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--eval_steps", default="300,700,1400")
    p.add_argument("--out", default="adherence_sweep.jsonl")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps_per_call", type=int, default=1,
                   help="train steps scanned in one call (train; >1 on accelerators)")
    p.add_argument("--extra_sample_shifts", default="",
                   help="train: also score samples at these sampler shifts (comma-separated)")
    p.add_argument("--deadline_s", type=float, default=0.0,
                   help="train: stop at the first eval step this many seconds after the start")
  args = parser.parse_args()
  {"export": export, "train": train, "cost": cost}[args.command](args)


if __name__ == "__main__":
  main()
