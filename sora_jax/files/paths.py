"""Run and checkpoint paths that are local or in a bucket (`gs://...`): telling them apart, and one
`etils.epath.Path` for either (local ones made absolute: orbax refuses relative paths at save time)."""

from __future__ import annotations

import os

from etils import epath

# orbax commits a step in a bucket by writing this marker last (there is no atomic directory rename).
COMMIT_MARKER = "commit_success.txt"


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL-like path (gs://bucket/run), which only epath / tensorstore can open."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a bucket path as given, a local one absolute."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def files_under(root: epath.Path) -> list[epath.Path]:
  """Every file below `root`, listed one directory at a time (a bucket refuses recursive globs)."""
  found = []
  for entry in root.iterdir():
    if entry.is_dir():
      found += files_under(entry)
    else:
      found.append(entry)
  return found
