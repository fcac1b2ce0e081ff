"""Record format: encode/decode round trips, the TFDS ArrayRecord builder, and reader-side checks."""

import functools
import json
import os
import tempfile

import ml_dtypes
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sora_jax.data import buckets, schema
from sora_jax.offline import tfds_builder


def _record(index: int, frames: int, text_len: int = 3, max_len: int = 6, dim: int = 8) -> dict:
  rng = np.random.default_rng(index)
  text_embeds = np.zeros((max_len, dim), np.float32)
  text_embeds[:text_len] = rng.normal(size=(text_len, dim))
  return dict(
      latents=rng.normal(size=(frames, 4, 6, 12)).astype(np.float32), text_embeds=text_embeds,
      text_len=text_len, caption=f"caption {index}", source=f"videos/v{index}.mp4",
      clip_start_s=0.5 * index, fps=8.0, num_frames=frames, height=8, width=12, is_image=frames == 1)


def _expand(split: str, record_dtype: str, index: int):
  yield f"{split}-{index}-a", schema.encode(_record(index, frames=4), record_dtype)
  yield f"{split}-{index}-b", schema.encode(_record(100 + index, frames=1), record_dtype)


def _write(out_dir: str, record_dtype: str = "bfloat16", num_train: int = 3, metadata=None, **kwargs) -> str:
  splits = {
      "train": (list(range(num_train)), functools.partial(_expand, "train", record_dtype)),
      "validation": ([7], functools.partial(_expand, "validation", record_dtype)),
  }
  return tfds_builder.write_dataset(
      out_dir, latent_channels=12, text_dim=8, record_dtype=record_dtype, splits=splits,
      metadata=metadata or {"schema_version": schema.SCHEMA_VERSION, "note": "test"}, num_shards=2,
      **kwargs)


@pytest.mark.parametrize("record_dtype", ["bfloat16", "float16"])
def test_encode_decode_round_trip(record_dtype):
  record = _record(3, frames=4)
  decoded = schema.decode(schema.encode(record, record_dtype))
  assert set(decoded) == set(schema.RECORD_KEYS)
  expected_dtype = ml_dtypes.bfloat16 if record_dtype == "bfloat16" else np.float16
  assert decoded["latents"].dtype == expected_dtype
  assert decoded["text_embeds"].dtype == expected_dtype
  np.testing.assert_array_equal(decoded["latents"], record["latents"].astype(expected_dtype))
  np.testing.assert_array_equal(decoded["text_embeds"], record["text_embeds"].astype(expected_dtype))
  assert decoded["text_embeds"].shape == (6, 8)
  assert not decoded["text_embeds"][3:].any()
  assert decoded["caption"] == "caption 3" and decoded["source"] == "videos/v3.mp4"
  assert decoded["schema_version"] == schema.SCHEMA_VERSION


def test_encode_stores_only_valid_text_rows():
  example = schema.encode(_record(1, frames=2, text_len=2, max_len=6), "float16")
  assert example["text_embeds"].shape == (2, 8)
  assert example["text_max_len"] == 6


def test_encode_rejects_bad_shapes():
  record = _record(1, frames=2)
  record["latents"] = record["latents"][0]
  with pytest.raises(schema.DatasetError, match=r"latents have shape \(4, 6, 12\)"):
    schema.encode(record, "float16")
  with pytest.raises(schema.DatasetError, match="missing keys"):
    schema.encode({"latents": np.zeros((1, 1, 1, 1))}, "float16")


