"""A run that starts from another sora_jax run's checkpoint: the next stage of a pretraining recipe.

Owns `train.init_from` as a run directory (`RUN` or `RUN@STEP`): telling it apart from a pretrained
pipeline directory, pinning it to the step it starts from (so the run's config.json and every
checkpoint's config say where its weights came from), checking that the source's parameters fit this
run's model (naming the model fields that differ when they do not), and the starting train state:
the chosen weight set (`train.init_weights`), with a fresh optimizer or the source's AdamW state and
EMA trees (`train.init_optimizer`).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from sora_jax import config as config_lib
from sora_jax.files import paths
from sora_jax.model import dit
from sora_jax.train import checkpoint as checkpoint_lib
from sora_jax.train import run_weights as weights_lib
from sora_jax.train import state as state_lib

# A run that cannot start this one; also what `parse_run` raises for a RUN@STEP without checkpoints.
StageError = weights_lib.OriginError
RunOrigin = weights_lib.RunOrigin
parse_run = weights_lib.parse_run


def _recorded(workdir: str) -> str:
  """The train.init_from this run recorded in its config.json when it first started ("" if none)."""
  try:
    return str(json.loads(paths.read_text(f"{workdir.rstrip('/')}/config.json"))["train"]["init_from"])
  except (OSError, ValueError, KeyError, TypeError):
    return ""


def _run_path(init_from: str) -> str:
  """The run directory `init_from` names (without @STEP), as a report names it."""
  head, sep, tail = init_from.rpartition("@")
  path = head if sep and tail.isdigit() else init_from
  return paths.shown(path).rstrip("/")


def pin(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict | None:
  """`config` with a run-directory train.init_from pinned to RUN@STEP, or None when train.init_from
  is empty or names something else (a pretrained pipeline directory).

  A run that has checkpoints of its own resumes from them and keeps the origin its config.json
  recorded, without reading the source again (it may have moved on, or be gone). A fresh run pins
  the step given, or the source's newest checkpoint, and checks the source's parameters against this
  model (`check_fits`) before anything is written.
  """
  init_from = config.train.init_from
  if not init_from:
    return None
  recorded = _recorded(workdir)
  if (recorded and _run_path(recorded) == _run_path(init_from) and paths.is_dir(workdir)
      and checkpoint_lib.committed_steps(workdir)):
    pinned = ml_collections.ConfigDict(config.to_dict())
    pinned.train.init_from = recorded
    return pinned
  origin = parse_run(init_from)
  if origin is None:
    return None
  try:
    step = weights_lib.resolve_step(origin.workdir, origin.step)
  except weights_lib.WeightsError as error:
    raise StageError(f"train.init_from={init_from}: {error}") from None
  pinned = ml_collections.ConfigDict(config.to_dict())
  pinned.train.init_from = str(RunOrigin(origin.workdir, step))
  config_lib.validate(pinned)  # a bad model field is one line before the source's shapes are compared
  check_fits(pinned, RunOrigin(origin.workdir, step))  # before the run writes anything
  return pinned


def agree(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with process 0's pinned step on every process: processes that pinned `RUN` while the
  source was saving a new step start from one step, never from a mix."""
  origin = parse_run(config.train.init_from) if config.train.init_from else None
  if origin is None or origin.step is None or jax.process_count() == 1:
    return config
  from jax.experimental import multihost_utils

  step = int(multihost_utils.broadcast_one_to_all(np.asarray(origin.step, np.int64)))
  if step == origin.step:
    return config
  agreed = ml_collections.ConfigDict(config.to_dict())
  agreed.train.init_from = str(RunOrigin(origin.workdir, step))
  return agreed


def check_fits(config: ml_collections.ConfigDict, origin: RunOrigin) -> ml_collections.ConfigDict:
  """The source step's saved config, after checking its parameters have this run's shapes; otherwise
  one StageError naming the first differing parameter and the model fields that differ."""
  source = weights_lib.saved_config(origin.workdir, origin.step)
  ours, theirs = (dit.abstract_params(c.model) for c in (config, source))
  if int(config.model.experts) != int(source.model.experts):
    detail = f"model.experts is {source.model.experts} there and {config.model.experts} here"
  else:
    detail = checkpoint_lib.param_shape_mismatch(theirs, ours)
  if detail is None:
    return source
  fields = [f"model.{key}={_shown(source.model[key])} there, {_shown(config.model[key])} here"
            for key in _shape_fields(config.model, source.model)]
  raise StageError(
      f"train.init_from={origin}: its weights do not fit this model ({detail.replace('checkpoint', 'source')}"
      f"{'; ' + ', '.join(fields[:4]) if fields else ''}); a stage may change resolution, frames, buckets "
      f"and RoPE lengths, not the parameter shapes")


