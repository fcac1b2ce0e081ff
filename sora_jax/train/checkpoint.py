"""Orbax checkpoints of a run: train state, grain iterator state and the config, under workdir.

Owns `Checkpointer`: async atomic saves into `workdir/checkpoints/<step>/{state,data,data_stream,config}`,
retention (newest K plus every M-th step), restore onto any mesh via target shardings, the
weights-only restore eval, sample and export read (`saved_state_tree`, `restore_weights_only`), the refusal
of a checkpoint whose parameter shapes differ from the config, and the fall back from an unreadable
newest step to the previous good one (the unreadable one is moved aside, never deleted).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from sora_jax.files import paths
from sora_jax.train import restore_choice
from sora_jax.train.checkpoint_layout import (  # noqa: F401 - the layout's names, re-exported
  CHECKPOINTS_DIR,
  CONFIG_ITEM,
  DATA_ITEM,
  DATA_STREAM_ITEM,
  STATE_ITEM,
  checkpoints_dir,
  committed_steps,
  item_path,
  saved_config_json,
)

CORRUPT_DIR = "checkpoints_unreadable"


def param_shape_mismatch(saved: Any, wanted: Any) -> str | None:
  """None when two parameter trees (arrays or metadata) have the same shapes, else what differs first."""
  saved, wanted = _flat_shapes(saved), _flat_shapes(wanted)
  differing = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  if differing:
    key = differing[0]
    return f"params{key} is {saved[key]} in the checkpoint but {wanted[key]} under the config"
  only_wanted = sorted(set(wanted) - set(saved))
  if only_wanted:
    return f"the config has params{only_wanted[0]}, which the checkpoint lacks"
  only_saved = sorted(set(saved) - set(wanted))
  if only_saved:
    return f"the checkpoint has params{only_saved[0]}, which the config lacks"
  return None


def saved_state_tree(workdir: str, step: int) -> Any:
  """The metadata tree (shapes, dtypes) of a step's train state, read without opening a manager."""
  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_path(workdir, step, STATE_ITEM))).tree


