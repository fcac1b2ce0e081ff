"""Shape buckets and the seeded step plan that tells every process which records make each batch.

Owns the bucket table derived from the config, the per-record bucket index, the image/video step
schedule, and the per-epoch shuffles; all of it is a pure function of (config, index, seed).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from sora_jax import patches
from sora_jax.data import picklable, schema
from sora_jax.files import atomic, paths

# Stream codes fold into the shuffle seeds so the video and image streams never share a permutation.
VIDEO, IMAGE = 0, 1
_STREAM_NAMES = {VIDEO: "video", IMAGE: "image"}
_PHASE_SALT = 0x5EED
_MIXTURE_SALT = 0x50C5


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One shape every clip of a batch shares: a configured pixel bucket and its latent shape."""

  bucket_id: int
  is_image: bool
  pixel_shape: tuple[int, int, int]  # (frames, height, width)
  latent_shape: tuple[int, int, int, int]  # [T', H', W', C]
  patch_size: tuple[int, int, int]  # (p_t, p_h, p_w)

  @property
  def grid(self) -> tuple[int, int, int]:
    """Patch grid (T'/p_t, H'/p_h, W'/p_w): tokens per clip along t, h, w."""
    return patches.grid(self.latent_shape, self.patch_size)

  @property
  def num_tokens(self) -> int:
    return patches.num_tokens(self.latent_shape, self.patch_size)


def bucket_table(config: ml_collections.ConfigDict) -> list[Bucket]:
  """Buckets of config.data.buckets (videos) then config.data.image_buckets, with latent shapes."""
  table: list[Bucket] = []
  seen: set[tuple[int, ...]] = set()
  entries = [(tuple(b), False) for b in config.data.buckets]
  entries += [(tuple(b), True) for b in config.data.image_buckets]
  for pixel_shape, is_image in entries:
    latent = tuple(int(n) for n in patches.latent_shape(config, pixel_shape))
    # Two pixel buckets with one latent shape are one batch shape; the first one names it.
    if latent in seen:
      continue
    seen.add(latent)
    table.append(Bucket(len(table), is_image, tuple(int(n) for n in pixel_shape), latent,
                        tuple(int(p) for p in config.model.patch_size)))
  if not table:
    raise ValueError("config.data.buckets and config.data.image_buckets are both empty; "
                     "expected at least one (frames, height, width) bucket")
  return table


def match_bucket(table: Sequence[Bucket], latent_shape: Sequence[int]) -> int:
  """Id of the bucket whose latent shape is `latent_shape` ([T', H', W', C]), or -1."""
  shape = tuple(int(n) for n in latent_shape)
  for bucket in table:
    if bucket.latent_shape == shape:
      return bucket.bucket_id
  return -1


def scan_shapes(source: Sequence[Any], decode: Callable[[Any], dict[str, Any]]) -> np.ndarray:
  """Reads every record once: [N, 5] int32 rows (T', H', W', C, is_image); all -1 if unreadable."""
  shapes = np.full((len(source), 5), -1, np.int32)
  for index in range(len(source)):
    try:
      record = decode(source[index])
      shape = np.shape(record["latents"])
      is_image = int(bool(record["is_image"])) if "is_image" in record else -1
    except Exception:  # noqa: BLE001 - reported as unreadable when the bucket ids are assigned
      continue
    if len(shape) == 4:
      shapes[index] = (*shape, is_image)
    else:
      shapes[index, 4] = -2  # readable, but not [T', H', W', C]
  return shapes


