"""The on-disk record format of prepared latent clip datasets, and how to open one for reading.

Owns SCHEMA_VERSION, the TFDS feature spec, `encode` (record -> on-disk example), `decode` (raw
example -> record), the dataset metadata and shape index file names, and `open_split`, which checks
the schema version and every ArrayRecord shard before handing back a random-access source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sora_jax import choices
from sora_jax.files import layout, paths

# Bump when the meaning or layout of a record changes; readers refuse any other version.
SCHEMA_VERSION = 1
DATASET_NAME = layout.DATASET_NAME
DATASET_VERSION = layout.DATASET_VERSION
DATASET_INFO_FILE = layout.DATASET_INFO_FILE  # tfds writes it last; a dataset without it is incomplete
METADATA_FILE = "metadata.json"  # tfds.core.MetadataDict file in the dataset version dir
TOKENIZER_FILE = layout.TOKENIZER_FILE  # sentencepiece model copied next to the shards
# Per-record shape index of a split, [N, 5] int32 rows (T', H', W', C, is_image) in record order;
# written by prepare so readers never scan a split to bucket it (buckets.load_or_scan_shapes).
LATENT_SHAPES_FILE = "latent_shapes-{split}.npy"

RECORD_DTYPES = choices.RECORD_DTYPES

# Keys and numpy types of a decoded record (the contract every reader relies on).
RECORD_KEYS = (
    "latents", "text_embeds", "text_len", "caption", "source", "clip_start_s", "fps", "num_frames",
    "height", "width", "is_image", "schema_version")


class DatasetError(layout.DatasetLayoutError):
  """A prepared dataset (or one of its records) that cannot be read as this schema."""


# record_dtype -> (dtype stored on disk, dtype of decoded arrays). TFDS features have no bfloat16 without
# TensorFlow; its bits round-trip exactly through uint16.
# The record's scalar fields and their numpy types, the same on disk and decoded.
_SCALARS = {"clip_start_s": np.float32, "fps": np.float32, "num_frames": np.int32, "height": np.int32,
            "width": np.int32, "is_image": bool}

_DTYPES = {"float16": (np.dtype(np.float16), np.dtype(np.float16)),
           "bfloat16": (np.dtype(np.uint16), np.dtype(ml_dtypes.bfloat16))}


def _dtypes(record_dtype: str) -> tuple[np.dtype, np.dtype]:
  if record_dtype not in _DTYPES:
    raise DatasetError(f"record_dtype={record_dtype!r}; expected one of {RECORD_DTYPES}")
  return _DTYPES[record_dtype]


def storage_dtype(record_dtype: str) -> np.dtype:
  """The numpy dtype the arrays are stored as: float16, or bfloat16 as its uint16 bit pattern."""
  return _dtypes(record_dtype)[0]


def array_dtype(record_dtype: str) -> np.dtype:
  """The numpy dtype decoded arrays have (ml_dtypes.bfloat16 or float16)."""
  return _dtypes(record_dtype)[1]


def features(latent_channels: int, text_dim: int, record_dtype: str):
  """The tfds FeaturesDict of one on-disk example.

  Latents have a free (T', H', W') so every bucket shares one spec. Text embeddings are stored only up
  to their valid length (the zero padding is restored by `decode`), which keeps umT5's 512x4096
  embeddings from doubling the size of a dataset.
  """
  import tensorflow_datasets as tfds  # deferred: tfds is slow to import and only needed here

  stored = storage_dtype(record_dtype)
  scalar = tfds.features.Scalar
  return tfds.features.FeaturesDict({
      "latents": tfds.features.Tensor(
          shape=(None, None, None, latent_channels), dtype=stored, encoding="bytes"),
      "text_embeds": tfds.features.Tensor(shape=(None, text_dim), dtype=stored, encoding="bytes"),
      "text_len": scalar(dtype=np.int32),
      "text_max_len": scalar(dtype=np.int32),
      "caption": tfds.features.Text(),
      "source": tfds.features.Text(),
      "clip_start_s": scalar(dtype=np.float32),
      "fps": scalar(dtype=np.float32),
      "num_frames": scalar(dtype=np.int32),
      "height": scalar(dtype=np.int32),
      "width": scalar(dtype=np.int32),
      "is_image": scalar(dtype=np.bool_),
      "schema_version": scalar(dtype=np.int32),
  })


def encode(record: Mapping[str, Any], record_dtype: str) -> dict[str, Any]:
  """A record (the keys of RECORD_KEYS, float arrays of any float dtype) -> on-disk example dict."""
  missing = [key for key in RECORD_KEYS if key not in record and key != "schema_version"]
  if missing:
    raise DatasetError(f"record is missing keys {missing}; expected {list(RECORD_KEYS)}")
  latents = np.asarray(record["latents"])
  text_embeds = np.asarray(record["text_embeds"])
  if latents.ndim != 4:
    raise DatasetError(f"record latents have shape {latents.shape}; expected [T', H', W', C]")
  if text_embeds.ndim != 2:
    raise DatasetError(f"record text_embeds have shape {text_embeds.shape}; expected [L, D_text]")
  text_len = int(record["text_len"])
  if not 0 <= text_len <= text_embeds.shape[0]:
    raise DatasetError(f"record text_len={text_len} outside [0, {text_embeds.shape[0]}]")
  stored = storage_dtype(record_dtype)
  as_stored = lambda array: np.ascontiguousarray(
      array.astype(array_dtype(record_dtype))).view(stored)
  return {
      "latents": as_stored(latents),
      "text_embeds": as_stored(text_embeds[:text_len]),
      "text_len": np.int32(text_len),
      "text_max_len": np.int32(text_embeds.shape[0]),
      "caption": str(record["caption"]),
      "source": str(record["source"]),
      **{key: cast(record[key]) for key, cast in _SCALARS.items()},
      "schema_version": np.int32(record.get("schema_version", SCHEMA_VERSION)),
  }


def decode(raw: Mapping[str, Any]) -> dict[str, Any]:
  """A raw example from `open_split(...)[i]` -> record dict with exactly RECORD_KEYS.

  Latents and text embeddings come back as float16 or ml_dtypes.bfloat16 (whichever the dataset
  stores); text embeddings are zero-padded back to [text_max_len, D_text].
  """
  version = int(raw["schema_version"])
  if version != SCHEMA_VERSION:
    raise DatasetError(f"record has schema_version={version}; this reader expects {SCHEMA_VERSION}")
  latents = _from_stored(np.asarray(raw["latents"]))
  valid_embeds = _from_stored(np.asarray(raw["text_embeds"]))
  text_len = int(raw["text_len"])
  text_max_len = int(raw["text_max_len"])
  if valid_embeds.shape[0] != text_len or text_len > text_max_len:
    raise DatasetError(
        f"record text_embeds have {valid_embeds.shape[0]} rows, text_len={text_len}, "
        f"text_max_len={text_max_len}; expected rows == text_len <= text_max_len")
  text_embeds = np.zeros((text_max_len, valid_embeds.shape[1]), valid_embeds.dtype)
  text_embeds[:text_len] = valid_embeds
  return {
      "latents": latents,
      "text_embeds": text_embeds,
      "text_len": np.int32(text_len),
      "caption": _as_str(raw["caption"]),
      "source": _as_str(raw["source"]),
      **{key: cast(raw[key]) for key, cast in _SCALARS.items()},
      "schema_version": np.int32(version),
  }


def _from_stored(array: np.ndarray) -> np.ndarray:
  if array.dtype == np.uint16:
    return array.view(ml_dtypes.bfloat16)
  if array.dtype == np.float16:
    return array
  raise DatasetError(f"stored array has dtype {array.dtype}; expected uint16 (bfloat16 bits) or float16")


def _as_str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def version_dir(data_dir: str) -> str:
  """The TFDS version dir (holding dataset_info.json and shards) of a prepared dataset dir."""
  return layout.dataset_version_dir(data_dir, DatasetError)


def read_metadata(data_dir: str) -> dict[str, Any]:
  """The dataset-level metadata prepare stored, after checking its schema_version."""
  vdir = version_dir(data_dir)
  path = os.path.join(vdir, METADATA_FILE)
  try:
    metadata = json.loads(paths.read_text(path))
  except FileNotFoundError:
    raise DatasetError(f"dataset dir {data_dir!r} has no {METADATA_FILE}; it was not written by "
                       f"sora_jax.prepare (schema_version {SCHEMA_VERSION})") from None
  except json.JSONDecodeError as e:
    raise DatasetError(f"dataset metadata {path!r} is not valid JSON: {e}") from None
  version = metadata.get("schema_version")
  if version != SCHEMA_VERSION:
    raise DatasetError(
        f"dataset dir {data_dir!r} has schema_version={version}, but this sora_jax reads "
        f"schema_version={SCHEMA_VERSION}; re-run sora_jax.prepare to rewrite it")
  return metadata


def latent_shapes_path(data_dir: str, split: str) -> str:
  """Where the shape index of `split` lives: next to the shards, in the version dir."""
  return os.path.join(version_dir(data_dir), LATENT_SHAPES_FILE.format(split=split))


def tokenizer_path(data_dir: str) -> str:
  """The sentencepiece model stored with a prepared dataset."""
  return layout.dataset_tokenizer_path(data_dir, DatasetError)


def split_shards(data_dir: str, split: str) -> list[tuple[str, int]]:
  """(shard path, number of records) of every ArrayRecord shard of `split`, from dataset_info.json."""
  vdir = version_dir(data_dir)
  info = json.loads(paths.read_text(os.path.join(vdir, "dataset_info.json")))
  splits = {s["name"]: s for s in info.get("splits", [])}
  if split not in splits:
    raise DatasetError(f"dataset dir {data_dir!r} has no split {split!r}; it has {sorted(splits)}")
  lengths = [int(n) for n in splits[split].get("shardLengths", [])]
  name = info.get("name", DATASET_NAME)
  total = len(lengths)
  return [
      (os.path.join(vdir, f"{name}-{split}.array_record-{i:05d}-of-{total:05d}"), n)
      for i, n in enumerate(lengths)]


def check_shards(data_dir: str, split: str) -> None:
  """Opens every shard of a split; a missing, truncated or corrupt one raises naming the shard."""
  from array_record.python import array_record_module  # deferred: native extension

  for path, expected in split_shards(data_dir, split):
    if not paths.is_file(path):
      raise DatasetError(f"shard {path} of split {split!r} is missing")
    try:
      reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
      # A shard cut short loses its footer: the reader opens but is not ok() and reports 0 records.
      problem = None if reader.ok() else "its footer cannot be read"
      found = reader.num_records()
      reader.close()
    except (RuntimeError, OSError, ValueError) as e:
      problem = str(e)
    if problem is not None:
      raise DatasetError(
          f"shard {path} of split {split!r} is truncated or corrupt ({problem}); re-run sora_jax.prepare")
    if found != expected:
      raise DatasetError(
          f"shard {path} of split {split!r} holds {found} records; dataset_info.json says {expected}")


def open_split(data_dir: str, split: str):
  """A random-access source (len, [i]) of raw examples of `split`; decode each with `decode`.

  Checks the schema version and every shard first, so a stale or damaged dataset fails here with one
  message instead of deep inside a data loader worker.
  """
  read_metadata(data_dir)
  check_shards(data_dir, split)
  import tensorflow_datasets as tfds  # deferred: tfds is slow to import

  builder = tfds.builder_from_directory(version_dir(data_dir))
  return builder.as_data_source(split=split)
