"""A run directory's output files written by tools that need local files (video encoders, image and plot
writers, TensorBoard), whether the run lives on local disk or in a bucket (`gs://`).

For a local run the files are written in place. For a bucket run they are written to a private local
directory and `publish()` uploads each file that is new or changed since the last call, whole, to the
same relative path under the run (one object upload each, so a reader sees an old or a whole file).
`final(...)` turns local paths in a result into the paths where the files end up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any

from sora_jax.files import paths


class OutputMirror:
  """Files under `root` (a local directory or a bucket path), written locally first when `root` is remote."""

  def __init__(self, root: str, name: str = "outputs"):
    self.root = root
    self.remote = paths.is_remote(root)
    self.local = tempfile.mkdtemp(prefix=f"sora_jax_{name}_") if self.remote else root
    self._published: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) uploaded
    # A run that dies by an exception never reaches close(): its local copies go when the mirror is
    # collected or the interpreter exits.
    self._cleanup = weakref.finalize(self, shutil.rmtree, self.local, True) if self.remote else None

  def path(self, *parts: str) -> str:
    """Where to write the file `root/parts...`: that path for a local run, its local copy otherwise."""
    return os.path.join(self.local, *parts)

  def final(self, value: Any) -> Any:
    """`value` with every local path string under `local` replaced by its path under `root`, inside
    dicts and lists too (for results that name the files they wrote)."""
    if not self.remote:
      return value
    if isinstance(value, str):
      if value == self.local or value.startswith(self.local + os.sep):
        relative = os.path.relpath(value, self.local)
        return os.fspath(paths.resolve(self.root) / relative)
      return value
    if isinstance(value, dict):
      return {key: self.final(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
      return type(value)(self.final(item) for item in value)
    return value

  def publish(self, prune: bool = False) -> list[str]:
    """Uploads the files new or changed since the last call (a no-op for a local run); returns their
    relative paths. With `prune` the local copies are deleted once uploaded (for writers that do not
    reopen their files: a long eval --watch then holds one step's files at a time)."""
    if not self.remote:
      return []
    target = paths.resolve(self.root)
    sent = []
    for directory, _, names in os.walk(self.local):
      for name in sorted(names):
        local = os.path.join(directory, name)
        relative = os.path.relpath(local, self.local)
        stat = os.stat(local)
        signature = (stat.st_size, stat.st_mtime_ns)
        if self._published.get(relative) == signature:
          continue
        with open(local, "rb") as f:
          (target / relative).write_bytes(f.read())
        self._published[relative] = signature
        sent.append(relative)
        if prune:
          os.remove(local)
    return sent

  def close(self) -> None:
    """Publishes what is left and, for a bucket run, deletes the local copies."""
    if self.remote:
      self.publish()
      self._cleanup()