@pytest.mark.parametrize("record_dtype", ["bfloat16", "float16"])
def test_write_and_read_dataset(tmp_path, record_dtype):
  version_dir = _write(str(tmp_path), record_dtype)
  assert version_dir == os.path.join(str(tmp_path), "sora_clips", "1.0.0")
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".staging")]
  train = schema.open_split(str(tmp_path), "train")
  validation = schema.open_split(str(tmp_path), "validation")
  assert len(train) == 6 and len(validation) == 2
  records = [schema.decode(train[i]) for i in range(len(train))]
  by_caption = {r["caption"]: r for r in records}
  assert set(by_caption) == {f"caption {i}" for i in (0, 1, 2, 100, 101, 102)}
  original = _record(1, frames=4)
  got = by_caption["caption 1"]
  dtype = schema.array_dtype(record_dtype)
  np.testing.assert_array_equal(got["latents"], original["latents"].astype(dtype))
  np.testing.assert_array_equal(got["text_embeds"], original["text_embeds"].astype(dtype))
  assert by_caption["caption 101"]["latents"].shape == (1, 4, 6, 12)
  assert by_caption["caption 101"]["is_image"]
  assert schema.read_metadata(str(tmp_path))["note"] == "test"
  # The version dir itself is accepted as well.
  assert len(schema.open_split(version_dir, "validation")) == 2
  # Plain TFDS reads it too, from the dataset's own dataset_info.json.
  plain = tfds.data_source(schema.DATASET_NAME, data_dir=str(tmp_path), split="train")
  assert len(plain) == 6
  assert {schema.decode(plain[i])["caption"] for i in range(6)} == set(by_caption)


def test_rewrite_replaces_dataset_atomically(tmp_path):
  _write(str(tmp_path), num_train=3)
  _write(str(tmp_path), num_train=1)
  assert len(schema.open_split(str(tmp_path), "train")) == 2
  assert sorted(os.listdir(tmp_path)) == ["sora_clips"]


def test_failed_write_keeps_existing_dataset(tmp_path):
  _write(str(tmp_path), num_train=3)

  def explode(index):
    raise RuntimeError("decoder crashed")
    yield  # pragma: no cover

  with pytest.raises(RuntimeError, match="decoder crashed"):
    tfds_builder.write_dataset(
        str(tmp_path), latent_channels=12, text_dim=8, record_dtype="float16",
        splits={"train": ([0], explode)}, metadata={"schema_version": schema.SCHEMA_VERSION},
        num_shards=1)
  assert len(schema.open_split(str(tmp_path), "train")) == 6
  assert sorted(os.listdir(tmp_path)) == ["sora_clips"]


def test_wrong_schema_version_names_dir_and_versions(tmp_path):
  version_dir = _write(str(tmp_path))
  path = os.path.join(version_dir, schema.METADATA_FILE)
  with open(path) as f:
    metadata = json.load(f)
  metadata["schema_version"] = schema.SCHEMA_VERSION + 41
  with open(path, "w") as f:
    json.dump(metadata, f)
  with pytest.raises(schema.DatasetError) as error:
    schema.open_split(str(tmp_path), "train")
  message = str(error.value)
  assert str(tmp_path) in message
  assert f"schema_version={schema.SCHEMA_VERSION + 41}" in message
  assert f"schema_version={schema.SCHEMA_VERSION}" in message


def test_record_with_wrong_schema_version_is_rejected():
  example = schema.encode({**_record(1, frames=1), "schema_version": 99}, "float16")
  with pytest.raises(schema.DatasetError, match="schema_version=99"):
    schema.decode(example)


@pytest.mark.parametrize("keep_bytes", [20_000, 100_000])
def test_truncated_shard_names_the_shard(tmp_path, keep_bytes):
  _write(str(tmp_path))
  shard, _ = schema.split_shards(str(tmp_path), "train")[1]
  assert os.path.getsize(shard) > keep_bytes
  os.truncate(shard, keep_bytes)
  with pytest.raises(schema.DatasetError, match=f"shard {shard} of split 'train' is truncated or corrupt"):
    schema.open_split(str(tmp_path), "train")
  # The other split is intact and still opens.
  assert len(schema.open_split(str(tmp_path), "validation")) == 2


def test_missing_shard_and_split_and_dir(tmp_path):
  _write(str(tmp_path))
  with pytest.raises(schema.DatasetError, match="has no split 'test'"):
    schema.open_split(str(tmp_path), "test")
  shard, _ = schema.split_shards(str(tmp_path), "validation")[0]
  os.remove(shard)
  with pytest.raises(schema.DatasetError, match=f"shard {shard} .* is missing"):
    schema.open_split(str(tmp_path), "validation")
  with pytest.raises(schema.DatasetError, match="does not exist"):
    schema.open_split(str(tmp_path / "nowhere"), "train")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(schema.DatasetError, match="holds no prepared dataset"):
    schema.open_split(str(tmp_path / "empty"), "train")


