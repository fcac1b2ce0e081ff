"""Continuation of held-out clips: image-to-video and extension scored against what really came next.

Owns `eval.continue_clips` / `eval.continue_frames`: the first held-out clips are sampled again from
their first k latent frames (kept clean, sora_jax.diffusion.conditioning) and their own caption
embeddings, and the synthetic-data detector compares the generated frames with the real clip's:
colour, shape, background and, what extension is about, the direction of motion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from sora_jax.evaluation import sampling
from sora_jax.offline import synthetic
from sora_jax.parallel import agreement as agreement_lib

ATTRIBUTES = ("color", "shape", "direction", "background")


def pixel_frames_of(data: ml_collections.ConfigDict, latent_frames: int) -> int:
  """Pixel frames the VAE decodes from `latent_frames` (the Wan VAE: 1 + 4(k - 1))."""
  tf = int(data.vae_temporal_factor)
  return latent_frames if tf == 1 else 1 + tf * (latent_frames - 1)


@dataclasses.dataclass
class Continuation:
  """What continuation needs across checkpoints: the clips, a sampler of their size, the real videos."""

  frames: tuple[int, ...]  # latent frames given, one run each
  latents: np.ndarray  # [N, T', H', W', C] held-out clips
  text_embeds: np.ndarray  # [N, L, D] their captions
  sampler: sampling.Sampler
  real_videos: list[np.ndarray]  # decoded held-out clips, uint8 [F, H, W, 3] (process 0; [] elsewhere)


def build(config: ml_collections.ConfigDict, model: Any, batches: Sequence[dict[str, np.ndarray]],
          settings: sampling.SampleSettings, vae: Any, mesh: Any) -> Continuation | None:
  """None when eval.continue_clips is 0; else the first clips of the (bucketed) held-out global batches
  of the first batch's shape: the same clips on every process, whatever the process count."""
  count = int(config.eval.continue_clips)
  if count <= 0 or not batches:
    return None
  latents, text = _first_clips(batches, count, mesh, config)
  shape = latents.shape[1:]
  sf = int(config.data.vae_spatial_factor)
  clip_settings = dataclasses.replace(settings, num_frames=pixel_frames_of(config.data, shape[0]),
                                      height=shape[1] * sf, width=shape[2] * sf)
  sampler = sampling.Sampler(model, config, clip_settings, mesh)
  frames = tuple(int(k) for k in config.eval.continue_frames)
  for k in frames:  # fails here, before any checkpoint is read
    sampler.check_given(latents[:1, :k][0])
  real = sampling.decode_to_frames(vae, latents)[0] if jax.process_index() == 0 else []
  return Continuation(frames, latents, text, sampler, real)


def _first_clips(batches: Sequence[dict[str, np.ndarray]], count: int, mesh: Any,
                 config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(latents, text_embeds) of the first `count` clips of the global eval batches shaped like the first.

  Each process holds its rows of every global batch (all of one bucket); the rows are gathered in global
  order, one process per batch shard (processes that share rows hold the same ones).
  """
  from jax.experimental import multihost_utils

  from sora_jax.evaluation import val_loss
  from sora_jax.parallel import sharding as sharding_lib

  shard, shards = val_loss.process_shard(mesh, sharding_lib.logical_rules(config.mesh))
  holders = agreement_lib.every_process(shard)
  order = [holders.index(index) for index in range(shards)]
  shape, latents, text = batches[0]["latents"].shape[1:], [], []
  for batch in batches:
    if sum(len(part) for part in latents) >= count:
      break
    if batch["latents"].shape[1:] != shape:
      continue
    for key, out in (("latents", latents), ("text_embeds", text)):
      local = np.asarray(batch[key], np.float32)
      if jax.process_count() == 1:
        out.append(local)
      else:
        gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, rows, ...]
        out.extend(gathered[process] for process in order)
  return np.concatenate(latents)[:count], np.concatenate(text)[:count]


def agreement(real_videos: Sequence[np.ndarray], generated: Sequence[np.ndarray],
              start: int) -> dict[str, Any]:
  """Per attribute, the fraction of clips whose generated frames [start:] show what the real clip shows
  (clips where the detector reads nothing in the real clip do not count); None where none count."""
  right, asked, samples = dict.fromkeys(ATTRIBUTES, 0), dict.fromkeys(ATTRIBUTES, 0), []
  for real, video in zip(real_videos, generated, strict=True):
    truth = synthetic.detect_attributes(real)
    seen = synthetic.detect_attributes(video[start:])
    for attribute in ATTRIBUTES:
      if truth.get(attribute) is not None:
        asked[attribute] += 1
        right[attribute] += int(seen.get(attribute) == truth[attribute])
    samples.append({"real": {a: truth.get(a) for a in ATTRIBUTES},
                    "generated": {a: seen.get(a) for a in ATTRIBUTES}})
  result: dict[str, Any] = {a: (right[a] / asked[a] if asked[a] else None) for a in ATTRIBUTES}
  result["samples"] = samples
  return result


def run(continuation: Continuation, params: Any, vae: Any, data: ml_collections.ConfigDict
        ) -> tuple[dict[str, Any], dict[int, list[np.ndarray]]]:
  """({"given_<k>": agreement and counts}, {k: generated videos}) for one weight set; every process
  samples, process 0 alone decodes and scores ({} and {} elsewhere)."""
  results, videos = {}, {}
  uncond = np.zeros_like(continuation.text_embeds)
  for k in continuation.frames:
    latents = continuation.sampler.latents(params, continuation.text_embeds, uncond,
                                           given_latents=continuation.latents[:, :k])
    if jax.process_index() != 0:
      continue
    generated, nonfinite = sampling.decode_to_frames(vae, latents)
    start = pixel_frames_of(data, k)
    results[f"given_{k}"] = {"given_latent_frames": k, "generated_from_frame": start,
                             "num_clips": len(generated), "nonfinite_samples": nonfinite,
                             **agreement(continuation.real_videos, generated, start)}
    videos[k] = generated
  return results, videos
