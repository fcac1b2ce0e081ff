"""The TFDS builder that writes prepared clips as an ArrayRecord dataset (no TensorFlow needed).

Owns `SoraClips` (a GeneratorBasedBuilder fed by per-split work items and a function expanding each
item into examples, run in-process or as an Apache Beam pipeline), the uncompressed ArrayRecord shard
writer, the record order and per-split shape index, and `write_dataset`, which builds into a staging
dir and swaps the finished dataset into place so a failed run never corrupts one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core import hashing
from tensorflow_datasets.core import writer as tfds_writer

from sora_jax.data import buckets, schema
from sora_jax.files import atomic, paths

# tfds writes ArrayRecord with array_record's default compression (zstd); bf16/fp16 latents barely
# compress, and decompression would cost several times the read itself (experiments/data_pipeline.md).
# group_size:1 keeps one record per chunk (random access).
# Readers detect the compression per chunk, so datasets written either way read the same.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
# Records of each predicted shape that are read back to check a shape index before publishing it.
_CHECKS_PER_SHAPE = 8

# (work items, expand) per split: expand(item) yields (unique key, example) pairs, where an example
# is already `schema.encode`d. `expand` must be picklable (a module-level function or a partial of
# one) when the Beam runner is used.
SplitGenerator = tuple[Sequence[Any], Callable[[Any], Iterable[tuple[str, dict[str, Any]]]]]


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a dataset that exists only where prepare writes it."""

  def initialize_from_bucket(self) -> None:
    """Skips TFDS's lookup of pre-computed metadata on its public GCS bucket: no sora_jax dataset is
    there, and the lookup leaves an empty `/tmp/tmp*tfds` directory behind on every build."""
    return


