"""Tests of the streaming sharded safetensors writer and reader against the safetensors library."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from sora_jax.files import safetensors_io as st


def _tensors():
  rng = np.random.default_rng(0)
  return {
      "a.weight": rng.normal(size=(4, 6)).astype(np.float32),
      "a.bias": rng.normal(size=(6,)).astype(ml_dtypes.bfloat16),
      "b.table": rng.normal(size=(1, 3, 5)).astype(np.float16),
      "c.count": np.arange(7, dtype=np.int32),
  }


def _specs(tensors):
  return [st.TensorSpec(name, array.shape, array.dtype) for name, array in tensors.items()]


def test_single_file_is_read_by_safetensors_library(tmp_path):
  tensors = _tensors()
  loaded = []

  def load(name):
    loaded.append(name)
    return tensors[name]

  files = st.write_sharded(str(tmp_path), _specs(tensors), load, metadata={"format": "pt"})
  assert files == ["diffusion_pytorch_model.safetensors"] and loaded == list(tensors)
  path = tmp_path / files[0]
  reference = safetensors.numpy.load_file(str(path))
  for name, array in tensors.items():
    np.testing.assert_array_equal(reference[name].view(array.dtype), array)
  with safetensors.safe_open(str(path), "np") as f:
    assert f.metadata() == {"format": "pt"}


def test_sharded_with_index_round_trips(tmp_path):
  tensors = _tensors()
  # 96 bytes per shard at most: a.weight (96 B) alone, then the three small ones together.
  files = st.write_sharded(str(tmp_path), _specs(tensors), tensors.__getitem__, max_shard_bytes=96)
  assert files == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                   "diffusion_pytorch_model-00002-of-00002.safetensors",
                   "diffusion_pytorch_model.safetensors.index.json"]
  index = json.loads((tmp_path / files[-1]).read_text())
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
  assert index["weight_map"]["a.weight"] == files[0] and index["weight_map"]["c.count"] == files[1]
  reader = st.Reader(str(tmp_path))
  assert {name: (spec.shape, spec.dtype) for name, spec in reader.specs().items()} == {
      name: (a.shape, a.dtype) for name, a in tensors.items()}
  for name, array in reader.items():
    np.testing.assert_array_equal(array, tensors[name])
    assert array.dtype == tensors[name].dtype


def test_reader_reads_files_of_the_safetensors_library(tmp_path):
  tensors = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones((2,), np.int64)}
  safetensors.numpy.save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  reader = st.Reader(str(tmp_path))
  np.testing.assert_array_equal(reader.read("x"), tensors["x"])
  np.testing.assert_array_equal(reader.read("y"), tensors["y"])


def test_writes_are_byte_deterministic(tmp_path):
  tensors = _tensors()
  for name in ("one", "two"):
    os.makedirs(tmp_path / name)
    st.write_sharded(str(tmp_path / name), _specs(tensors), tensors.__getitem__, max_shard_bytes=96)
  for file_name in os.listdir(tmp_path / "one"):
    assert (tmp_path / "one" / file_name).read_bytes() == (tmp_path / "two" / file_name).read_bytes()


def test_bad_inputs_raise_clear_errors(tmp_path):
  tensors = _tensors()
  with pytest.raises(st.SafetensorsError, match="'a.weight' came as float64"):
    st.write_sharded(str(tmp_path), _specs(tensors), lambda n: tensors[n].astype(np.float64))
  with pytest.raises(st.SafetensorsError, match="holds neither"):
    st.Reader(str(tmp_path / "missing"))
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 16)
  with pytest.raises(st.SafetensorsError, match="header size"):
    st.Reader(str(corrupt))
  truncated = tmp_path / "truncated"
  truncated.mkdir()
  st.write_sharded(str(truncated), _specs(tensors), tensors.__getitem__)
  path = truncated / "diffusion_pytorch_model.safetensors"
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(st.SafetensorsError, match="do not fit"):
    st.Reader(str(truncated))
