"""The grain input pipeline: prepared latent clips -> per-process numpy batches -> global jax.Arrays.

Owns record validation, the bucketed and packed batch datasets, grain prefetch (threads or worker
processes), the malloc tuning reads need, the checkpointable iterator (`make_iterator`) and global
batch assembly (`to_global`).
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import hashlib
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from sora_jax import choices
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import packing, picklable, schema

# A mixture's batch key: each clip's source ([b] bucketed, [b, S] per packed segment).
from sora_jax.diffusion.training_inputs import SOURCE

# Length of the endless datasets: grain needs one, the trainer stops by step count.
_ENDLESS = 2**62


class InvalidRecordError(ValueError):
  """A record that fails validation while data.validation is 'error'."""


class _Invalid(Exception):
  """Internal: a record failed one check; carries the problem in words."""


def _identity(record: Any) -> Any:
  return record


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_malloc_tuned: int | None = None


def tune_malloc(mmap_threshold_mb: int) -> bool:
  """glibc only: serve blocks below `mmap_threshold_mb` from the heap and keep freed heap memory.

  Reading one record allocates several ~8 MB blocks (the ArrayRecord bytes, the parsed proto, the
  arrays). glibc maps blocks that large afresh and unmaps them on free, so every read pays a page
  fault per 4 KiB touched; on the development VM that was 2-3x the read's own CPU time. Explicit
  thresholds (which also switch off glibc's adaptive threshold) let freed blocks be reused; the
  heap keeps up to 8x the threshold of free memory. Process-wide and once per process; returns
  whether the thresholds are set. 0 leaves malloc alone.
  """
  global _malloc_tuned
  if mmap_threshold_mb <= 0 or not sys.platform.startswith("linux"):
    return False
  if _malloc_tuned == mmap_threshold_mb:
    return True
  try:
    libc = ctypes.CDLL("libc.so.6")
    threshold = int(mmap_threshold_mb) << 20
    tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold) and
                 libc.mallopt(_M_TRIM_THRESHOLD, 8 * threshold))
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
    tuned = False
  _malloc_tuned = mmap_threshold_mb if tuned else None
  return tuned


class RecordReader(picklable.LockedPicklable):
  """Reads one record, checks it against the config and returns float32 arrays.

  Checks: the contract keys exist; latents and text_embeds have the configured record dtype; latents
  have the bucket's latent shape; text_embeds are [L <= data.text_len, model.text_dim] (longer only if
  the tail is zero padding); every value is finite. On failure data.validation decides: 'error'
  raises InvalidRecordError naming the shard and record, 'skip' counts and logs it.
  """

  def __init__(self, config: ml_collections.ConfigDict, source: Sequence[Any],
               decode: Callable[[Any], Mapping[str, Any]], table: Sequence[buckets_lib.Bucket],
               split: str, shards: Sequence[tuple[str, int]] = (), source_name: str = ""):
    self.source = source
    self.source_name = source_name  # a mixture's source, named in validation errors
    self.shards = list(shards)  # (path, records) in source order, to name a bad record's shard
    self._shard_starts = np.cumsum([0] + [n for _, n in self.shards[:-1]]).tolist()
    self.decode = decode
    self.table = list(table)
    self.split = split
    self.policy = config.data.validation
    if self.policy not in choices.VALIDATION_MODES:
      raise ValueError(f"config.data.validation={self.policy!r}; expected one of {choices.VALIDATION_MODES}")
    self.record_dtype = schema.array_dtype(config.data.record_dtype)
    self.text_len = int(config.data.text_len)
    self.text_dim = int(config.model.text_dim)
    self.num_skipped = 0
    self._lock = threading.Lock()
    self.malloc_mmap_threshold_mb = int(config.data.malloc_mmap_threshold_mb)
    tune_malloc(self.malloc_mmap_threshold_mb)

  def __setstate__(self, state: dict[str, Any]) -> None:
    super().__setstate__(state)
    tune_malloc(self.malloc_mmap_threshold_mb)  # in each grain worker process too

  def location(self, index: int) -> str:
    """'split 'train' record 17 (shard <file>, record 5 of the shard)' when the shards are known."""
    where = f"split {self.split!r} record {index}"
    if self.source_name:
      where = f"source {self.source_name!r} {where}"
    if not self.shards:
      return where
    shard = bisect.bisect_right(self._shard_starts, index) - 1
    path, _ = self.shards[shard]
    return f"{where} (shard {path}, record {index - self._shard_starts[shard]} of the shard)"

  def invalid(self, index: int, problem: str) -> None:
    """Applies the validation policy to record `index` with `problem`: raise, or count and log."""
    if self.policy == "error":
      raise InvalidRecordError(
          f"{self.location(index)}: {problem} (data.validation='error'; 'skip' drops such records)")
    with self._lock:
      self.num_skipped += 1
      skipped = self.num_skipped
    logging.warning("skipping %s: %s (%d records skipped in this process so far)",
                    self.location(index), problem, skipped)

  def read(self, index: int, bucket: buckets_lib.Bucket) -> tuple[np.ndarray, np.ndarray]:
    """(latents [T', H', W', C], text_embeds [data.text_len, D]) float32 of record `index`.

    Raises _Invalid(problem) when a check fails; callers apply the policy via `invalid`.
    """
    latents = np.empty(bucket.latent_shape, np.float32)
    text_embeds = np.empty((self.text_len, self.text_dim), np.float32)
    self.read_into(index, bucket, latents, text_embeds)
    return latents, text_embeds

  def read_into(self, index: int, bucket: buckets_lib.Bucket, latents_out: np.ndarray,
                text_out: np.ndarray) -> None:
    """`read`, converting straight into float32 `latents_out` and `text_out` (slots of a batch).

    Saves a float32 copy of each array per record. On _Invalid the outputs hold partial data.
    """
    try:
      record = self.decode(self.source[int(index)])
    except Exception as error:  # noqa: BLE001 - corrupt bytes surface as many exception types
      raise _Invalid(f"cannot be read or decoded ({type(error).__name__}: {error})") from error
    for key in ("latents", "text_embeds"):
      if key not in record:
        raise _Invalid(f"has no {key!r}; expected the keys of sora_jax.data.schema")
    latents, text_embeds = np.asarray(record["latents"]), np.asarray(record["text_embeds"])
    for key, value in (("latents", latents), ("text_embeds", text_embeds)):
      if value.dtype != self.record_dtype:
        raise _Invalid(f"{key} dtype {value.dtype}; expected data.record_dtype={self.record_dtype}")
    if latents.shape != bucket.latent_shape:
      raise _Invalid(f"latents shape {latents.shape}; expected {bucket.latent_shape} of bucket "
                     f"{bucket.pixel_shape} (frames, height, width)")
    if text_embeds.ndim != 2 or text_embeds.shape[1] != self.text_dim:
      raise _Invalid(f"text_embeds shape {text_embeds.shape}; expected [L, model.text_dim={self.text_dim}]")
    length = text_embeds.shape[0]
    if length > self.text_len:
      tail = text_embeds[self.text_len:].astype(np.float32)
      if not np.isfinite(tail).all():
        raise _Invalid(f"text_embeds hold {int((~np.isfinite(tail)).sum())} non-finite values")
      if np.any(tail):
        raise _Invalid(f"text_embeds has {length} non-padding tokens; expected at most "
                       f"data.text_len={self.text_len}")
      text_embeds, length = text_embeds[:self.text_len], self.text_len
    latents_out[...] = latents
    text_out[:length] = text_embeds
    text_out[length:] = 0
    for key, converted in (("latents", latents_out), ("text_embeds", text_out)):
      finite = np.isfinite(converted)
      if not finite.all():
        raise _Invalid(f"{key} hold {int((~finite).sum())} non-finite values")


class _BucketedBatches(grain.MapDataset):
  """Element `step` = this process's part of global batch `step`: one bucket shape per batch.

  With several sources, global batch `step` comes whole from one of them (the mixture's source of
  position `step`), at that source's own batch index, and carries its index as "source" [b].
  A record that fails validation under 'skip' is replaced by a valid record of the same batch (or,
  if none, of the same bucket) so the batch keeps its shape on every process.
  """

  def __init__(self, plans: Sequence[buckets_lib.BatchPlan], readers: Sequence[RecordReader],
               mixture: buckets_lib.SourceMixture | None, process_index: int, batch_size: int):
    super().__init__()
    self._plans = list(plans)
    self._readers = list(readers)
    self._mixture = mixture
    self._columns = slice(process_index * batch_size, (process_index + 1) * batch_size)

  def __len__(self) -> int:
    return _ENDLESS

  def __str__(self) -> str:
    return "BucketedBatches"

  def __getitem__(self, step):
    if isinstance(step, slice):
      return self.slice(step)
    source, index = self._mixture.position(int(step)) if self._mixture else (0, int(step))
    plan, reader = self._plans[source], self._readers[source]
    bucket_id, records = plan.step(index)
    bucket = plan.table[bucket_id]
    mine = records[self._columns]
    latents = np.empty((len(mine), *bucket.latent_shape), np.float32)
    text_embeds = np.empty((len(mine), reader.text_len, reader.text_dim), np.float32)
    invalid_slots = []
    for slot, record in enumerate(mine):
      try:
        reader.read_into(record, bucket, latents[slot], text_embeds[slot])
      except _Invalid as problem:
        reader.invalid(int(record), str(problem))
        invalid_slots.append(slot)
    if invalid_slots:
      _replace(latents, text_embeds, invalid_slots, bucket, int(step), plan, reader)
    batch = {"latents": latents, "text_embeds": text_embeds}
    if self._mixture:
      batch[SOURCE] = np.full((len(mine),), source, np.int32)
    return batch


def _replace(latents: np.ndarray, text_embeds: np.ndarray, invalid_slots: list[int],
             bucket: buckets_lib.Bucket, step: int, plan: buckets_lib.BatchPlan,
             reader: RecordReader) -> None:
  """Fills the slots of invalid records with valid clips of the same batch, else of the same bucket."""
  valid_slots = [s for s in range(len(latents)) if s not in invalid_slots]
  if valid_slots:
    for k, slot in enumerate(invalid_slots):
      source_slot = valid_slots[k % len(valid_slots)]
      latents[slot], text_embeds[slot] = latents[source_slot], text_embeds[source_slot]
    return
  # The whole local batch failed: walk the bucket from a step-dependent start for one good clip.
  candidates = plan.bucket_records(bucket.bucket_id)
  for k in range(len(candidates)):
    index = int(candidates[(step + k) % len(candidates)])
    try:
      clip_latents, clip_text = reader.read(index, bucket)
    except _Invalid:
      continue
    latents[:], text_embeds[:] = clip_latents, clip_text
    return
  where = f"source {reader.source_name!r} " if reader.source_name else ""
  raise InvalidRecordError(f"every record of bucket {bucket.pixel_shape} in {where}split "
                           f"{reader.split!r} fails validation")


class _PackedChunks(picklable.LockedPicklable, grain.MapDataset):
  """Element `chunk` = this process's rows of global packed chunk `chunk`.

  Chunk c packs clips [c*C, (c+1)*C) of the global clip stream first-fit into rows, so it yields a
  varying number of rows; the rows of all chunks in order form the global row stream, and global
  batch s is its rows [s*R, (s+1)*R) (R = global rows per batch), process p taking rows
  [s*R + p*r, s*R + (p+1)*r). The packing depends on token counts only, so every process plans every
  chunk alike but reads only the clips of its own rows: the stream, and a position in it, do not
  depend on the process layout. Where a chunk's rows start in the row stream is counted forward from
  an anchor (a chunk and its first global row; chunk 0 at row 0 until a restore moves it). A clip
  that fails validation under 'skip' is left out of its row (its tokens stay padding). With several
  sources, clip position p of the global stream is the mixture's source of p at that source's own
  clip position, and each row carries its segments' sources as "source" [S].
  """

  def __init__(self, plans: Sequence[buckets_lib.ClipPlan], readers: Sequence[RecordReader],
               mixture: buckets_lib.SourceMixture | None, clips_per_chunk: int,
               token_budget: int, max_segments: int, process_index: int, rows_per_process: int,
               global_rows: int, anchor: tuple[int, int] = (0, 0)):
    super().__init__()
    self._plans = list(plans)
    self._readers = list(readers)
    self._mixture = mixture
    self._clips_per_chunk = clips_per_chunk
    self._token_budget = token_budget
    self._max_segments = max_segments
    self._process_index = process_index
    self._rows_per_process = rows_per_process
    self._global_rows = global_rows
    self.anchor = anchor
    bucket = self._plans[0].table[0]
    self._token_dim = int(np.prod(bucket.patch_size)) * bucket.latent_shape[-1]
    self._offsets = {anchor[0]: anchor[1]}  # chunk -> its first global row, for chunks >= the anchor
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return _ENDLESS

  def __str__(self) -> str:
    return "PackedChunks"

  def anchored(self, chunk: int, first_row: int) -> _PackedChunks:
    """The same chunks, counting row positions forward from `chunk` starting at global row `first_row`."""
    return _PackedChunks(self._plans, self._readers, self._mixture, self._clips_per_chunk,
                         self._token_budget, self._max_segments, self._process_index, self._rows_per_process,
                         self._global_rows, (int(chunk), int(first_row)))

  def _records(self, chunk: int) -> tuple[list[tuple[int, int]], list[buckets_lib.Bucket]]:
    """(source, record) and bucket of every clip of chunk `chunk`, in stream order."""
    start = chunk * self._clips_per_chunk
    records = []
    for position in range(start, start + self._clips_per_chunk):
      source, index = self._mixture.position(position) if self._mixture else (0, position)
      records.append((source, self._plans[source].clip(index)))
    return records, [self._plans[k].table[self._plans[k].bucket_ids[r]] for k, r in records]

  def _rows(self, chunk: int) -> tuple[list[list[int]], list[tuple[int, int]], list[buckets_lib.Bucket]]:
    records, clip_buckets = self._records(chunk)
    rows = packing.first_fit([b.num_tokens for b in clip_buckets], self._token_budget, self._max_segments)
    return rows, records, clip_buckets

  def first_row(self, chunk: int) -> int:
    """Global row index of chunk `chunk`'s first row (`chunk` >= the anchor's chunk)."""
    if chunk < self.anchor[0]:
      raise ValueError(f"chunk {chunk} lies before the anchor chunk {self.anchor[0]}")
    with self._lock:
      known = max(c for c in self._offsets if c <= chunk)
      row = self._offsets[known]
    for c in range(known, chunk):
      row += len(self._rows(c)[0])
      self._remember(c + 1, row)
    return row

  def _remember(self, chunk: int, first_row: int) -> None:
    """Caches a chunk's first row; keeps the anchor and the newest chunks only (reads move forward)."""
    with self._lock:
      self._offsets[chunk] = first_row
      if len(self._offsets) > 2 * _OFFSETS_KEPT:
        for old in sorted(self._offsets)[1:-_OFFSETS_KEPT]:  # [0] is the anchor: always kept
          del self._offsets[old]

  def locate(self, global_row: int) -> tuple[int, int]:
    """(chunk, its first global row) of the chunk holding `global_row` (at or after the anchor's row),
    walking forward from the nearest cached chunk before it."""
    with self._lock:
      chunk, first = max((c, r) for c, r in self._offsets.items() if r <= global_row)
    while True:
      rows = len(self._rows(chunk)[0])
      if global_row < first + rows:
        return chunk, first
      chunk, first = chunk + 1, first + rows
      self._remember(chunk, first)

  def clips_before(self, global_row: int) -> list[int]:
    """Clips of each source in global rows [0, global_row) (`global_row` at or after the anchor's row)."""
    chunk, first = self.locate(global_row)
    start = chunk * self._clips_per_chunk
    counts = self._mixture.counts(start) if self._mixture else [start]
    rows, records, _ = self._rows(chunk)
    for row in rows[:global_row - first]:
      for position in row:
        counts[records[position][0]] += 1
    return counts

  def owns(self, global_row: int) -> bool:
    return (global_row % self._global_rows) // self._rows_per_process == self._process_index

  def __getitem__(self, chunk):
    if isinstance(chunk, slice):
      return self.slice(chunk)
    chunk = int(chunk)
    rows, records, clip_buckets = self._rows(chunk)
    first = self.first_row(chunk)
    self._remember(chunk + 1, first + len(rows))
    mine = [index for index in range(len(rows)) if self.owns(first + index)]
    reader = self._readers[0]
    arrays = packing.empty_rows(len(mine), self._token_budget, self._token_dim, self._max_segments,
                                reader.text_len, reader.text_dim)
    if self._mixture:
      arrays[SOURCE] = np.zeros((len(mine), self._max_segments), np.int32)
    for slot, index in enumerate(mine):
      clips, sources = [], []
      for position in rows[index]:
        source, record = records[position]
        try:
          clips.append(self._readers[source].read(record, clip_buckets[position]))
          sources.append(source)
        except _Invalid as problem:
          self._readers[source].invalid(record, str(problem))
      packing.fill_row(arrays, slot, clips, clip_buckets[0].patch_size)
      if self._mixture:
        arrays[SOURCE][slot, :len(sources)] = sources
    arrays[_GLOBAL_ROW] = np.asarray([first + index for index in mine], np.int64)
    return arrays


# Chunk offsets a packed dataset keeps besides its anchor: enough for grain's read-ahead.
_OFFSETS_KEPT = 256
# Key of the packed elements' global row indices: bookkeeping for PipelineIterator, not batch data.
_GLOBAL_ROW = "_global_row"


@dataclasses.dataclass(frozen=True)
class SourceRecords:
  """One dataset of a mixture as the pipeline reads it: its records and how to read them.

  `decode` turns a raw element into the record dict (sora_jax.data.schema.decode for prepared
  datasets); `shapes` (buckets.scan_shapes of the records) saves the scan when the caller has it;
  `shards` ((path, records) in order) lets validation errors name the shard of a record.
  """

  records: Sequence[Any]
  decode: Callable[[Any], Mapping[str, Any]] = _identity
  shapes: np.ndarray | None = None
  shards: Sequence[tuple[str, int]] = ()
  weight: float = 1.0
  name: str = ""


def source_seed(seed: int, source: int) -> int:
  """The shuffle seed of a mixture's source `source`: `seed` for the first, a derived one after it."""
  if source == 0:
    return int(seed)
  return int(np.random.default_rng([int(seed), source]).integers(2**31))


def _image_ratio(image_ratio: float, bucket_ids: np.ndarray, table: Sequence[buckets_lib.Bucket]) -> float:
  """A mixture's source's share of image batches (clips): data.image_ratio where it holds images and
  videos, 1 for an image-only source, 0 for a video-only one (its weight then sets the mix)."""
  image_ids = [b.bucket_id for b in table if b.is_image]
  valid = bucket_ids[bucket_ids >= 0]
  has_images = bool(np.isin(valid, image_ids).any())
  has_videos = bool((~np.isin(valid, image_ids)).any())
  if has_images and not has_videos:
    return 1.0
  if has_videos and not has_images:
    return 0.0
  return float(image_ratio)


def make_dataset(
    config: ml_collections.ConfigDict,
    source: Sequence[Any],
    *,
    process_index: int,
    process_count: int,
    seed: int,
    batch_size_per_process: int,
    decode: Callable[[Any], Mapping[str, Any]] = _identity,
    split: str = "train",
    shapes: np.ndarray | None = None,
    shards: Sequence[tuple[str, int]] = (),
) -> Pipeline:
  """The pipeline as a grain IterDataset over any random-access `source` of records (one dataset).

  See SourceRecords for `decode`, `shapes` and `shards`; `make_mixture` reads several datasets.
  """
  return make_mixture(config, [SourceRecords(source, decode, shapes, shards)],
                      process_index=process_index, process_count=process_count, seed=seed,
                      batch_size_per_process=batch_size_per_process, split=split)


def make_mixture(
    config: ml_collections.ConfigDict,
    sources: Sequence[SourceRecords],
    *,
    process_index: int,
    process_count: int,
    seed: int,
    batch_size_per_process: int,
    split: str = "train",
    source_image_ratio: bool = False,
) -> Pipeline:
  """The pipeline over one dataset or a weighted mixture of several, as a grain IterDataset.

  Several sources: global batches (bucketed) or the clips of the global clip stream (packed) draw
  their source on `buckets.SourceMixture`'s seeded schedule; each source keeps its own shuffled
  epochs, and batches carry each clip's source under "source". A source's image share is its own
  (`_image_ratio`): always in a mixture, and for one dataset read as a mixture's source
  (`source_image_ratio`, e.g. eval of each source's held-out split).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process={batch_size_per_process}; expected >= 1")
  if not sources:
    raise ValueError("no data sources; expected at least one")
  table = buckets_lib.bucket_table(config)
  data = config.data
  mixed = len(sources) > 1
  mixture = buckets_lib.SourceMixture([s.weight for s in sources], seed) if mixed else None
  readers, all_shapes, all_ids = [], [], []
  names = [f"split {split!r}" + (f" of source {s.name!r}" if s.name else "") for s in sources]
  for part, where in zip(sources, names, strict=True):
    if len(part.records) == 0:
      raise ValueError(f"{where} has no records")
    reader = RecordReader(config, part.records, part.decode, table, split, part.shards,
                          source_name=part.name if mixed else "")
    shapes = part.shapes
    if shapes is None:
      shapes = buckets_lib.scan_shapes(part.records, part.decode)
    elif np.shape(shapes) != (len(part.records), 5):
      raise ValueError(f"shapes {np.shape(shapes)}; expected ({len(part.records)}, 5) for {where}")
    readers.append(reader)
    all_shapes.append(np.asarray(shapes))
    all_ids.append(buckets_lib.assign_buckets(np.asarray(shapes), table, reader.invalid))
  seeds = [source_seed(seed, index) for index in range(len(sources))]
  ratios = [_image_ratio(data.image_ratio, ids, table) if mixed or source_image_ratio
            else float(data.image_ratio) for ids in all_ids]
  if data.packing:
    max_segments = int(data.max_segments)
    budget = int(data.token_budget)
    too_big = [b.pixel_shape for b in table if b.num_tokens > budget]
    if too_big:
      raise ValueError(f"data.token_budget={budget} is smaller than one clip of buckets {too_big}; "
                       f"expected at least {max(b.num_tokens for b in table)} tokens")
    # One global clip stream, packed alike by every process (see _PackedChunks).
    plans = [buckets_lib.ClipPlan(ids, table, 0, 1, ratio, source_seed_, name)
             for ids, ratio, source_seed_, name in zip(all_ids, ratios, seeds, names, strict=True)]
    # No row can hold more clips than the smallest clip in use fits into the budget; fewer text
    # slots keep packed rows small (each slot is data.text_len x model.text_dim floats).
    in_use = {b.num_tokens for b in table for ids, ratio in zip(all_ids, ratios, strict=True)
              if np.any(ids == b.bucket_id) and (ratio > 0 if b.is_image else ratio < 1)}
    max_segments = max(1, min(max_segments, budget // min(in_use)))
    mean_tokens = sum(w * plan.mean_tokens() for w, plan in
                      zip(mixture.weights if mixture else [1.0], plans, strict=True))
    clips_per_row = min(max_segments, max(1, int(budget // mean_tokens)))
    global_rows = batch_size_per_process * process_count
    elements = _PackedChunks(plans, readers, mixture, global_rows * clips_per_row, budget, max_segments,
                             process_index, batch_size_per_process, global_rows)
  else:
    plans = [buckets_lib.BatchPlan(ids, table, batch_size_per_process * process_count, ratio,
                                   source_seed_, name)
             for ids, ratio, source_seed_, name in zip(all_ids, ratios, seeds, names, strict=True)]
    elements = _BucketedBatches(plans, readers, mixture, process_index, batch_size_per_process)
  identity = {
      "kind": "packed" if data.packing else "bucketed",
      "split": split,
      "buckets": [list(b.pixel_shape) for b in table],
      "image_ratio": float(data.image_ratio),
      "seed": int(seed),
      "global_batch_size": batch_size_per_process * process_count,
  }
  # Which record has which shape: the same dataset read from another path hashes the same.
  fingerprints = [{"records": len(part.records),
                   "shapes_sha1": hashlib.sha1(np.ascontiguousarray(shapes, np.int64).tobytes()).hexdigest()}
                  for part, shapes in zip(sources, all_shapes, strict=True)]
  if mixed:
    identity["sources"] = [{**f, "weight": round(w, 9)}
                           for f, w in zip(fingerprints, mixture.weights, strict=True)]
  else:
    identity.update(fingerprints[0])
  if data.packing:
    identity.update(token_budget=budget, max_segments=max_segments)
  return Pipeline(elements, config, batch_size_per_process, packed=bool(data.packing), identity=identity,
                  process_count=process_count, readers=readers, mixture=mixture)


class Pipeline(grain.IterDataset):
  """The batches of one process as a grain IterDataset; each iter() is a fresh PipelineIterator."""

  def __init__(self, elements: grain.MapDataset, config: ml_collections.ConfigDict, batch_size: int,
               packed: bool, identity: dict[str, Any] | None = None, process_count: int = 1,
               readers: Sequence[RecordReader] = (), mixture: buckets_lib.SourceMixture | None = None):
    super().__init__()
    self.elements = elements
    self.config = config
    self.batch_size = batch_size
    self.process_count = process_count
    self.packed = packed
    self.identity = identity or {}
    self.readers = list(readers)
    self.mixture = mixture

  @property
  def reader(self) -> RecordReader:
    """The first source's reader (the only one of a single dataset)."""
    return self.readers[0]

  def __str__(self) -> str:
    return f"Pipeline({self.elements}, batch_size={self.batch_size})"

  def __iter__(self) -> PipelineIterator:
    return PipelineIterator(self)


class PipelineIterator(grain.DatasetIterator):
  """Endless batch iterator whose state is a position in the seeded plan, not in grain's internals.

  State: {"kind": "bucketed", "step": n} (next global step), or {"kind": "packed", "chunk": c,
  "first_row": o, "row": g} (the next global batch starts at global row g, in packed chunk c, whose
  first row is global row o). Both are the same on every process and mean the same on any process
  layout. set_state restarts the grain reader (and its worker processes) at that position, so a
  state restores exactly with any data.worker_count, and is plain JSON for the checkpoint.
  """

  def __init__(self, pipeline: Pipeline):
    super().__init__()
    self._pipeline = pipeline
    self._kind = "packed" if pipeline.packed else "bucketed"
    self._inner: grain.DatasetIterator | None = None
    self._next_element = 0  # next element (step or chunk) the grain reader will produce
    # Packed: the next batch's first global row, and this process's rows read but not yet batched
    # ([arrays, first unconsumed row]).
    self._next_row = 0
    self._buffer: list[list[Any]] = []
    self._chunks = pipeline.elements.anchored(0, 0) if pipeline.packed else None

  def _elements(self) -> grain.MapDataset:
    return self._chunks if self._kind == "packed" else self._pipeline.elements

  def _reader(self) -> grain.DatasetIterator:
    if self._inner is None:
      pipeline = self._pipeline
      elements = self._elements().slice(slice(self._next_element, None))
      dataset = _prefetch(pipeline.config.data, elements.to_iter_dataset(_read_options(pipeline.config.data)))
      self._inner = iter(dataset)
    return self._inner

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise ValueError("the data iterator is closed")
    if self._kind == "bucketed":
      batch = next(self._reader())
      self._next_element += 1
      return batch
    return self._next_packed()

  def _next_packed(self) -> dict[str, np.ndarray]:
    parts, needed = [], self._pipeline.batch_size
    while needed:
      if not self._buffer:
        arrays = next(self._reader())
        self._next_element += 1
        # After a restore, this process's rows of earlier batches in the first chunk are skipped.
        keep = arrays[_GLOBAL_ROW] >= self._next_row
        if keep.any():
          self._buffer.append([{k: v[keep] for k, v in arrays.items()}, 0])
        continue
      entry = self._buffer[0]
      arrays, row = entry
      take = min(needed, len(arrays[_GLOBAL_ROW]) - row)
      parts.append({k: v[row:row + take] for k, v in arrays.items() if k != _GLOBAL_ROW})
      needed -= take
      entry[1] = row + take
      if entry[1] == len(arrays[_GLOBAL_ROW]):
        self._buffer.pop(0)
    self._next_row += self._pipeline.batch_size * self._pipeline.process_count
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def stream_identity(self) -> dict[str, Any]:
    """What a saved position is a position in: dataset, buckets, seed, global batch (JSON data).

    A bucketed stream's global batch `n` depends on these only, not on the process layout, so its
    state `{"kind": "bucketed", "step": n}` resumes on any number of processes and devices.
    """
    return dict(self._pipeline.identity)

  def clips_seen(self) -> list[int]:
    """Clips of each source the batches returned so far hold, counted from the stream's start (a
    restored position counts every clip before it); invalid clips that 'skip' replaced included."""
    pipeline = self._pipeline
    if self._kind == "packed":
      return self._chunks.clips_before(self._next_row)
    global_batch = pipeline.batch_size * pipeline.process_count
    batches = pipeline.mixture.counts(self._next_element) if pipeline.mixture else [self._next_element]
    return [count * global_batch for count in batches]

  def get_state(self) -> dict[str, Any]:
    if self._kind == "bucketed":
      return {"kind": "bucketed", "step": self._next_element}
    # The chunk holding the next global row: the same on every process whatever it has read ahead.
    chunk, first_row = self._chunks.locate(self._next_row)
    return {"kind": "packed", "chunk": chunk, "first_row": first_row, "row": self._next_row}

  def set_state(self, state: dict[str, Any]) -> None:
    expected = {"bucketed": ("step",), "packed": ("chunk", "first_row", "row")}[self._kind]
    if state.get("kind") != self._kind or any(not isinstance(state.get(k), int) for k in expected):
      raise ValueError(
          f"data iterator state {state!r} does not fit this {self._kind} pipeline; expected "
          f"{{'kind': {self._kind!r}, " + ", ".join(f"{k!r}: int" for k in expected) +
          "} (did data.packing change since the checkpoint?)")
    self._stop_reader()
    self._buffer = []
    if self._kind == "bucketed":
      self._next_element = state["step"]
    else:
      self._chunks = self._pipeline.elements.anchored(state["chunk"], state["first_row"])
      self._next_element, self._next_row = state["chunk"], state["row"]

  def start_prefetch(self) -> None:
    self._reader().start_prefetch()

  def _stop_reader(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    self._stop_reader()
    super().close()


def _prefetch(data: ml_collections.ConfigDict, dataset: grain.IterDataset) -> grain.IterDataset:
  """grain's multiprocess prefetch when data.worker_count > 0 (workers take every W-th element)."""
  if data.worker_count <= 0:
    return dataset
  return dataset.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=int(data.worker_count),
      per_worker_buffer_size=int(data.prefetch_buffer)))