def _train_shapes(num_train: int = 3) -> dict:
  """{key: (T', H', W', C, is_image)} of the train examples `_expand` yields."""
  shapes = {}
  for index in range(num_train):
    shapes[f"train-{index}-a"] = (4, 4, 6, 12, 0)
    shapes[f"train-{index}-b"] = (1, 4, 6, 12, 1)
  return shapes


def _scanned(data_dir: str, split: str) -> np.ndarray:
  return buckets.scan_shapes(schema.open_split(data_dir, split), schema.decode)


def test_shape_index_is_published_in_record_order(tmp_path, caplog):
  # Train gets the index from the writer's keys; validation, without one, is scanned at write time.
  _write(str(tmp_path), num_train=5, latent_shapes={"train": _train_shapes(5)})
  assert "disagrees" not in caplog.text
  for split in ("train", "validation"):
    published = np.load(schema.latent_shapes_path(str(tmp_path), split))
    assert published.dtype == np.int32
    np.testing.assert_array_equal(published, _scanned(str(tmp_path), split))
  # Both shapes occur in train, so the order check above is not vacuous.
  assert len(np.unique(published[:, 0])) == 2


def test_wrong_shape_index_is_replaced_by_a_scan(tmp_path, caplog):
  wrong = {key: (1, 4, 6, 12, 1) for key in _train_shapes()}
  _write(str(tmp_path), latent_shapes={"train": wrong})
  assert "disagrees with its records" in caplog.text
  published = np.load(schema.latent_shapes_path(str(tmp_path), "train"))
  np.testing.assert_array_equal(published, _scanned(str(tmp_path), "train"))


def test_record_order_matches_the_shards(tmp_path):
  _write(str(tmp_path), num_train=6)
  caption_of_key = {f"train-{index}-a": f"caption {index}" for index in range(6)}
  caption_of_key.update({f"train-{index}-b": f"caption {100 + index}" for index in range(6)})
  keys = list(caption_of_key)
  order = tfds_builder.record_order(keys, "train")
  source = schema.open_split(str(tmp_path), "train")
  stored = [schema.decode(source[i])["caption"] for i in range(len(source))]
  assert stored == [caption_of_key[keys[k]] for k in order]
  assert stored != [caption_of_key[key] for key in keys]  # tfds does reorder them


def test_shards_are_uncompressed_and_compressed_shards_still_read(tmp_path):
  from array_record.python import array_record_module

  _write(str(tmp_path))
  shards = [path for path, _ in schema.split_shards(str(tmp_path), "train")]
  for path in shards:
    reader = array_record_module.ArrayRecordReader(path)
    assert "uncompressed" in reader.writer_options_string()
    reader.close()
  before = [schema.decode(r) for r in map(schema.open_split(str(tmp_path), "train").__getitem__, range(6))]
  # Datasets written before (the array_record default, zstd) must keep reading the same.
  reader = array_record_module.ArrayRecordReader(shards[0])
  records = reader.read_all()
  reader.close()
  writer = array_record_module.ArrayRecordWriter(shards[0], "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  reader = array_record_module.ArrayRecordReader(shards[0])
  assert "uncompressed" not in reader.writer_options_string()
  reader.close()
  source = schema.open_split(str(tmp_path), "train")
  after = [schema.decode(source[i]) for i in range(len(source))]
  for old, new in zip(before, after, strict=True):
    np.testing.assert_array_equal(old["latents"], new["latents"])
    assert old["caption"] == new["caption"]


def test_write_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
  temp = tmp_path / "tmp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  _write(str(tmp_path / "out"))
  assert len(schema.open_split(str(tmp_path / "out"), "train")) == 6
  assert os.listdir(temp) == []
