"""Atomic file writes: every file sora_jax publishes goes through here.

A writer fills a uniquely named temporary file beside its target, flushes and fsyncs it, then renames
it over the target, so a reader (another process, a restart after a kill) sees the old file or the
whole new one, never part of one. A whole-file write to a bucket (`gs://`) is one object upload, which
is atomic by itself. Two writers of one path (Beam retries, concurrent processes) each
use their own temporary name; the last rename wins with a complete file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any

from sora_jax.files import paths


def _sync_directory(directory: str) -> None:
  # The rename itself is durable only once the directory entry is: best effort where directories
  # cannot be opened (some network filesystems).
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    with contextlib.suppress(OSError):
      os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def staged_path(path: str, suffix: str = "") -> Iterator[str]:
  """A unique temporary path beside `path`, renamed onto `path` when the block exits cleanly.

  For writers that take a file name (`np.save`, a library's own writer); `suffix` keeps an extension
  such writers insist on. The writer's file is fsynced before the rename; on an exception it is
  removed and `path` is untouched.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # A name no other writer can hold (process id and a random part), created with the usual umask.
  unique = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
  temp = os.path.join(directory, f".{os.path.basename(path)}.{unique}.tmp{suffix}")
  try:
    yield temp
    with open(temp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temp)
    raise
  _sync_directory(directory)


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO[Any]]:
  """`open(path, mode)` whose content appears at `path` only when the block exits cleanly."""
  if mode not in ("w", "wb"):
    raise ValueError(f"mode={mode!r}; expected 'w' or 'wb' (an atomic write replaces the whole file)")
  binary = mode == "wb"
  with staged_path(path) as temp:
    with open(temp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f:
      yield f
      f.flush()


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` with `data` atomically (in a bucket, one object upload: readers see either one)."""
  if paths.is_remote(path):
    paths.resolve(path).write_bytes(data)
    return
  with open_atomic(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text` (UTF-8) atomically."""
  if paths.is_remote(path):
    paths.resolve(path).write_text(text)
    return
  with open_atomic(path) as f:
    f.write(text)


def write_json(path: str, payload: Any, indent: int | None = 2, sort_keys: bool = False,
               default: Any = None) -> None:
  """Replaces `path` with `payload` as JSON (and a final newline) atomically."""
  write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def replace_directory(staged: str, final: str) -> None:
  """Moves the complete directory `staged` to `final`, retiring (then deleting) what was there.

  Two renames on one filesystem: a reader sees the old directory, none for an instant, or the new one.
  """
  final = os.path.abspath(final)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  retired = None
  if os.path.exists(final):
    retired = os.path.join(os.path.dirname(final),
                           f".{os.path.basename(final)}.retired-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(final, retired)
  os.rename(staged, final)
  if retired:
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(final: str) -> Iterator[str]:
  """A new empty directory beside `final` that replaces `final` only if the block exits cleanly.

  On an exception the staged directory is deleted and `final` is untouched.
  """
  final = os.path.abspath(final)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  staged = os.path.join(os.path.dirname(final),
                        f".{os.path.basename(final)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
  os.makedirs(staged)
  try:
    yield staged
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    raise
  replace_directory(staged, final)
