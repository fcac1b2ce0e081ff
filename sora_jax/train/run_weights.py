"""Read-only access to a run's checkpoints: steps, the saved config, and raw / EMA weight sets.

Owns the weight sets eval, sample and export read (`raw`, `ema_<decay>`) and their one-line errors:
which sets a step holds, the shape check against the config, and their restore onto the mesh with
the config's logical shardings (through train/checkpoint.py's weights-only restore, which never
reads the optimizer state).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import choices
from sora_jax import config as config_lib
from sora_jax.diffusion import experts as experts_lib
from sora_jax.files import paths
from sora_jax.model import dit
from sora_jax.model import lora as lora_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import checkpoint as checkpoint_lib

RAW = "raw"


class WeightsError(ValueError):
  """A workdir, step or weight set that does not exist or does not fit the config."""


class DamagedCheckpoint(WeightsError):
  """A checkpoint step whose files cannot be read (truncated, corrupt, missing parts)."""


class OriginError(WeightsError):
  """A `train.init_from` run that cannot start this run: no such step or weight set, other shapes."""


@dataclasses.dataclass(frozen=True)
class RunOrigin:
  workdir: str
  step: int | None  # None: the newest committed step, until pinned

  def __str__(self) -> str:
    return self.workdir if self.step is None else f"{self.workdir}@{self.step}"


def parse_run(init_from: str) -> RunOrigin | None:
  """The run `init_from` names (RUN or RUN@STEP, a directory holding checkpoints/), or None when it
  names something else (a pretrained pipeline directory)."""
  if not init_from:
    return None
  path, step = init_from, None
  head, sep, tail = init_from.rpartition("@")
  if sep and tail.isdigit():
    path, step = head, int(tail)
  if paths.is_dir(checkpoint_lib.checkpoints_dir(path)):
    return RunOrigin(path, step)
  if step is not None:
    raise OriginError(f"train.init_from={init_from}: {path} holds no checkpoints/; expected a sora_jax run "
                      f"directory as RUN or RUN@STEP")
  return None


def origin_weights(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   dtype: str | None = None) -> Any:
  """The DiT weights train.init_from names, sharded over `mesh` (cast to `dtype` if given): a pinned
  run's (RUN@STEP) train.init_weights set (merged, if that run trained adapters), or a pretrained
  directory's. A cast happens as the files are read, so a bf16 copy never passes through fp32 device
  memory."""
  t = config.train
  origin = parse_run(t.init_from)
  if origin is not None:
    if origin.step is None:
      raise OriginError(f"train.init_from={t.init_from!r} is not a pinned run directory (RUN@STEP)")
    kept = list_steps(origin.workdir)
    if origin.step not in kept:
      raise OriginError(
          f"train.init_from={origin}: step {origin.step} is no longer a checkpoint of {origin.workdir} (it "
          f"keeps {kept}); a LoRA run reads the weights it adapts from there at every start and for "
          f"eval, sample and export: keep that step, or start LoRA runs from an exported directory")
    # This run's model and mesh (the shapes are checked on restore); the source's train fields say
    # whether it trained adapters, and on what.
    source = ml_collections.ConfigDict(config.to_dict())
    source.train = saved_config(origin.workdir, origin.step).train
    try:
      return restore_weights(origin.workdir, origin.step, source, mesh, [t.init_weights],
                             dtype)[t.init_weights]
    except WeightsError as error:
      raise OriginError(f"train.init_from={origin}, train.init_weights={t.init_weights}: {error}") from None
  from sora_jax.export import pretrained  # deferred: only runs that start from pretrained weights

  params = pretrained.load_params(t.init_from, config.model)
  if dtype is not None:
    params = jax.tree.map(lambda leaf: np.asarray(leaf).astype(jnp.dtype(dtype)), params)
  rules = sharding_lib.logical_rules(config.mesh)
  shardings = sharding_lib.tree_shardings(dit.abstract_params(config.model), mesh, rules)
  return jax.tree.map(jax.device_put, params, shardings)


# The frozen weights of the LoRA run read last ((init_from, init_weights, dtype, mesh) -> weights):
# eval scores every checkpoint of a run on the same ones, read once.
_frozen_cache: dict[tuple, Any] = {}


def _frozen_weights(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
  """A LoRA run's frozen weights as its steps saw them (train.lora_base_dtype), in `model.param_dtype`."""
  t = config.train
  key = (t.init_from, t.init_weights, t.lora_base_dtype, mesh.shape_tuple, tuple(mesh.device_ids.flat))
  if key not in _frozen_cache:
    _frozen_cache.clear()
    param_dtype = jnp.dtype(config.model.param_dtype)
    weights = origin_weights(config, mesh, t.lora_base_dtype)
    _frozen_cache[key] = jax.tree.map(lambda leaf: leaf.astype(param_dtype), weights)
  return _frozen_cache[key]


def ema_name(decay_key: str) -> str:
  """Weight-set name of an EMA tree (`ema_0.999`) from its key in the train state."""
  return f"ema_{decay_key}"