def load_or_scan_shapes(cache_dir: str | None, split: str, source: Sequence[Any],
                        decode: Callable[[Any], dict[str, Any]]) -> np.ndarray:
  """The split's shape index: `cache_dir/latent_shapes-<split>.npy` if present, else scan_shapes.

  Prepare publishes the index with the dataset; for datasets written without one the scan's result
  is cached there when the dir is writable. The index holds shapes, not bucket ids, so it stays valid
  when the config's buckets change; it is ignored when its length differs from the split's.
  """
  path = os.path.join(cache_dir, schema.LATENT_SHAPES_FILE.format(split=split)) if cache_dir else None
  if path and paths.is_file(path):
    try:
      shapes = np.load(io.BytesIO(paths.read_bytes(path)))
      if shapes.shape == (len(source), 5):
        return shapes.astype(np.int32)
    except (OSError, ValueError):
      pass
  # Every process of a job that gets here reads the whole split once: fine for small datasets only.
  logging.warning("split %r has no usable shape index%s; scanning its %d records", split,
                  f" at {path}" if path else "", len(source))
  shapes = scan_shapes(source, decode)
  if path:
    # Atomic publish: concurrent processes may scan at once; each renames a complete file.
    try:
      stored = io.BytesIO()
      np.save(stored, shapes)
      atomic.write_bytes(path, stored.getvalue())
    except Exception:  # noqa: BLE001 - a cache: a read-only dir or a throttled bucket only costs a rescan
      logging.info("could not cache record shapes at %s (read-only dataset dir?)", path)
  return shapes


def assign_buckets(shapes: np.ndarray, table: Sequence[Bucket],
                   on_invalid: Callable[[int, str], None]) -> np.ndarray:
  """Bucket id [N] int32 of every record from its scanned shape; -1 = excluded as invalid.

  `on_invalid(index, problem)` decides what a record that fits no bucket does: raise, or count.
  """
  bucket_ids = np.full(len(shapes), -1, np.int32)
  expected = [b.latent_shape for b in table]
  for index, row in enumerate(shapes):
    if row[4] == -1 and row[0] == -1:
      on_invalid(index, "cannot be read or decoded")
      continue
    if row[4] == -2:
      on_invalid(index, "latents are not 4-D; expected [T', H', W', C]")
      continue
    shape = tuple(int(n) for n in row[:4])
    bucket_id = match_bucket(table, shape)
    if bucket_id < 0:
      on_invalid(index, f"latents shape {shape} matches no configured bucket; expected one of {expected}")
      continue
    if row[4] >= 0 and bool(row[4]) != table[bucket_id].is_image:
      on_invalid(index, f"is_image={bool(row[4])} disagrees with its latent shape {shape}")
      continue
    bucket_ids[index] = bucket_id
  return bucket_ids


def stream_phase(seed: int) -> float:
  """Seeded offset in [0, 1) of the image/video schedule, the same on every process."""
  return float(np.random.default_rng([seed, _PHASE_SALT]).random())


def images_before(position: int, image_ratio: float, phase: float) -> int:
  """How many of positions [0, position) of the mixed stream come from the image stream.

  A low-discrepancy schedule: position i is an image iff floor((i+1)r + u) > floor(ir + u), so any
  window of n positions holds n*r images to within one, and it is O(1) to evaluate at any position.
  """
  return math.floor(position * image_ratio + phase) - math.floor(phase)


def stream_position(position: int, image_ratio: float, phase: float) -> tuple[int, int]:
  """(stream, index within that stream) of position `position` of the mixed image/video stream."""
  before = images_before(position, image_ratio, phase)
  if images_before(position + 1, image_ratio, phase) > before:
    return IMAGE, before
  return VIDEO, position - before


def streams_in_use(image_ratio: float) -> tuple[int, ...]:
  return tuple(s for s, used in ((VIDEO, image_ratio < 1.0), (IMAGE, image_ratio > 0.0)) if used)


