"""Where a run's checkpoints live on disk: the directory, one directory per step, the item names.

Owns the layout `Checkpointer` (sora_jax/train/checkpoint.py) writes and every reader lists:
`WORKDIR/checkpoints/<step>/{state,data,data_stream,config}`. No jax here, so the supervisor and
the demo, parents of the processes that use jax, read it too.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

CHECKPOINTS_DIR = "checkpoints"  # under the workdir
STATE_ITEM = "state"  # the train state (params, EMA, optimizer state, step)
DATA_ITEM = "data"  # grain's per-process iterator states
DATA_STREAM_ITEM = "data_stream"  # the stream's identity and position, layout-free (JSON)
CONFIG_ITEM = "config"  # the config the run trained with (JSON)
_STEP_DIR = re.compile(r"^\d+$")  # orbax writes a step into a temporary name and renames it on commit


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def item_path(workdir: str, step: int, item: str) -> str:
  """Directory of one item (`STATE_ITEM`, `CONFIG_ITEM`, ...) of checkpoint `step`, absolute."""
  return os.path.join(os.path.abspath(checkpoints_dir(workdir)), str(step), item)


def committed_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a run, ascending; saves still in flight are not listed."""
  directory = checkpoints_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if _STEP_DIR.match(name) and os.path.isdir(os.path.join(directory, name, STATE_ITEM)))


def saved_config_json(workdir: str, step: int) -> dict[str, Any]:
  """The config item of checkpoint `step` as JSON data; OSError or JSONDecodeError when unreadable."""
  with open(os.path.join(item_path(workdir, step, CONFIG_ITEM), "metadata"), encoding="utf-8") as f:
    return json.load(f)
