"""The grain input pipeline: prepared latent clips -> per-process numpy batches -> global jax.Arrays.

Owns record validation, the bucketed and packed batch datasets, grain prefetch (threads or worker
processes), the malloc tuning reads need, the checkpointable iterator (`make_iterator`) and global
batch assembly (`to_global`).
"""

from __future__ import annotations

import bisect
import ctypes
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
               split: str, shards: Sequence[tuple[str, int]] = ()):
    self.source = source
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

  A record that fails validation under 'skip' is replaced by a valid record of the same batch (or,
  if none, of the same bucket) so the batch keeps its shape on every process.
  """

  def __init__(self, plan: buckets_lib.BatchPlan, reader: RecordReader, process_index: int,
               batch_size: int):
    super().__init__()
    self._plan = plan
    self._reader = reader
    self._columns = slice(process_index * batch_size, (process_index + 1) * batch_size)

  def __len__(self) -> int:
    return _ENDLESS

  def __str__(self) -> str:
    return "BucketedBatches"

  def __getitem__(self, step):
    if isinstance(step, slice):
      return self.slice(step)
    bucket_id, records = self._plan.step(int(step))
    bucket = self._plan.table[bucket_id]
    mine = records[self._columns]
    latents = np.empty((len(mine), *bucket.latent_shape), np.float32)
    text_embeds = np.empty((len(mine), self._reader.text_len, self._reader.text_dim), np.float32)
    invalid_slots = []
    for slot, index in enumerate(mine):
      try:
        self._reader.read_into(index, bucket, latents[slot], text_embeds[slot])
      except _Invalid as problem:
        self._reader.invalid(int(index), str(problem))
        invalid_slots.append(slot)
    if invalid_slots:
      self._replace(latents, text_embeds, invalid_slots, bucket, int(step))
    return {"latents": latents, "text_embeds": text_embeds}

  def _replace(self, latents: np.ndarray, text_embeds: np.ndarray, invalid_slots: list[int],
               bucket: buckets_lib.Bucket, step: int) -> None:
    valid_slots = [s for s in range(len(latents)) if s not in invalid_slots]
    if valid_slots:
      for k, slot in enumerate(invalid_slots):
        source_slot = valid_slots[k % len(valid_slots)]
        latents[slot], text_embeds[slot] = latents[source_slot], text_embeds[source_slot]
      return
    # The whole local batch failed: walk the bucket from a step-dependent start for one good clip.
    candidates = self._plan.bucket_records(bucket.bucket_id)
    for k in range(len(candidates)):
      index = int(candidates[(step + k) % len(candidates)])
      try:
        clip_latents, clip_text = self._reader.read(index, bucket)
      except _Invalid:
        continue
      latents[:], text_embeds[:] = clip_latents, clip_text
      return
    raise InvalidRecordError(f"every record of bucket {bucket.pixel_shape} in split "
                             f"{self._reader.split!r} fails validation")


class _PackedChunks(picklable.LockedPicklable, grain.MapDataset):
  """Element `chunk` = this process's rows of global packed chunk `chunk`.

  Chunk c packs clips [c*C, (c+1)*C) of the global clip stream first-fit into rows, so it yields a
  varying number of rows; the rows of all chunks in order form the global row stream, and global
  batch s is its rows [s*R, (s+1)*R) (R = global rows per batch), process p taking rows
  [s*R + p*r, s*R + (p+1)*r). The packing depends on token counts only, so every process plans every
  chunk alike but reads only the clips of its own rows: the stream, and a position in it, do not
  depend on the process layout. Where a chunk's rows start in the row stream is counted forward from
  an anchor (a chunk and its first global row; chunk 0 at row 0 until a restore moves it). A clip
  that fails validation under 'skip' is left out of its row (its tokens stay padding).
  """

  def __init__(self, plan: buckets_lib.ClipPlan, reader: RecordReader, clips_per_chunk: int,
               token_budget: int, max_segments: int, process_index: int, rows_per_process: int,
               global_rows: int, anchor: tuple[int, int] = (0, 0)):
    super().__init__()
    self._plan = plan
    self._reader = reader
    self._clips_per_chunk = clips_per_chunk
    self._token_budget = token_budget
    self._max_segments = max_segments
    self._process_index = process_index
    self._rows_per_process = rows_per_process
    self._global_rows = global_rows
    self.anchor = anchor
    bucket = plan.table[0]
    self._token_dim = int(np.prod(bucket.patch_size)) * bucket.latent_shape[-1]
    self._offsets = {anchor[0]: anchor[1]}  # chunk -> its first global row, for chunks >= the anchor
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return _ENDLESS

  def __str__(self) -> str:
    return "PackedChunks"

  def anchored(self, chunk: int, first_row: int) -> _PackedChunks:
    """The same chunks, counting row positions forward from `chunk` starting at global row `first_row`."""
    return _PackedChunks(self._plan, self._reader, self._clips_per_chunk, self._token_budget,
                         self._max_segments, self._process_index, self._rows_per_process,
                         self._global_rows, (int(chunk), int(first_row)))

  def _records(self, chunk: int) -> tuple[list[int], list[buckets_lib.Bucket]]:
    start = chunk * self._clips_per_chunk
    records = [self._plan.clip(p) for p in range(start, start + self._clips_per_chunk)]
    return records, [self._plan.table[self._plan.bucket_ids[r]] for r in records]

  def _rows(self, chunk: int) -> tuple[list[list[int]], list[int], list[buckets_lib.Bucket]]:
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
    arrays = packing.empty_rows(len(mine), self._token_budget, self._token_dim, self._max_segments,
                                self._reader.text_len, self._reader.text_dim)
    for slot, index in enumerate(mine):
      clips = []
      for position in rows[index]:
        try:
          clips.append(self._reader.read(records[position], clip_buckets[position]))
        except _Invalid as problem:
          self._reader.invalid(records[position], str(problem))
      packing.fill_row(arrays, slot, clips, clip_buckets[0].patch_size)
    arrays[_GLOBAL_ROW] = np.asarray([first + index for index in mine], np.int64)
    return arrays


# Chunk offsets a packed dataset keeps besides its anchor: enough for grain's read-ahead.
_OFFSETS_KEPT = 256
# Key of the packed elements' global row indices: bookkeeping for PipelineIterator, not batch data.
_GLOBAL_ROW = "_global_row"


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
  """The pipeline as a grain IterDataset over any random-access `source` of records.

  `decode` turns a raw source element into the record dict (sora_jax.data.schema.decode for prepared
  datasets). `shapes` (buckets.scan_shapes of the source) saves the scan when the caller has it;
  `shards` ((path, records) in source order) lets validation errors name the shard of a record.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process={batch_size_per_process}; expected >= 1")
  if len(source) == 0:
    raise ValueError(f"split {split!r} has no records")
  table = buckets_lib.bucket_table(config)
  reader = RecordReader(config, source, decode, table, split, shards)
  if shapes is None:
    shapes = buckets_lib.scan_shapes(source, decode)
  elif np.shape(shapes) != (len(source), 5):
    raise ValueError(f"shapes {np.shape(shapes)}; expected ({len(source)}, 5) for split {split!r}")
  bucket_ids = buckets_lib.assign_buckets(np.asarray(shapes), table, reader.invalid)
  data = config.data
  if data.packing:
    max_segments = int(data.max_segments)
    budget = int(data.token_budget)
    too_big = [b.pixel_shape for b in table if b.num_tokens > budget]
    if too_big:
      raise ValueError(f"data.token_budget={budget} is smaller than one clip of buckets {too_big}; "
                       f"expected at least {max(b.num_tokens for b in table)} tokens")
    # One global clip stream, packed alike by every process (see _PackedChunks).
    plan = buckets_lib.ClipPlan(bucket_ids, table, 0, 1, data.image_ratio, seed, f"split {split!r}")
    # No row can hold more clips than the smallest clip in use fits into the budget; fewer text
    # slots keep packed rows small (each slot is data.text_len x model.text_dim floats).
    in_use = {b.num_tokens for b in table if np.any(bucket_ids == b.bucket_id)
              and (data.image_ratio > 0 if b.is_image else data.image_ratio < 1)}
    max_segments = max(1, min(max_segments, budget // min(in_use)))
    clips_per_row = min(max_segments, max(1, int(budget // plan.mean_tokens())))
    global_rows = batch_size_per_process * process_count
    elements = _PackedChunks(plan, reader, global_rows * clips_per_row, budget, max_segments,
                             process_index, batch_size_per_process, global_rows)
  else:
    plan = buckets_lib.BatchPlan(bucket_ids, table, batch_size_per_process * process_count,
                                 data.image_ratio, seed, f"split {split!r}")
    elements = _BucketedBatches(plan, reader, process_index, batch_size_per_process)
  identity = {
      "kind": "packed" if data.packing else "bucketed",
      "split": split,
      "records": len(source),
      # Which record has which shape: the same dataset read from another path hashes the same.
      "shapes_sha1": hashlib.sha1(np.ascontiguousarray(shapes, np.int64).tobytes()).hexdigest(),
      "buckets": [list(b.pixel_shape) for b in table],
      "image_ratio": float(data.image_ratio),
      "seed": int(seed),
      "global_batch_size": batch_size_per_process * process_count,
  }
  if data.packing:
    identity.update(token_budget=budget, max_segments=max_segments)
  return Pipeline(elements, config, batch_size_per_process, packed=bool(data.packing), identity=identity,
                  process_count=process_count)


class Pipeline(grain.IterDataset):
  """The batches of one process as a grain IterDataset; each iter() is a fresh PipelineIterator."""

  def __init__(self, elements: grain.MapDataset, config: ml_collections.ConfigDict, batch_size: int,
               packed: bool, identity: dict[str, Any] | None = None, process_count: int = 1):
    super().__init__()
    self.elements = elements
    self.config = config
    self.batch_size = batch_size
    self.process_count = process_count
    self.packed = packed
    self.identity = identity or {}

  @property
  def reader(self) -> RecordReader:
    return self.elements._reader  # noqa: SLF001

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
    data_dir: str,
    split: str,
    *,
    process_index: int,
    process_count: int,
    seed: int,
    batch_size_per_process: int,
) -> PipelineIterator:
  """Endless iterator of this process's batches of a prepared dataset split.

  Bucketed (default): {"latents" [b, T', H', W', C], "text_embeds" [b, data.text_len, D]} float32,
  one bucket shape per global batch. Packed (data.packing): see docs/data.md ("Pipeline"):
  latents [b, N, p_t*p_h*p_w*C], segment_ids, positions, loss_mask, text_embeds [b, S*L, D],
  text_segment_ids, segment_grid. The iterator's get_state()/set_state() are JSON-serializable and
  restore to the exact next batch, whatever data.worker_count.
  """
  source = schema.open_split(data_dir, split)
  shapes = buckets_lib.load_or_scan_shapes(schema.version_dir(data_dir), split, source, schema.decode)
  pipeline = make_dataset(config, source, process_index=process_index, process_count=process_count,
                          seed=seed, batch_size_per_process=batch_size_per_process,
                          decode=schema.decode, split=split, shapes=shapes,
                          shards=schema.split_shards(data_dir, split))
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
