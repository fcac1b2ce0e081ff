"""sora_jax.files.atomic: a published file or directory is the old one or the whole new one."""

import json
import os

import numpy as np
import pytest

from sora_jax.files import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "result.json"
  atomic.write_json(str(path), {"step": 1})
  with pytest.raises(RuntimeError):
    with atomic.open_atomic(str(path)) as f:
      f.write('{"step": 2, "half')
      raise RuntimeError("killed mid-write")
  assert json.loads(path.read_text()) == {"step": 1}
  assert os.listdir(tmp_path) == ["result.json"]


def test_two_writers_of_one_path_never_share_a_temporary(tmp_path):
  path = str(tmp_path / "chunk.json")
  with atomic.open_atomic(path) as first, atomic.open_atomic(path) as second:
    assert first.name != second.name
    first.write("first")
    second.write("second")
  # The outer block renames last: its whole content wins, and nothing else is left.
  assert open(path).read() == "first"
  assert os.listdir(tmp_path) == ["chunk.json"]


def test_staged_path_keeps_the_extension_a_writer_needs(tmp_path):
  path = str(tmp_path / "shapes.npy")
  with atomic.staged_path(path, suffix=".npy") as staged:
    assert staged.endswith(".npy") and staged != path
    np.save(staged, np.arange(3))  # np.save would add ".npy" to a name without it
  np.testing.assert_array_equal(np.load(path), np.arange(3))
  assert os.listdir(tmp_path) == ["shapes.npy"]


def test_files_keep_the_usual_permissions(tmp_path):
  path = tmp_path / "a.txt"
  atomic.write_text(str(path), "x")
  plain = tmp_path / "b.txt"
  plain.write_text("x")
  assert os.stat(path).st_mode == os.stat(plain).st_mode


def test_write_bytes_and_parent_directories(tmp_path):
  path = tmp_path / "deep" / "er" / "model.bin"
  atomic.write_bytes(str(path), b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"


def test_open_atomic_refuses_append(tmp_path):
  with pytest.raises(ValueError, match="mode='a'"):
    with atomic.open_atomic(str(tmp_path / "log"), "a"):
      pass


def test_staged_directory_replaces_whole_or_not_at_all(tmp_path):
  out = tmp_path / "export"
  with atomic.staged_directory(str(out)) as staged:
    (open(os.path.join(staged, "one"), "w")).write("1")
  assert sorted(os.listdir(out)) == ["one"]
  with pytest.raises(RuntimeError):
    with atomic.staged_directory(str(out)) as staged:
      (open(os.path.join(staged, "two"), "w")).write("2")
      raise RuntimeError("failed export")
  assert sorted(os.listdir(out)) == ["one"]
  with atomic.staged_directory(str(out)) as staged:
    (open(os.path.join(staged, "three"), "w")).write("3")
  assert sorted(os.listdir(out)) == ["three"]
  assert os.listdir(tmp_path) == ["export"]


def test_a_bucket_mirror_removes_its_local_copies_without_close():
  import gc

  from sora_jax.files import mirror

  outputs = mirror.OutputMirror("gs://bucket/run", "test")
  local = outputs.path("events", "one.txt")
  os.makedirs(os.path.dirname(local))
  with open(local, "w") as f:
    f.write("x")
  assert os.path.isdir(outputs.local)
  directory = outputs.local
  del outputs  # as when the run that held it raised
  gc.collect()
  assert not os.path.exists(directory)


def test_a_local_mirror_writes_in_place_and_close_keeps_the_files(tmp_path):
  from sora_jax.files import mirror

  outputs = mirror.OutputMirror(str(tmp_path), "test")
  with open(outputs.path("kept.txt"), "w") as f:
    f.write("x")
  outputs.close()
  assert (tmp_path / "kept.txt").read_text() == "x"