def list_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a run, ascending (orbax temp dirs of saves in flight excluded)."""
  if not paths.resolve(workdir).is_dir():
    raise WeightsError(f"workdir {workdir!r} does not exist")
  return checkpoint_lib.committed_steps(workdir)


def no_checkpoints(workdir: str) -> WeightsError:
  """The error of a workdir with no committed checkpoint."""
  directory = checkpoint_lib.checkpoints_dir(workdir)
  return WeightsError(f"workdir {workdir!r} has no checkpoints under {directory}")


def resolve_step(workdir: str, step: int | None) -> int:
  """`step` if it is a committed checkpoint, the newest one when None; otherwise one clear error."""
  steps = list_steps(workdir)
  if not steps:
    raise no_checkpoints(workdir)
  if step is None:
    return steps[-1]
  if step not in steps:
    raise WeightsError(f"step {step} is not a checkpoint of {workdir!r}; available steps: {steps}")
  return step


def saved_config(workdir: str, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with (its `config` item), validated."""
  try:
    config = config_lib.from_json(checkpoint_lib.saved_config_json(workdir, step))
  except (OSError, json.JSONDecodeError) as e:
    raise DamagedCheckpoint(
        f"checkpoint step {step} of {workdir!r} has no readable config "
        f"({checkpoint_lib.item_path(workdir, step, checkpoint_lib.CONFIG_ITEM)}): {e}") from e
  config_lib.validate(config)
  return config


def _first_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return (text or type(error).__name__)[:300]


def _state_tree(workdir: str, step: int) -> Any:
  try:
    tree = checkpoint_lib.saved_state_tree(workdir, step)
  except Exception as error:  # noqa: BLE001 - orbax / tensorstore raise many types for bad files
    raise DamagedCheckpoint(f"checkpoint step {step} of {workdir!r}: state metadata unreadable "
                            f"({_first_line(error)})") from error
  if "params" not in tree:
    raise WeightsError(f"checkpoint step {step} of {workdir!r} holds no params")
  return tree


def _weight_sets(tree: Any) -> list[str]:
  return [RAW] + [ema_name(key) for key in sorted(tree.get("ema") or {})]


def _chosen_sets(workdir: str, step: int, tree: Any, names: list[str] | None) -> list[str]:
  """`names` (default: every weight set of the step), or one WeightsError naming what the step lacks."""
  available = _weight_sets(tree)
  names = available if names is None else list(names)
  missing = [name for name in names if name not in available]
  if missing:
    raise WeightsError(
        f"checkpoint step {step} of {workdir!r} has no weight set {missing}; it has {available}")
  return names


def saved_weight_sets(workdir: str, step: int) -> list[str]:
  """Names of the weight sets in a checkpoint: `raw`, then `ema_<decay>` for each EMA tree."""
  return _weight_sets(_state_tree(workdir, step))


def restore_weights(
    workdir: str,
    step: int,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    names: list[str] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
  """{weight-set name: params} of a checkpoint, each tree sharded over `mesh` by the logical rules.

  `names` picks weight sets (default: all of `saved_weight_sets`). Shapes must match the config's
  model; anything else raises WeightsError naming the first differing parameter. `dtype` casts as the
  files are read (a bf16 copy of fp32 weights never passes through fp32 device memory), except where
  the checkpoint holds adapters: those are merged into their frozen weights first, then cast.
  """
  tree = _state_tree(workdir, step)
  names = _chosen_sets(workdir, step, tree, names)
  saved_train = saved_config(workdir, step).train
  spec = lora_lib.spec_of(saved_train)
  if spec is not None:
    # A LoRA run's checkpoints hold adapters: each weight set is its adapters folded into the weights
    # they were trained on, read again from the run's pinned train.init_from (as saved with the step,
    # whatever config the caller passes).
    config = ml_collections.ConfigDict(config.to_dict())
    config.train = saved_train
    adapters = restore_adapters(workdir, step, config, mesh, names, tree)
    base = _frozen_weights(config, mesh)
    merged = {name: lora_lib.merge(lora_lib.combine(base, adapted), spec.scale)
              for name, adapted in adapters.items()}
    return merged if dtype is None else jax.tree.map(lambda leaf: leaf.astype(dtype), merged)
  one = _abstract(dit.abstract_params(config.model), config.mesh, mesh, dtype)
  # With experts, raw weights are {expert: tree}; an EMA tree holds the trained experts only, and a
  # frozen expert's raw weights complete each EMA set.
  experts, frozen = experts_lib.names(config.model), _frozen_experts(tree)
  abstract = {name: one for name in experts} if experts else one
  _check_shapes(workdir, step, tree["params"], abstract, config.model)
  target: dict[str, Any] = {}
  for name in names:
    if name == RAW:
      target["params"] = abstract
    else:
      target.setdefault("ema", {})[name[len("ema_"):]] = (
          {expert: one for expert in experts if expert not in frozen} if experts else one)
      if frozen and "params" not in target:
        target["params"] = {expert: one for expert in frozen}
  restored = _restore(workdir, step, target, "weights")

  def weight_set(name: str) -> Any:
    if name == RAW:
      return restored["params"]
    ema = restored["ema"][name[len("ema_"):]]
    return {**ema, **{expert: restored["params"][expert] for expert in frozen}} if experts else ema

  return {name: weight_set(name) for name in names}


def abstract_weight_set(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                        dtype: str | None = None) -> Any:
  """ShapeDtypeStructs of one weight set as `restore_weights` gives it on `mesh` ({expert: tree} for a
  model with experts): what an eval holds per weight set."""
  one = _abstract(dit.abstract_params(config.model), config.mesh, mesh, dtype)
  experts = experts_lib.names(config.model)
  return {name: one for name in experts} if experts else one


def _abstract(boxed: Any, mesh_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              dtype: str | None = None) -> Any:
  """ShapeDtypeStructs of a boxed parameter tree (in `dtype` if given), carrying the `mesh` group's
  shardings on `mesh`: a restore to them casts as it reads."""
  shardings = sharding_lib.tree_shardings(boxed, mesh, sharding_lib.logical_rules(mesh_config))
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, dtype or leaf.dtype, sharding=sharding),
      nn.meta.unbox(boxed), shardings)


