"""Run and checkpoint paths that are local or in a bucket (`gs://...`): telling them apart, and one
`etils.epath.Path` for either (local ones made absolute: orbax refuses relative paths at save time)."""

from __future__ import annotations

import os
import uuid

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


# Local paths go through os (no gcsfs import, no epath overhead on hot paths); bucket paths through epath.
def shown(path: str | os.PathLike) -> str:
  """`path` as a report names it: a bucket path as given, a local one absolute."""
  return os.fspath(resolve(path))


def is_file(path: str | os.PathLike) -> bool:
  return resolve(path).is_file() if is_remote(path) else os.path.isfile(path)


def is_dir(path: str | os.PathLike) -> bool:
  return resolve(path).is_dir() if is_remote(path) else os.path.isdir(path)


def list_names(path: str | os.PathLike) -> list[str]:
  """The names in directory `path` (FileNotFoundError if it does not exist)."""
  if not is_remote(path):
    return os.listdir(path)
  directory = resolve(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"{os.fspath(path)} does not exist")
  return [entry.name for entry in directory.iterdir()]


def read_bytes(path: str | os.PathLike) -> bytes:
  """The whole file; FileNotFoundError (an OSError) if it is missing, local or in a bucket."""
  if is_remote(path):
    return resolve(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def remove_tree(path: str | os.PathLike) -> None:
  """Deletes directory `path` and everything below it, if it exists."""
  if is_remote(path):
    directory = resolve(path)
    if directory.exists():
      directory.rmtree()
  else:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def upload_tree(local_dir: str, remote_dir: str, *, last: tuple[str, ...] = ()) -> list[str]:
  """Copies every file below `local_dir` to the same relative path below `remote_dir`, each one whole
  object; the files named in `last` (relative paths) go after all others, as a bucket's commit marker."""
  relative = sorted(os.path.relpath(os.path.join(root, name), local_dir)
                    for root, _, names in os.walk(local_dir) for name in names)
  ordered = [name for name in relative if name not in last] + [name for name in last if name in relative]
  target = resolve(remote_dir)
  for name in ordered:
    with open(os.path.join(local_dir, name), "rb") as f:
      (target / name).write_bytes(f.read())
  return ordered


def bucket_write_problem(directory: str) -> str | None:
  """Why this process cannot create objects under bucket path `directory` (a probe object is written
  and deleted), or None when it can."""
  probe = resolve(directory) / f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as error:  # noqa: BLE001 - gcsfs raises many types (missing bucket, denied, offline)
    return " ".join(str(error).split())[:200] or type(error).__name__
  return None
