"""sora_jax.offline.chunked_job: the resumable chunked job prepare and recaption share."""

import functools
import json
import os

import pytest

from sora_jax.files import atomic
from sora_jax.offline import chunked_job


def _square(row):
  return row * row


class _Commit:
  """Writes a chunk's mapped rows as JSON and counts how often it ran."""

  def __init__(self, work):
    self.work = work
    self.calls = []

  def __call__(self, chunk, rows, mapped):
    self.calls.append(chunk)
    atomic.write_json(_path(self.work, chunk), {"rows": list(rows), "mapped": list(mapped)})
    return len(rows)


def _path(work, chunk):
  return os.path.join(str(work), f"chunk_{chunk:03d}.json")


def _job(work):
  return chunked_job.Job("test", functools.partial(_path, work))


def _read(work, chunks):
  return {c: json.load(open(_path(work, c))) for c in chunks}


def test_split_rows_is_deterministic_and_checks_its_size():
  assert chunked_job.split_rows(list(range(7)), 3) == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6]}
  with pytest.raises(chunked_job.JobError, match="chunk_rows=0"):
    chunked_job.split_rows([1], 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stopped_run_resumes_with_only_the_chunks_left(tmp_path, workers):
  chunks = chunked_job.split_rows(list(range(10)), 3)
  first = _Commit(tmp_path)
  with pytest.raises(chunked_job.JobError, match="stopped after 2 chunks"):
    chunked_job.run(_job(tmp_path), chunks, first, map_row=_square, workers=workers, progress=False,
                    max_chunks=2, log=lambda _: None)
  assert first.calls == [0, 1]
  lines = []
  second = _Commit(tmp_path)
  chunked_job.run(_job(tmp_path), chunks, second, map_row=_square, workers=workers, progress=False,
                  log=lines.append)
  assert second.calls == [2, 3]
  assert lines == ["test: resuming, 2 of 4 chunks already done"]
  assert _read(tmp_path, range(4))[3] == {"rows": [9], "mapped": [81]}
  third = _Commit(tmp_path)
  chunked_job.run(_job(tmp_path), chunks, third, map_row=_square, progress=False, log=lambda _: None)
  assert third.calls == []


def test_beam_runner_commits_the_same_chunks(tmp_path):
  chunks = chunked_job.split_rows(list(range(5)), 2)
  local, beam = tmp_path / "local", tmp_path / "beam"
  os.makedirs(local)
  os.makedirs(beam)
  chunked_job.run(_job(local), chunks, _Commit(local), map_row=_square, progress=False)
  chunked_job.run(_job(beam), chunks, _Commit(beam), map_row=_square, runner="beam")
  assert _read(local, range(3)) == _read(beam, range(3))


def test_unknown_runner_is_one_error(tmp_path):
  with pytest.raises(chunked_job.JobError, match="runner='spark'; expected one of"):
    chunked_job.run(_job(tmp_path), {0: [1]}, _Commit(tmp_path), runner="spark")