# Unregistered: `tfds.data_source("sora_clips", data_dir=DIR)` then reads a prepared dir from its own
# dataset_info.json (a registered class would need the writer's arguments just to open it).
class SoraClips(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Latent video/image clips with text embeddings; one example per clip (see sora_jax.data.schema)."""

  VERSION = tfds.core.Version(schema.DATASET_VERSION)
  RELEASE_NOTES = {schema.DATASET_VERSION: f"schema_version {schema.SCHEMA_VERSION}"}

  def __init__(self, *, latent_channels: int, text_dim: int, record_dtype: str,
               splits: Mapping[str, SplitGenerator], metadata: Mapping[str, Any],
               use_beam: bool = False, **kwargs):
    self._use_beam = use_beam
    self._latent_channels = latent_channels
    self._text_dim = text_dim
    self._record_dtype = record_dtype
    self._splits = dict(splits)
    self._metadata = dict(metadata)
    super().__init__(file_format="array_record", **kwargs)

  def _example_writer(self) -> tfds_writer.ExampleWriter:
    return _ArrayRecordWriter(self.info.file_format)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(
        builder=self,
        description=self.__class__.__doc__,
        features=schema.features(self._latent_channels, self._text_dim, self._record_dtype),
        metadata=tfds.core.MetadataDict(self._metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name) for name in self._splits}

  def _generate_examples(self, split: str):
    items, expand = self._splits[split]
    if self._use_beam:
      beam = tfds.core.lazy_imports.apache_beam
      return beam.Create(list(items)) | beam.FlatMap(expand)
    return _expand_all(items, expand)


def _expand_all(items, expand):
  for item in items:
    yield from expand(item)


class _ArrayRecordWriter(tfds_writer.ExampleWriter):
  """Writes each shard as ArrayRecord with ARRAY_RECORD_OPTIONS (module-level: Beam pickles it)."""

  def write(self, path, examples) -> None:
    from array_record.python import array_record_module  # deferred: native extension

    writer = array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_OPTIONS)
    try:
      for _, serialized in examples:
        writer.write(serialized)
    finally:
      writer.close()


def record_order(keys: Sequence[Any], split: str) -> np.ndarray:
  """Positions into `keys` in the order tfds stores their examples in `split` (all shards in turn).

  tfds sorts a split by the md5 of (split name, key) (tensorflow_datasets.core.hashing, stable by
  design: it fixes the order of every published dataset) and cuts the sorted run into shards.
  """
  hasher = hashing.Hasher(split)
  hashes = [hasher.hash_key(key) for key in keys]
  return np.asarray(sorted(range(len(keys)), key=hashes.__getitem__), np.int64)


class _Subset:
  """Records `indices` of a random-access source, read lazily."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, position: int):
    return self.source[self.indices[position]]


def _checked_indices(shapes: np.ndarray) -> list[int]:
  """Up to _CHECKS_PER_SHAPE records per distinct shape, spread over the split.

  Sampling per shape (not uniformly) is what catches a wrong order: a record predicted to have a
  rare shape almost surely has another one if the prediction is a shuffle.
  """
  picked = []
  for row in np.unique(shapes, axis=0):
    matching = np.flatnonzero((shapes == row).all(axis=1))
    spread = np.linspace(0, len(matching) - 1, min(len(matching), _CHECKS_PER_SHAPE)).round()
    picked.extend(int(matching[int(i)]) for i in spread)
  return sorted(set(picked))


def _publish_shapes(staged_dir: str, split: str, shapes_by_key: Mapping[Any, Sequence[int]] | None) -> None:
  """Writes `split`'s shape index into the staged dataset.

  From `shapes_by_key` ({example key: (T', H', W', C, is_image)}) put in storage order and checked
  against records read back; without it, or if the check fails, from a scan of the staged split.
  """
  source = tfds.builder_from_directory(staged_dir).as_data_source(split=split)
  shapes = None
  if shapes_by_key is not None:
    keys = list(shapes_by_key)
    rows = np.asarray([tuple(shapes_by_key[key]) for key in keys], np.int32).reshape(-1, 5)
    if len(rows) == len(source):
      shapes = rows[record_order(keys, split)]
      checked = _checked_indices(shapes)
      found = buckets.scan_shapes(_Subset(source, checked), schema.decode)
      if not np.array_equal(found, shapes[checked]):
        logging.warning("the shape index of split %r disagrees with its records; scanning the split "
                        "(did tfds change its record order?)", split)
        shapes = None
    else:
      logging.warning("shape index of split %r has %d rows for %d records; scanning the split",
                      split, len(rows), len(source))
  if shapes is None:
    shapes = buckets.scan_shapes(source, schema.decode)
  np.save(os.path.join(staged_dir, schema.LATENT_SHAPES_FILE.format(split=split)), shapes)


def write_dataset(out_dir: str, *, latent_channels: int, text_dim: int, record_dtype: str,
                  splits: Mapping[str, SplitGenerator], metadata: Mapping[str, Any], num_shards: int,
                  extra_files: Mapping[str, str] | None = None, beam_runner: Any = None,
                  beam_options: Any = None,
                  latent_shapes: Mapping[str, Mapping[Any, Sequence[int]]] | None = None) -> str:
  """Builds the dataset and moves it to `out_dir/sora_clips/1.0.0`; returns that version dir.

  The build happens in a staging dir under `out_dir`; only a complete dataset (shards, dataset_info,
  metadata, each split's shape index and `extra_files`, a {file name: source path} map copied next
  to the shards) replaces the previous one, with two renames on the same filesystem.
  `latent_shapes` ({split: {example key: (T', H', W', C, is_image)}}) saves reading a split back to
  index it; a split missing from it is scanned once here instead of by every reader.
  """
  if "schema_version" not in metadata:
    raise ValueError("dataset metadata needs a schema_version entry")
  if paths.is_remote(out_dir):
    with tempfile.TemporaryDirectory(prefix="sora_jax_dataset_") as local:
      built = write_dataset(local, latent_channels=latent_channels, text_dim=text_dim,
                            record_dtype=record_dtype, splits=splits, metadata=metadata,
                            num_shards=num_shards, extra_files=extra_files, beam_runner=beam_runner,
                            beam_options=beam_options, latent_shapes=latent_shapes)
      return _publish_to_bucket(built, os.path.join(out_dir, schema.DATASET_NAME, schema.DATASET_VERSION))
  os.makedirs(out_dir, exist_ok=True)
  staging = os.path.join(out_dir, f".staging-{uuid.uuid4().hex[:8]}")
  try:
    builder = SoraClips(
        data_dir=staging, latent_channels=latent_channels, text_dim=text_dim,
        record_dtype=record_dtype, splits=splits, metadata=metadata,
        use_beam=beam_runner is not None or beam_options is not None)
    download_config = tfds.download.DownloadConfig(
        num_shards=num_shards, beam_runner=beam_runner, beam_options=beam_options)
    builder.download_and_prepare(download_config=download_config)
    staged = os.path.join(staging, schema.DATASET_NAME, schema.DATASET_VERSION)
    for split in splits:
      _publish_shapes(staged, split, (latent_shapes or {}).get(split))
    for name, source in (extra_files or {}).items():
      with open(os.path.join(staged, name), "wb") as f:
        f.write(paths.read_bytes(source))  # the source may be in a bucket (prepare's work dir)
    final = os.path.join(out_dir, schema.DATASET_NAME, schema.DATASET_VERSION)
    atomic.replace_directory(staged, final)
    return final
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _publish_to_bucket(built: str, final: str) -> str:
  """Uploads the complete local version dir `built` to `final` in a bucket; returns `final`.

  A bucket has no directory rename: the old dataset's dataset_info.json (what makes readers see a
  dataset) goes first, then its other objects, and the new one's dataset_info.json is uploaded last,
  so a reader finds either no dataset or a whole one. The old dataset is gone from the moment the
  upload starts (the new one is already complete on local disk then).
  """
  info = os.path.join(final, schema.DATASET_INFO_FILE)
  if paths.is_file(info):
    paths.resolve(info).unlink()
  paths.remove_tree(final)
  paths.upload_tree(built, final, last=(schema.DATASET_INFO_FILE,))
  return final