def restore_weights_only(workdir: str, step: int, target: Any) -> Any:
  """The subtrees of a step's train state that `target` names (`params`, `ema` entries), as its
  ShapeDtypeStructs say (shardings included); the optimizer state is never read."""
  return ocp.PyTreeCheckpointHandler().restore(
      epath.Path(item_path(workdir, step, STATE_ITEM)),
      args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used by this run (other model shape, nothing readable, ...)."""


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      flat[jax.tree_util.keystr(path)] = tuple(int(d) for d in shape)
  return flat


def _describe_sources(identity: dict[str, Any]) -> str:
  sources = identity.get("sources")
  if sources is None:
    return f"1 dataset ({identity.get('records')} clips)" if "records" in identity else "no dataset"
  return (f"{len(sources)} sources (weights {[round(s['weight'], 4) for s in sources]}, clips "
          f"{[s['records'] for s in sources]})")


def _stream_differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
  """What differs between two data streams' identities, in words ("seed 0 -> 1")."""
  dataset_keys = ("records", "shapes_sha1", "sources")
  differs = []
  if any(saved.get(key) != ours.get(key) for key in dataset_keys):
    before, after = _describe_sources(saved), _describe_sources(ours)
    differs.append(f"data {before} -> {after}" if before != after else "the datasets' records differ")
  differs += [f"{key} {saved.get(key)!r} -> {ours.get(key)!r}"
              for key in sorted(set(ours) | set(saved))
              if key not in ("split", *dataset_keys) and saved.get(key) != ours.get(key)]
  return differs


class Checkpointer:
  """Saves and restores a run's checkpoints; every process calls every method (orbax syncs them)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    # orbax refuses relative paths at save time (after a whole run); a user may pass --workdir=run.
    self.workdir = paths.resolve(workdir)
    self.directory = self.workdir / CHECKPOINTS_DIR
    self._config = config
    c = config.checkpoint
    policies: list[preservation.PreservationPolicy] = [preservation.LatestN(n=int(c.keep_last))]
    if c.keep_every > 0:
      policies.append(preservation.EveryNSteps(interval_steps=int(c.keep_every)))
    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=bool(c.async_save),
        preservation_policy=preservation.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True,
    )
    self._manager = self._make_manager(options)
    self._options = options
    self._failed_saves = 0
    self._pending: int | None = None  # the step of an async save not yet known to be committed

  def _make_manager(self, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            DATA_ITEM: grain_checkpoint.CheckpointHandler(),
            DATA_STREAM_ITEM: ocp.JsonCheckpointHandler(),
            CONFIG_ITEM: ocp.JsonCheckpointHandler(),
        },
        options=options,
    )

  # ------------------------------------------------------------------ queries
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  # ------------------------------------------------------------------ save
  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> bool:
    """Starts an (async) save of `state` at `step`; False if that step is already saved or failed.

    A failed write (disk full, permission denied) costs one line naming its step and reason, and that
    step: it is never listed as restorable, and later saves still happen. An async save's failure
    surfaces here, at the next save: it is counted against its own step, then this save goes ahead.
    After checkpoint.max_failed_saves failures in a row the run stops with a CheckpointError.
    """
    if step in self._manager.all_steps():
      return False
    try:
      self._finish_pending()
      saved = self._start_save(step, state, data_iterator)
    except CheckpointError:
      raise
    except Exception as error:  # noqa: BLE001 - storage raises many types
      self._save_failed(step, error)
      return False
    if self._options.enable_async_checkpointing:
      self._pending = step  # committed, or failed, by the next save or wait
    else:
      self._failed_saves = 0
    return saved

  def _finish_pending(self) -> None:
    """Waits for the async save in flight; its failure is counted and logged against its step."""
    pending, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - storage raises many types
      self._save_failed(pending, error)
      return
    if pending is not None:
      self._failed_saves = 0

  def _save_failed(self, step: int | None, error: BaseException) -> None:
    self._failed_saves += 1
    limit = int(self._config.checkpoint.max_failed_saves)
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    latest = self._manager.latest_step()
    what = f"checkpoint step {step}" if step is not None else "an earlier checkpoint"
    message = (f"{what} could not be saved in {self.directory} ({reason}); "
               f"{self._failed_saves} failed save(s) in a row of checkpoint.max_failed_saves={limit}")
    logging.warning("%s", message)
    if self._failed_saves >= limit:
      raise CheckpointError(
          f"{message}: stopping. Fix the storage (space, permissions) and restart; the run resumes from "
          f"{f'step {latest}' if latest is not None else 'step 0 (no checkpoint was saved)'}.")
    print(message, flush=True)

  def _start_save(self, step: int, state: Any, data_iterator: Any | None) -> bool:
    items = {
        STATE_ITEM: ocp.args.StandardSave(state),
        CONFIG_ITEM: ocp.args.JsonSave(config_to_json(self._config)),
    }
    if data_iterator is not None and hasattr(data_iterator, "get_state"):
      items[DATA_ITEM] = grain_checkpoint.CheckpointSave(data_iterator)
      if hasattr(data_iterator, "stream_identity"):
        items[DATA_STREAM_ITEM] = ocp.args.JsonSave(
            {"identity": data_iterator.stream_identity(), "state": data_iterator.get_state()})
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def wait(self) -> None:
    """Waits for the async save in flight (a failure of it is counted and logged, as at a save)."""
    self._finish_pending()

  def close(self) -> None:
    self._finish_pending()
    self._manager.close()

  # ------------------------------------------------------------------ restore
  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointError if the checkpoint's parameter shapes differ from `abstract_state`."""
    try:
      metadata = self._manager.item_metadata(step)[STATE_ITEM]
    except Exception as error:  # noqa: BLE001 - unreadable metadata is handled as corruption upstream
      raise _Unreadable(f"metadata of step {step} is unreadable: {error}") from error
    tree = getattr(metadata, "tree", metadata)
    if tree is None or "params" not in tree:
      raise _Unreadable(f"step {step} has no params in its state metadata")
    self._saved_fields = {name for name in tree if tree[name] is not None}
    detail = param_shape_mismatch(tree["params"], abstract_state.params)
    if detail is None:
      self._check_rest_compatible(step, tree, abstract_state)
      return
    m = self._config.model
    raise CheckpointError(
        f"checkpoint step {step} in {self.directory} holds a model of another shape: {detail} "
        f"(config: model.dim={m.dim}, model.num_layers={m.num_layers}, model.num_heads={m.num_heads}, "
        f"model.ffn_dim={m.ffn_dim}); use the matching config or a fresh --workdir. "
        f"Nothing was written.")

  def _check_rest_compatible(self, step: int, tree: Any, abstract_state: Any) -> None:
    """EMA trees and optimizer-state layout must match too: a restore would fail on them, and such
    a checkpoint is valid, so it must be refused clearly rather than set aside as unreadable."""
    saved_ema = sorted((tree.get("ema") or {}).keys())
    wanted_ema = sorted(abstract_state.ema.keys())
    if saved_ema != wanted_ema:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} holds EMA trees for decays {saved_ema}, but "
          f"train.ema_decays gives {wanted_ema}; set train.ema_decays to match. Nothing was written.")
    shapes = lambda t: sorted(tuple(int(d) for d in leaf.shape) for leaf in jax.tree.leaves(t)
                              if getattr(leaf, "shape", None) is not None)
    if shapes(tree.get("opt_state")) != shapes(abstract_state.opt_state):
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} holds an optimizer state of another layout than "
          f"this config builds (was train.grad_clip switched between 0 and > 0?); use the settings of "
          f"the run that wrote it. Nothing was written.")

  def restore_latest(
      self, abstract_state: Any, shardings: Any, data_iterator: Any | None = None
  ) -> tuple[Any, int] | None:
    """(state, step) from the newest checkpoint every process reads, placed on `shardings`; None if none.

    Every process restores the same step (`restore_choice`). Steps newer than it that a process found
    damaged (a read failing the same way on consecutive attempts) are moved to
    `workdir/checkpoints_unreadable/` with one line each. A read that keeps failing in other ways, a
    workdir whose every step is damaged, or a checkpoint of another model shape raises CheckpointError
    with nothing moved.
    """
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state, shardings)

    def load(step: int) -> Any:
      try:
        self.check_compatible(step, abstract_state)
        # Fields added to the state after a checkpoint was written start from their initial value.
        added = [name for name in _ADDED_FIELDS if getattr(target, name, None) is not None
                 and name not in self._saved_fields]
        partial = target.replace(**{name: None for name in added})
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(partial)}))
        state = restored[STATE_ITEM]
        if added:
          state = state.replace(**{name: jax.device_put(
              np.zeros(getattr(target, name).shape, getattr(target, name).dtype), getattr(shardings, name))
              for name in added})
        _check_finite_structure(state, step)
        return state
      except (CheckpointError, _Unreadable):
        raise
      except Exception as error:  # noqa: BLE001 - any read failure means this step is unusable
        raise _Unreadable(" ".join(str(error).split()) or type(error).__name__) from error

    c = self._config.checkpoint
    try:
      step, state, unreadable = restore_choice.newest_agreed(
          self.all_steps(), load, _Unreadable, int(c.read_attempts), float(c.read_backoff_s))
    except restore_choice.TransientReadError as error:
      raise CheckpointError(f"{error} (in {self.directory})") from None
    if step is not None:
      if jax.process_count() > 1:  # each process's log says what it restored: the same step everywhere
        print(f"process {jax.process_index()} of {jax.process_count()} restores checkpoint step {step}",
              flush=True)
      for bad, message in unreadable:
        print(f"checkpoint step {bad} is unreadable ({message}); moved to "
              f"{self.workdir / CORRUPT_DIR / str(bad)}, "
              f"resuming from step {step}", flush=True)
        self._set_aside(bad)
      if data_iterator is not None:
        self._restore_data(step, data_iterator)
      return state, step
    if unreadable:
      listed = "; ".join(f"step {bad}: {message}" for bad, message in unreadable)
      raise CheckpointError(
          f"every checkpoint in {self.directory} is unreadable ({listed}); nothing was moved or written. "
          f"Restore them from a copy, or start a fresh --workdir (or move {self.directory} away) to train "
          f"from step 0.")
    return None

  def _restore_data(self, step: int, data_iterator: Any) -> None:
    """Puts `data_iterator` at the position saved with `step`, or raises CheckpointError.

    Bucketed and packed streams resume from their layout-free position on any process / device
    layout. A position in another stream (other dataset, seed, buckets, global batch or token budget)
    is refused rather than silently re-reading data. Checkpoints older than the layout-free position
    restore grain's per-process state, which needs the process count they were saved with.
    """
    saved = self._read_stream(step) if hasattr(data_iterator, "stream_identity") else None
    if saved is not None:
      ours = data_iterator.stream_identity()
      differs = _stream_differences(saved["identity"], ours)
      if saved["identity"].get("kind") == "packed" and "process_count" in saved["identity"]:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} holds a packed data position written per process "
            f"(before packed streams were global), which this version cannot continue; start a fresh "
            f"--workdir, or --config.train.init_from the checkpoint's exported weights.")
      if differs:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} continues another data stream than this run "
            f"reads ({'; '.join(differs)}): resuming would re-read or skip clips. Resume with the "
            f"data.dir / data.sources, data.buckets, data.image_ratio, data.shuffle_seed, "
            f"train.global_batch_size (and, packed, data.token_budget) it was saved with, or start the "
            f"next stage in a new --workdir with --config.train.init_from={self.directory}.")
      try:
        data_iterator.set_state(saved["state"])
      except ValueError as error:
        raise CheckpointError(f"checkpoint step {step} in {self.directory}: {error}") from None
      return
    try:
      self._manager.restore(
          step, args=ocp.args.Composite(**{DATA_ITEM: grain_checkpoint.CheckpointRestore(data_iterator)}))
    except Exception as error:  # noqa: BLE001 - e.g. another process count than at save time
      reason = str(error).splitlines()[0] if str(error) else type(error).__name__
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory}: the data position of this process cannot be "
          f"restored ({reason[:200]}); it was saved by {self._saved_process_count(step)} process(es), "
          f"this run has {jax.process_count()}. Resume with that process count, or start a fresh "
          f"--workdir.") from None

  def _read_stream(self, step: int) -> dict[str, Any] | None:
    if not (self.directory / str(step) / DATA_STREAM_ITEM).exists():
      return None  # written before streams were saved layout-free
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{DATA_STREAM_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[DATA_STREAM_ITEM])

  def _saved_process_count(self, step: int) -> str:
    item = self.directory / str(step) / DATA_ITEM
    names = [entry.name for entry in item.iterdir()] if item.exists() else []
    counts = {name.rsplit("-of-", 1)[-1].split(".")[0] for name in names if "-of-" in name}
    return ", ".join(sorted(counts)) or "an unknown number of"

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's view so later saves can reuse its number."""
    if jax.process_index() == 0:
      source = self.directory / str(step)
      destination_root = self.workdir / CORRUPT_DIR
      destination_root.mkdir(parents=True, exist_ok=True)
      destination = destination_root / str(step)
      if destination.exists():
        destination.rmtree()
      if source.exists():
        _move(source, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"sora_jax_set_aside_{step}")
    self._manager.reload()