class SourceMixture:
  """Which source (dataset of a mixture) position `p` of the mixed stream comes from, and which of
  that source's own positions it is.

  Source 0 takes share w_0 of the positions on the image/video schedule (`images_before`); the rest
  form a stream in which source 1 takes w_1 / (w_1 + ... + w_K) of them, and so on. Any window of n
  positions holds n * w_k of source k's to within K - 1, a position is found in O(K), and every
  phase derives from the seed: the mixed stream is the same on every process and layout.
  """

  def __init__(self, weights: Sequence[float], seed: int):
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(weights <= 0):
      raise ValueError(f"mixture weights {weights.tolist()}; expected one or more weights > 0")
    weights = weights / weights.sum()
    self.weights = weights.tolist()
    rest = np.cumsum(weights[::-1])[::-1]  # rest[k] = w_k + ... + w_K
    self._ratios = [float(min(1.0, w / r)) for w, r in zip(weights[:-1], rest[:-1], strict=True)]
    self._phases = [float(np.random.default_rng([seed, _MIXTURE_SALT, k]).random())
                    for k in range(len(self._ratios))]

  def __len__(self) -> int:
    return len(self.weights)

  def position(self, position: int) -> tuple[int, int]:
    """(source, index within that source's stream) of position `position` of the mixed stream."""
    for source, (ratio, phase) in enumerate(zip(self._ratios, self._phases, strict=True)):
      before = images_before(position, ratio, phase)
      if images_before(position + 1, ratio, phase) > before:
        return source, before
      position -= before
    return len(self._ratios), position

  def counts(self, position: int) -> list[int]:
    """How many of positions [0, position) each source takes."""
    counts = []
    for ratio, phase in zip(self._ratios, self._phases, strict=True):
      taken = images_before(position, ratio, phase)
      counts.append(taken)
      position -= taken
    return [*counts, position]


