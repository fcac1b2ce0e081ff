"""Where a run's checkpoints live on disk: the directory, one directory per step, the item names.

Owns the layout `Checkpointer` (sora_jax/train/checkpoint.py) writes and every reader lists:
`WORKDIR/checkpoints/<step>/{state,data,data_stream,config}`, on a local disk or in a bucket (`gs://`,
through etils.epath). No jax here, so the supervisor and the demo, parents of the processes that use
jax, read it too.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from etils import epath

from sora_jax.files import paths

CHECKPOINTS_DIR = "checkpoints"  # under the workdir
STATE_ITEM = "state"  # the train state (params, EMA, optimizer state, step)
DATA_ITEM = "data"  # grain's per-process iterator states
DATA_STREAM_ITEM = "data_stream"  # the stream's identity and position, layout-free (JSON)
CONFIG_ITEM = "config"  # the config the run trained with (JSON)
_STEP_DIR = re.compile(r"^\d+$")  # orbax writes a step into a temporary name and renames it on commit


def checkpoints_dir(workdir: str) -> str:
  return os.fspath(paths.resolve(workdir) / CHECKPOINTS_DIR)


def item_path(workdir: str, step: int, item: str) -> str:
  """Directory of one item (`STATE_ITEM`, `CONFIG_ITEM`, ...) of checkpoint `step` (absolute, or a URL)."""
  return os.fspath(paths.resolve(workdir) / CHECKPOINTS_DIR / str(step) / item)


def committed_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a run, ascending; saves still in flight are not listed.

  On a disk a step is committed once orbax renames it from its temporary name; in a bucket, where a
  directory cannot be renamed atomically, once its commit marker is written.
  """
  directory = paths.resolve(workdir) / CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  remote = paths.is_remote(workdir)
  steps = []
  for entry in directory.iterdir():
    if not _STEP_DIR.match(entry.name) or not (entry / STATE_ITEM).is_dir():
      continue
    if remote and not (entry / paths.COMMIT_MARKER).exists():
      continue
    steps.append(int(entry.name))
  return sorted(steps)


def saved_config_json(workdir: str, step: int) -> dict[str, Any]:
  """The config item of checkpoint `step` as JSON data; OSError or JSONDecodeError when unreadable."""
  return json.loads((epath.Path(item_path(workdir, step, CONFIG_ITEM)) / "metadata").read_text())