def _move(source: epath.Path, destination: epath.Path) -> None:
  """Moves a directory: a rename on a disk; in a bucket (no directory rename) each object is copied,
  then the source removed."""
  if not paths.is_remote(source):
    shutil.move(os.fspath(source), os.fspath(destination))
    return
  for entry in paths.files_under(source):
    target = destination / entry.relative_to(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    entry.copy(target)
  source.rmtree()


def newest_readable(steps: Sequence[int], load: Callable[[int], Any],
                    damaged: type[BaseException] | tuple[type[BaseException], ...]
                    ) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """(step, load(step), [(newer step, why unreadable)]) for the newest of `steps` that `load` reads;
  (None, None, [...every step...]) when none is. The one verification path of the trainer and of
  eval, sample and export: `load` restores what its caller needs and raises `damaged` for files it
  cannot read; anything else it raises (a checkpoint of another model) stops at once. What to do
  with the damaged steps (set them aside, or only warn) is the caller's."""
  unreadable: list[tuple[int, str]] = []
  for step in sorted(steps, reverse=True):
    try:
      return step, load(step), unreadable
    except damaged as error:
      message = " ".join(str(error).split()) or type(error).__name__
      logging.info("checkpoint step %d is unreadable: %s", step, message)
      unreadable.append((step, message[:300]))
  return None, None, unreadable


# TrainState fields a checkpoint may predate (restored as zeros, their initial value).
_ADDED_FIELDS = ("grad_norm_stats",)


class _Unreadable(RuntimeError):
  """Internal: a checkpoint step whose files cannot be read."""


def _check_finite_structure(state: Any, step: int) -> None:
  """A restored scalar step counter must be readable; catches truncated-but-parsable data early."""
  counter = getattr(state, "step", None)
  if counter is None:
    return
  value = np.asarray(jax.device_get(counter))
  if value.shape != () or value < 0:
    raise _Unreadable(f"step {step} stores an invalid step counter {value!r}")