class BatchPlan(picklable.LockedPicklable):
  """Which records form global batch `step` in bucketed mode: one bucket per batch.

  Each stream (video, image) runs through its own epochs. In an epoch every bucket's records are
  shuffled (seed, stream, epoch), cut into global batches (the remainder that does not fill one is
  left out of that epoch only), and the batches of all buckets are shuffled together. Everything is
  derived from the global bucket index and the seed, so every process computes the same sequence of
  buckets and process p takes columns [p*b, (p+1)*b) of each global batch.
  """

  _REBUILT_CACHES = ("_cache",)

  def __init__(self, bucket_ids: np.ndarray, table: Sequence[Bucket], global_batch_size: int,
               image_ratio: float, seed: int, source_name: str = "the dataset"):
    self.table = list(table)
    self.global_batch_size = int(global_batch_size)
    self.image_ratio = float(image_ratio)
    self.seed = int(seed)
    self.phase = stream_phase(seed)
    self._records = {b.bucket_id: np.flatnonzero(bucket_ids == b.bucket_id) for b in self.table}
    self.batches_per_epoch = {}
    for stream in streams_in_use(self.image_ratio):
      count = sum(len(self._records[b.bucket_id]) // self.global_batch_size
                  for b in self.table if b.is_image == (stream == IMAGE))
      if count == 0:
        sizes = {b.pixel_shape: len(self._records[b.bucket_id]) for b in self.table
                 if b.is_image == (stream == IMAGE)}
        raise ValueError(
            f"{source_name} has no {_STREAM_NAMES[stream]} bucket with a full global batch of "
            f"{self.global_batch_size} clips (clips per bucket: {sizes}); data.image_ratio="
            f"{self.image_ratio} needs {_STREAM_NAMES[stream]} clips")
      self.batches_per_epoch[stream] = count
    self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def epoch(self, stream: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(record indices [n, G], bucket id [n]) of every global batch of one epoch of a stream."""
    key = (stream, epoch)
    with self._lock:
      if key in self._cache:
        return self._cache[key]
    rng = np.random.default_rng([self.seed, stream, epoch])
    batches, bucket_of_batch = [], []
    for bucket in self.table:
      if bucket.is_image != (stream == IMAGE):
        continue
      records = rng.permutation(self._records[bucket.bucket_id])
      full = len(records) // self.global_batch_size
      batches.append(records[:full * self.global_batch_size].reshape(full, self.global_batch_size))
      bucket_of_batch.append(np.full(full, bucket.bucket_id, np.int32))
    order = rng.permutation(self.batches_per_epoch[stream])
    plan = np.concatenate(batches)[order], np.concatenate(bucket_of_batch)[order]
    with self._lock:
      # Two epochs per stream cover every read in flight around an epoch boundary.
      for old in [k for k in self._cache if k[0] == stream and k[1] < epoch - 1]:
        del self._cache[old]
      self._cache[key] = plan
    return plan

  def bucket_records(self, bucket_id: int) -> np.ndarray:
    """Indices of the valid records of one bucket, in index order."""
    return self._records[bucket_id]

  def step(self, step: int) -> tuple[int, np.ndarray]:
    """(bucket id, record indices [G]) of global batch `step`."""
    stream, index = stream_position(step, self.image_ratio, self.phase)
    epoch, offset = divmod(index, self.batches_per_epoch[stream])
    batches, bucket_of_batch = self.epoch(stream, epoch)
    return int(bucket_of_batch[offset]), batches[offset]

class ClipPlan(picklable.LockedPicklable):
  """Which record is clip `i` of one process's clip stream in packing mode.

  Each stream's epoch shuffles all of its valid records (seed, stream, epoch); process p takes every
  P-th one starting at p (equal counts per process; the < P left over sit out that epoch only).
  Images and videos interleave at data.image_ratio of clips on the same schedule as BatchPlan.
  """

  _REBUILT_CACHES = ("_cache",)

  def __init__(self, bucket_ids: np.ndarray, table: Sequence[Bucket], process_index: int,
               process_count: int, image_ratio: float, seed: int, source_name: str = "the dataset"):
    self.table = list(table)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.image_ratio = float(image_ratio)
    self.seed = int(seed)
    self.phase = stream_phase(seed)
    self.bucket_ids = bucket_ids
    image_buckets = [b.bucket_id for b in self.table if b.is_image]
    is_image = np.isin(bucket_ids, image_buckets)
    self._records = {VIDEO: np.flatnonzero((bucket_ids >= 0) & ~is_image),
                     IMAGE: np.flatnonzero((bucket_ids >= 0) & is_image)}
    self.clips_per_epoch = {}
    for stream in streams_in_use(self.image_ratio):
      per_process = len(self._records[stream]) // self.process_count
      if per_process == 0:
        raise ValueError(
            f"{source_name} has {len(self._records[stream])} valid {_STREAM_NAMES[stream]} clips, "
            f"fewer than the {self.process_count} processes; data.image_ratio={self.image_ratio} "
            f"needs {_STREAM_NAMES[stream]} clips")
      self.clips_per_epoch[stream] = per_process
    self._cache: dict[tuple[int, int], np.ndarray] = {}
    self._lock = threading.Lock()

  def _epoch(self, stream: int, epoch: int) -> np.ndarray:
    key = (stream, epoch)
    with self._lock:
      if key in self._cache:
        return self._cache[key]
    order = np.random.default_rng([self.seed, stream, epoch]).permutation(self._records[stream])
    mine = order[self.process_index::self.process_count][:self.clips_per_epoch[stream]]
    with self._lock:
      for old in [k for k in self._cache if k[0] == stream and k[1] < epoch - 1]:
        del self._cache[old]
      self._cache[key] = mine
    return mine

  def clip(self, position: int) -> int:
    """Record index of clip `position` of this process's stream."""
    stream, index = stream_position(position, self.image_ratio, self.phase)
    epoch, offset = divmod(index, self.clips_per_epoch[stream])
    return int(self._epoch(stream, epoch)[offset])

  def mean_tokens(self) -> float:
    """Expected tokens per clip of the mixed stream (sizes packing chunks)."""
    tokens = np.array([b.num_tokens for b in self.table], np.float64)
    mean = 0.0
    for stream, weight in ((VIDEO, 1.0 - self.image_ratio), (IMAGE, self.image_ratio)):
      if stream in self.clips_per_epoch:
        mean += weight * tokens[self.bucket_ids[self._records[stream]]].mean()
    return mean