def restore_adapters(workdir: str, step: int, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     names: list[str] | None = None, tree: Any = None) -> dict[str, Any]:
  """{weight-set name: adapters} of a LoRA run's checkpoint (no frozen weights read), on `mesh`."""
  spec = lora_lib.spec_of(config.train)
  if spec is None:
    raise WeightsError(f"checkpoint step {step} of {workdir!r} is of a run with train.lora_rank=0: it "
                       f"holds no adapters")
  tree = _state_tree(workdir, step) if tree is None else tree
  names = _chosen_sets(workdir, step, tree, names)
  one = _abstract(lora_lib.split(dit.abstract_params(config.model, lora=spec))[1], config.mesh, mesh)
  _check_shapes(workdir, step, tree["params"], one, config.model)
  target: dict[str, Any] = {}
  for name in names:
    if name == RAW:
      target["params"] = one
    else:
      target.setdefault("ema", {})[name[len("ema_"):]] = one
  restored = _restore(workdir, step, target, "adapters")
  return {name: restored["params"] if name == RAW else restored["ema"][name[len("ema_"):]] for name in names}


def _restore(workdir: str, step: int, target: Any, what: str) -> Any:
  """The parts of a step's state that `target` names, or one DamagedCheckpoint saying `what` failed."""
  try:
    return checkpoint_lib.restore_weights_only(workdir, step, target)
  except Exception as error:  # noqa: BLE001 - orbax / tensorstore raise many types for bad files
    state = checkpoint_lib.item_path(workdir, step, checkpoint_lib.STATE_ITEM)
    raise DamagedCheckpoint(f"checkpoint step {step} of {workdir!r}: {what} unreadable in "
                            f"{state} ({_first_line(error)})") from error


def _frozen_experts(tree: Any) -> tuple[str, ...]:
  """The experts a checkpoint holds raw weights of but no EMA (those its run kept frozen)."""
  params, ema = tree["params"], tree.get("ema") or {}
  if not ema or not set(params) <= set(choices.EXPERTS):
    return ()
  averaged = set(next(iter(ema.values())))
  return tuple(name for name in choices.EXPERTS if name in params and name not in averaged)


def readable_checkpoint(
    workdir: str,
    step: int | None,
    load: Callable[[int], Any],
    warn: Callable[[str], None] = print,
) -> tuple[int, Any]:
  """(step, load(step)) of the checkpoint the user asked for: the one path eval, sample and export read.

  `load(step)` reads what the binary needs (config, weights) and raises DamagedCheckpoint for files
  it cannot read. With an explicit `step`, a damaged one is an error; without, the newest readable
  step is used and each damaged newer one costs one warning line. A workdir whose every checkpoint
  is damaged is one error listing them. Nothing is moved or deleted: these binaries only read.
  """
  if step is not None:
    return resolve_step(workdir, step), load(resolve_step(workdir, step))
  steps = list_steps(workdir)
  if not steps:
    raise no_checkpoints(workdir)
  candidate, loaded, damaged = checkpoint_lib.newest_readable(steps, load, DamagedCheckpoint)
  if candidate is None:
    raise DamagedCheckpoint(f"no readable checkpoint in {workdir!r}: " +
                            "; ".join(f"step {bad}: {error}" for bad, error in damaged))
  for bad, error in damaged:  # warned only once a readable step is found; else the error above
    warn(f"warning: checkpoint step {bad} is unreadable ({error}); using step {candidate}")
  return candidate, loaded


def _check_shapes(workdir: str, step: int, saved: Any, abstract: Any,
                  model: ml_collections.ConfigDict) -> None:
  detail = checkpoint_lib.param_shape_mismatch(saved, abstract)
  if detail is not None:
    raise WeightsError(
        f"checkpoint step {step} of {workdir!r}: {detail} (model.dim={model.dim}, "
        f"model.num_layers={model.num_layers}); "
        f"pass the run's config or leave --config out to use the one saved with the checkpoint")