def _shape_fields(ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict) -> list[str]:
  """The model fields whose value differs between the two configs and changes parameter shapes."""
  shapes = checkpoint_lib.param_shape_mismatch
  base = dit.abstract_params(ours)
  found = []
  for key in sorted(ours):
    if key not in theirs or _shown(ours[key]) == _shown(theirs[key]):
      continue
    changed = ml_collections.ConfigDict(ours.to_dict())
    changed[key] = theirs[key]
    try:
      if shapes(base, dit.abstract_params(changed)) is not None:
        found.append(key)
    except (ValueError, TypeError):  # a field that makes no model alone (heads vs dim): still a shape field
      found.append(key)
  return found


def _shown(value: Any) -> str:
  return str(tuple(value)) if isinstance(value, list | tuple) else str(value)


def initial_state(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
                  setup: state_lib.StateSetup, mesh: jax.sharding.Mesh) -> state_lib.TrainState:
  """Step 0 of this run from the pinned `train.init_from` run: its `train.init_weights` set, and with
  init_optimizer=carry its optimizer state and EMA trees (the same optimizer and decays needed)."""
  t = config.train
  origin = parse_run(t.init_from)
  if origin is None or origin.step is None:
    raise StageError(f"train.init_from={t.init_from!r} is not a pinned run directory (RUN@STEP)")
  check_fits(config, origin)
  params = weights_lib.origin_weights(config, mesh)
  if t.init_optimizer == "restart":
    return state_lib.state_from_params(params, config, optimizer, setup)
  carried = _carried(origin, setup)
  # The AdamW moments and Adam's step count carry over; the learning-rate schedule is this run's own
  # and starts at its step 0 (its warmup and decay follow this run's train.* fields).
  return state_lib.state_from_params(params, config, optimizer, setup,
                                     opt_state=_schedule_restarted(carried["opt_state"]),
                                     ema=carried["ema"])


def _schedule_restarted(opt_state: Any) -> Any:
  """`opt_state` with the learning-rate schedule's step count at 0, placed where the old count was
  (any process layout, host memory included)."""
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)

  def restart(node: Any) -> Any:
    if not is_schedule(node):
      return node
    count = node.count
    zeros = np.zeros(count.shape, count.dtype)
    placed = jax.make_array_from_callback(count.shape, count.sharding, lambda index: zeros[index])
    return node._replace(count=placed)

  return jax.tree.map(restart, opt_state, is_leaf=is_schedule)


def _carried(origin: RunOrigin, setup: state_lib.StateSetup) -> dict[str, Any]:
  """The source step's optimizer state and EMA trees, restored into this run's shardings."""
  abstract = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      {"opt_state": setup.abstract_state.opt_state, "ema": setup.abstract_state.ema},
      {"opt_state": setup.shardings.opt_state, "ema": setup.shardings.ema})
  try:
    carried = checkpoint_lib.restore_weights_only(origin.workdir, origin.step, abstract)
  except Exception as error:  # noqa: BLE001 - orbax raises many types for a tree that does not match
    raise _carry_error(origin, " ".join(str(error).split())[:200]) from None
  # A partial restore hands back the target's placeholder for anything the source does not hold.
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(carried)[0]
             if not isinstance(leaf, jax.Array)]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise _carry_error(origin, f"it holds no {missing[0]}{more}")
  return carried


def _carry_error(origin: RunOrigin, reason: str) -> StageError:
  return StageError(
      f"train.init_optimizer=carry: the optimizer state and EMA trees of {origin} do not fit this run "
      f"({reason}); they need the same optimizer settings, trained experts and train.ema_decays, or use "
      f"train.init_optimizer=restart")
