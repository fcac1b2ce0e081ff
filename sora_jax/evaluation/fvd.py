"""FVD of a checkpoint's samples against the run's held-out clips.

Owns the reference side: the first `eval.fvd_reference_clips` records of the held-out split, decoded
by the run's VAE one clip per local device per call and turned into features as they come (host memory
holds one batch of decoded clips), once, and cached as statistics under
`W/eval/fvd_reference/<key>.npz`, where the key covers the dataset's fingerprint, the split, the clip
count, the decoding VAE and the feature model's identity (so a changed dataset or model never reuses
stale statistics). The generated side is whatever clips eval sampled for a weight set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax.evaluation import feature_models, frechet, sampling
from sora_jax.files import atomic, paths

REFERENCE_DIR = os.path.join("eval", "fvd_reference")


@dataclasses.dataclass
class Reference:
  """The held-out side of FVD for one feature model."""

  model: feature_models.VideoFeatureModel
  stats: frechet.Statistics
  key: str
  path: str
  computed: bool  # False: read from the cache


def reference_dir(data: ml_collections.ConfigDict) -> str:
  """The dataset whose held-out clips are the FVD reference: data.dir, or a mixture's first source."""
  return config_lib.data_sources(data)[0].path


def reference_key(data: ml_collections.ConfigDict, model: feature_models.VideoFeatureModel,
                  count: int) -> str:
  """What the cached reference statistics depend on, hashed."""
  from sora_jax.data import schema

  data_dir = reference_dir(data)
  metadata = schema.read_metadata(data_dir)
  fields = {"dataset": metadata.get("fingerprint") or os.path.abspath(data_dir),
            "split": data.eval_split, "clips": count, "vae": data.vae,
            "pretrained": os.path.abspath(data.pretrained) if data.pretrained else "",
            "feature_model": model.identity, "frames": model.num_frames}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def iter_reference_videos(data: ml_collections.ConfigDict, vae: Any, count: int,
                          batch: int | None = None) -> Iterator[np.ndarray]:
  """The first `count` held-out clips (record order), decoded by `vae` to uint8 frames [F, H, W, 3].

  Consecutive clips of one latent shape are decoded `batch` at a time (default: one per local device,
  which the VAE decodes data parallel); a bucketed split's clips of other shapes start a new call.
  """
  from sora_jax.data import schema

  data_dir = reference_dir(data)
  source = schema.open_split(data_dir, data.eval_split)
  if len(source) < 2:
    raise ValueError(f"split {data.eval_split!r} of {data_dir} has {len(source)} clips; FVD "
                     f"needs at least 2")
  batch = batch or jax.local_device_count()
  records = (np.asarray(schema.decode(source[index])["latents"], np.float32)
             for index in range(min(count, len(source))))
  for latents in shape_batches(records, batch):
    yield from sampling.decode_to_frames(vae, latents, batch)[0]


def shape_batches(arrays: Iterable[np.ndarray], batch: int) -> Iterator[np.ndarray]:
  """Consecutive arrays of one shape stacked `batch` at a time, in order; an array of another shape
  starts a new stack."""
  pending: list[np.ndarray] = []
  for array in arrays:
    if pending and (len(pending) == batch or array.shape != pending[0].shape):
      yield np.stack(pending)
      pending = []
    pending.append(array)
  if pending:
    yield np.stack(pending)


def reference_videos(data: ml_collections.ConfigDict, vae: Any, count: int) -> list[np.ndarray]:
  """`iter_reference_videos` as a list (all clips in host memory at once)."""
  return list(iter_reference_videos(data, vae, count))


def reference_features(data: ml_collections.ConfigDict, vae: Any, model: feature_models.VideoFeatureModel,
                       count: int, decode_batch: int | None = None) -> np.ndarray:
  """`model`'s features [N, D] of the reference clips, decoded (`decode_batch` per VAE call) and embedded
  as they come: host memory holds one decode batch and `model.batch_size` clips' model frames, not the
  reference set (2,048 clips of 720p x 81 are 459 GB of uint8 frames)."""
  stream = feature_models.FeatureStream(model)
  for video in iter_reference_videos(data, vae, count, decode_batch):
    stream.add(video)
  return stream.features()


def reference(config: ml_collections.ConfigDict, workdir: str, vae: Any,
              model: feature_models.VideoFeatureModel, log: Callable[[str], None] = print) -> Reference:
  """The reference statistics, from the cache when its key matches, else computed and cached."""
  count = int(config.eval.fvd_reference_clips)
  key = reference_key(config.data, model, count)
  path = os.path.join(workdir, REFERENCE_DIR, f"{key}.npz")
  if paths.is_file(path):
    with np.load(io.BytesIO(paths.read_bytes(path))) as cached:
      stats = frechet.Statistics(cached["mean"], cached["cov"], int(cached["count"]))
    return Reference(model, stats, key, path, computed=False)
  log(f"eval: FVD reference features of up to {count} held-out clips with {model.name} (cached as {path})")
  stats = frechet.statistics(reference_features(config.data, vae, model, count))
  stored = io.BytesIO()
  np.savez(stored, mean=stats.mean, cov=stats.cov, count=stats.count)
  atomic.write_bytes(path, stored.getvalue())
  return Reference(model, stats, key, path, computed=True)


def score(ref: Reference, videos: Sequence[np.ndarray]) -> dict[str, Any]:
  """FVD of `videos` against the reference, with the counts and the feature model's name."""
  return score_features(ref, ref.model.features(list(videos)))


def score_features(ref: Reference, features: np.ndarray) -> dict[str, Any]:
  """FVD of generated clips' features [N, D] (from `ref.model`) against the reference."""
  generated = frechet.statistics(features)
  return {"fvd": frechet.distance(ref.stats, generated), "generated_clips": generated.count,
          "reference_clips": ref.stats.count, "model": ref.model.name, "reference_key": ref.key}
