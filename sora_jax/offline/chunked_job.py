"""The resumable chunked job that every offline job runs: rows in chunks, each chunk committed whole.

Owns splitting input rows into chunks, skipping the chunks a killed run already committed, and running
the rest locally (rows mapped in worker processes where the job allows it, each chunk committed by
the parent as soon as its rows are done) or as an Apache Beam pipeline (one chunk per element,
reshuffled across workers). A job supplies two things: `map_row` (a picklable function of one row:
decoding, say) and a `ChunkCommit` (turns a chunk's mapped rows into its committed file through
`files.atomic`, opening its models lazily on each worker). Committing a chunk twice (a Beam retry)
writes the same file again, so a chunk is either missing or whole.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from sora_jax.files import paths

RUNNERS = ("local", "beam")


class JobError(ValueError):
  """A chunked job that cannot run as asked (unknown runner, bad chunk size), or one stopped early."""


class ChunkCommit(Protocol):
  """Commits one chunk: `(chunk index, its rows, map_row of each row) -> units done` (for progress).

  Sent to Beam workers by pickling: heavy state (models, encoders) is built on first use, not held.
  """

  def __call__(self, chunk: int, rows: Sequence[Any], mapped: Sequence[Any]) -> int: ...


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a chunked job.

  `name` labels progress and log lines ("prepare", "recaption"); `chunk_path(i)` is where chunk i is
  committed (its existence means done); `unit` is what `ChunkCommit` counts ("row", "clip").
  """

  name: str
  chunk_path: Callable[[int], str]
  unit: str = "row"


def split_rows(rows: Sequence[Any], chunk_rows: int) -> dict[int, list[Any]]:
  """{chunk index: its rows}, `chunk_rows` consecutive rows a chunk (the unit of resumption)."""
  if chunk_rows < 1:
    raise JobError(f"chunk_rows={chunk_rows}; expected >= 1")
  return {i // chunk_rows: list(rows[i:i + chunk_rows]) for i in range(0, len(rows), chunk_rows)}


def pending(job: Job, chunks: Mapping[int, Sequence[Any]],
            log: Callable[[str], None] = print) -> dict[int, Sequence[Any]]:
  """The chunks not yet committed; says how many a resumed run skips."""
  left = {c: rows for c, rows in chunks.items() if not paths.is_file(job.chunk_path(c))}
  if len(left) < len(chunks):
    log(f"{job.name}: resuming, {len(chunks) - len(left)} of {len(chunks)} chunks already done")
  return left


def _identity(row: Any) -> Any:
  return row


def run(job: Job, chunks: Mapping[int, Sequence[Any]], commit: ChunkCommit, *,
        map_row: Callable[[Any], Any] = _identity, runner: str = "local", workers: int = 1,
        beam_options: Sequence[str] = (), progress: bool = True, max_chunks: int | None = None,
        log: Callable[[str], None] = print) -> None:
  """Commits every chunk of `chunks` not yet committed.

  Local: `map_row` runs over the rows of pending chunks in order, in `workers` spawned processes when
  `workers > 1` (it and the rows must pickle), and `commit` runs in this process once a chunk's rows
  are all mapped. Beam: each worker maps and commits whole chunks. `max_chunks` stops a local run
  after committing that many chunks, as a kill would (raises `JobError`; tests resumption).
  """
  if runner not in RUNNERS:
    raise JobError(f"runner={runner!r}; expected one of {RUNNERS}")
  todo = pending(job, chunks, log)
  if not todo:
    return
  if runner == "beam":
    _run_beam(todo, commit, map_row, beam_options)
  else:
    _run_local(job, todo, commit, map_row, workers, progress, max_chunks)


def _run_local(job: Job, todo: Mapping[int, Sequence[Any]], commit: ChunkCommit,
               map_row: Callable[[Any], Any], workers: int, progress: bool, max_chunks: int | None) -> None:
  from tqdm.auto import tqdm

  order = sorted(todo)
  rows = [(chunk, row) for chunk in order for row in todo[chunk]]
  left = {chunk: len(todo[chunk]) for chunk in order}
  mapped: dict[int, list[Any]] = {chunk: [] for chunk in order}
  done_chunks, done_units, start = 0, 0, time.time()
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    plain_rows = [row for _, row in rows]
    results = pool.imap(map_row, plain_rows, chunksize=4) if pool else map(map_row, plain_rows)
    with tqdm(total=len(rows), unit="row", disable=not progress, desc=job.name, smoothing=0.1) as bar:
      for (chunk, _), result in zip(rows, results, strict=True):
        mapped[chunk].append(result)
        left[chunk] -= 1
        bar.update(1)
        if left[chunk]:
          continue
        done_units += commit(chunk, todo[chunk], mapped.pop(chunk))
        done_chunks += 1
        elapsed = max(time.time() - start, 1e-6)
        bar.set_postfix({job.unit + "s": done_units, f"{job.unit}s_per_s": f"{done_units / elapsed:.1f}"},
                        refresh=False)
        if max_chunks is not None and done_chunks >= max_chunks and done_chunks < len(order):
          raise JobError(f"stopped after {done_chunks} chunks (max_chunks)")
  finally:
    if pool:
      pool.terminate()


class _BeamChunk:
  """Beam FlatMap body: maps and commits one (chunk, rows) element."""

  def __init__(self, commit: ChunkCommit, map_row: Callable[[Any], Any]):
    self.commit, self.map_row = commit, map_row

  def __call__(self, element: tuple[int, Sequence[Any]]):
    chunk, rows = element
    yield self.commit(chunk, rows, [self.map_row(row) for row in rows])


def _run_beam(todo: Mapping[int, Sequence[Any]], commit: ChunkCommit, map_row: Callable[[Any], Any],
              beam_options: Sequence[str]) -> None:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  options = PipelineOptions(list(beam_options) or ["--runner=DirectRunner"])
  with beam.Pipeline(options=options) as pipeline:
    _ = (pipeline
         | "chunks" >> beam.Create(sorted((chunk, list(rows)) for chunk, rows in todo.items()))
         | "reshuffle" >> beam.Reshuffle()
         | "map_and_commit" >> beam.FlatMap(_BeamChunk(commit, map_row)))
