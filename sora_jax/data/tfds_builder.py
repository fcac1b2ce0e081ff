"""The TFDS builder that writes prepared clips as an ArrayRecord dataset (no TensorFlow needed).

Owns `SoraClips` (a GeneratorBasedBuilder fed by per-split work items and a function expanding each
item into examples, run in-process or as an Apache Beam pipeline) and `write_dataset`, which builds
into a staging dir and swaps the finished dataset into place so a failed run never corrupts one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from sora_jax.data import schema

# (work items, expand) per split: expand(item) yields (unique key, example) pairs, where an example
# is already `schema.encode`d. `expand` must be picklable (a module-level function or a partial of
# one) when the Beam runner is used.
SplitGenerator = tuple[Sequence[Any], Callable[[Any], Iterable[tuple[str, dict[str, Any]]]]]


class SoraClips(tfds.core.GeneratorBasedBuilder):
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

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
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


def write_dataset(out_dir: str, *, latent_channels: int, text_dim: int, record_dtype: str,
                  splits: Mapping[str, SplitGenerator], metadata: Mapping[str, Any], num_shards: int,
                  extra_files: Mapping[str, str] | None = None, beam_runner: Any = None,
                  beam_options: Any = None) -> str:
  """Builds the dataset and moves it to `out_dir/sora_clips/1.0.0`; returns that version dir.

  The build happens in a staging dir under `out_dir`; only a complete dataset (shards, dataset_info,
  metadata and `extra_files`, a {file name: source path} map copied next to the shards) replaces the
  previous one, with two renames on the same filesystem.
  """
  if "schema_version" not in metadata:
    raise ValueError("dataset metadata needs a schema_version entry")
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
    for name, source in (extra_files or {}).items():
      shutil.copyfile(source, os.path.join(staged, name))
    final = os.path.join(out_dir, schema.DATASET_NAME, schema.DATASET_VERSION)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    retired = None
    if os.path.exists(final):
      retired = os.path.join(out_dir, f".retired-{uuid.uuid4().hex[:8]}")
      os.rename(final, retired)
    os.rename(staged, final)
    if retired:
      shutil.rmtree(retired, ignore_errors=True)
    return final
  finally:
    shutil.rmtree(staging, ignore_errors=True)