def _read_options(data: ml_collections.ConfigDict) -> grain.ReadOptions:
  # Each element is a whole batch, so a few threads and a short buffer keep memory bounded; grain
  # wants at least one buffered element per thread.
  threads = int(data.read_threads)
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(threads, int(data.prefetch_buffer)))


def make_iterator(
    config: ml_collections.ConfigDict,
    data_dir: str | Sequence[tuple[str, float]],
    split: str,
    *,
    process_index: int,
    process_count: int,
    seed: int,
    batch_size_per_process: int,
    source_image_ratio: bool = False,
) -> PipelineIterator:
  """Endless iterator of this process's batches of a prepared dataset split, or of a mixture.

  `data_dir` is one dataset dir, or (dir, weight) pairs (`config.data_sources(config.data)`'s paths
  and weights) read as a mixture. Bucketed (default): {"latents" [b, T', H', W', C], "text_embeds"
  [b, data.text_len, D]} float32, one bucket shape per global batch. Packed (data.packing): see
  docs/data.md ("Pipeline"): latents [b, N, p_t*p_h*p_w*C], segment_ids, positions, loss_mask,
  text_embeds [b, S*L, D], text_segment_ids, segment_grid. A mixture adds "source". The iterator's
  get_state()/set_state() are JSON-serializable and restore to the exact next batch, whatever
  data.worker_count.
  """
  weighted = [(data_dir, 1.0)] if isinstance(data_dir, str) else list(data_dir)
  mixed = len(weighted) > 1
  sources = []
  for path, weight in weighted:
    records = schema.open_split(path, split)
    sources.append(SourceRecords(
        records, schema.decode,
        buckets_lib.load_or_scan_shapes(schema.version_dir(path), split, records, schema.decode),
        schema.split_shards(path, split), weight, path if mixed else ""))
  pipeline = make_mixture(config, sources, process_index=process_index, process_count=process_count,
                          seed=seed, batch_size_per_process=batch_size_per_process, split=split,
                          source_image_ratio=source_image_ratio)
  return iter(pipeline)


def to_global(
    batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    sharding: Any,
) -> dict[str, jax.Array]:
  """This process's batch -> global jax.Arrays (jax.make_array_from_process_local_data).

  `sharding` is one Sharding or PartitionSpec for every key (the trainer's
  `sharding.batch_sharding(mesh, rules)`), or a mapping key -> Sharding / PartitionSpec. The global
  leading dim is the local one times the number of processes the sharding spans.
  """
  result = {}
  for key, local in batch.items():
    choice = sharding.get(key) if isinstance(sharding, Mapping) else sharding
    if isinstance(choice, jax.sharding.Sharding):
      key_sharding = choice
    elif isinstance(choice, jax.sharding.PartitionSpec):
      key_sharding = jax.sharding.NamedSharding(mesh, choice)
    else:
      raise ValueError(f"sharding for batch key {key!r} is {type(choice).__name__}; expected a "
                       "jax.sharding.Sharding or a PartitionSpec")
    result[key] = jax.make_array_from_process_local_data(key_sharding, np.asarray(local))
  return result
