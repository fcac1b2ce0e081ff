"""Logical axis names -> NamedShardings over the mesh, with the config's one rules table.

Owns the sharding of parameter trees (from their logical partitioning metadata), of data batches
(leading `batch` axis) and which slice of them each process loads, of replicated scalars, the context
that activates the rules in tracing, and the specs that `jax.shard_map` regions of the model (the
ring, all-to-all and splash attention backends) take from those rules, so model code names no mesh
axes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, Any], ...]


def logical_rules(mesh_config: ml_collections.ConfigDict) -> LogicalRules:
  """`mesh.logical_axis_rules` as a tuple of (logical name, mesh axes or None)."""
  rules = []
  for rule in mesh_config.logical_axis_rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(
          f"mesh.logical_axis_rules entry {rule!r}; expected (logical_name, mesh_axis | tuple | None)")
    name, target = rule
    if isinstance(target, list):
      target = tuple(target)
    rules.append((name, target))
  return tuple(rules)


def axis_names(entry: Any) -> tuple[str, ...]:
  """Mesh axis names of one rules target or PartitionSpec entry (None, a name, or a tuple of names)."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, rules: LogicalRules) -> Iterator[None]:
  """Makes the mesh and rules visible to nn.with_logical_constraint while tracing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def tree_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) leaves; unboxed leaves replicate.

  The result has the structure of the unboxed tree, so it can be passed as jit out_shardings of a
  function that returns `nn.meta.unbox(tree)`. A dimension that the mapped mesh axes do not divide
  stays replicated along them rather than failing (small tables such as biases of odd widths).
  """
  specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.meta.unbox(abstract_tree)

  def to_sharding(spec: Any, leaf: Any) -> NamedSharding:
    if not isinstance(spec, PartitionSpec):
      return NamedSharding(mesh, PartitionSpec())
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    shape = getattr(leaf, "shape", ())
    dims = []
    for i, axes in enumerate(tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))):
      if axes is None or i >= len(shape):
        dims.append(None)
        continue
      names = axis_names(axes)
      names = tuple(name for name in names if name in mesh.axis_names)
      size = 1
      for name in names:
        size *= mesh.shape[name]
      if not names or shape[i] % size:
        dims.append(None)
      else:
        dims.append(names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, PartitionSpec(*dims[:len(shape)]))

  return jax.tree.map(to_sharding, specs, shapes,
                      is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None)


def batch_axes(mesh: jax.sharding.Mesh, rules: LogicalRules) -> tuple[str, ...]:
  """Mesh axes the `act_batch` logical axis maps to (those present in the mesh)."""
  for name, target in rules:
    if name == "act_batch":
      return tuple(axis for axis in axis_names(target) if axis in mesh.axis_names)
  return ()


def batch_sharding(mesh: jax.sharding.Mesh, rules: LogicalRules) -> NamedSharding:
  """Sharding of a data array: leading axis over the batch mesh axes, the rest replicated."""
  axes = batch_axes(mesh, rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_size_divisor(mesh: jax.sharding.Mesh, rules: LogicalRules) -> int:
  """Number of shards the batch axis is split into."""
  size = 1
  for axis in batch_axes(mesh, rules):
    size *= mesh.shape[axis]
  return size


def process_batch_shard(sharding: jax.sharding.Sharding, global_batch_size: int) -> tuple[int, int]:
  """(index, count): which of `count` equal, contiguous slices of the global batch this process loads.

  A process loads the rows its devices hold under `sharding`. Where the batch is not split across
  processes (context or tensor parallelism over hosts), several processes hold the same rows and must
  load the same data: they get the same index, and `count` is below the process count.
  """
  slices = {(index[0].start or 0, global_batch_size if index[0].stop is None else index[0].stop)
            for index in sharding.addressable_devices_indices_map((global_batch_size,)).values()}
  start, stop = min(a for a, _ in slices), max(b for _, b in slices)
  covered = sum(b - a for a, b in slices)
  size = stop - start
  if covered != size or global_batch_size % size or start % size:
    raise ValueError(
        f"process {jax.process_index()} holds rows {sorted(slices)} of the global batch of "
        f"{global_batch_size}; expected one contiguous, equal share (the mesh's batch axes should "
        f"follow the process order)")
  return start // size, global_batch_size // size


def traced_mesh_axes(logical_name: str) -> tuple[str, ...]:
  """Mesh axes (of size > 1) the active rules map `logical_name` to, on the mesh being traced under."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  try:
    (axes,) = tuple(nn.logical_to_mesh_axes((logical_name,)))
  except ValueError:  # no rules active
    return ()
  return tuple(n for n in axis_names(axes) if n in mesh.axis_names and mesh.shape[n] > 1)


def traced_spec(logical_axes: Sequence[str], overrides: dict[str, str | None] | None = None) -> PartitionSpec:
  """PartitionSpec (for `jax.shard_map`) of an array whose dims carry `logical_axes`, by the active rules.

  `overrides` pins logical names to one mesh axis or None (e.g. the sequence on `context`); other
  dimensions drop mesh axes that a pinned or earlier dimension already takes.
  """
  overrides = overrides or {}
  taken, dims = {axis for axis in overrides.values() if axis}, []
  for name in logical_axes:
    if name in overrides:
      names = () if overrides[name] is None else (overrides[name],)
    else:
      names = tuple(n for n in traced_mesh_axes(name) if n not in taken)
      taken.update(names)
    dims.append(names[0] if len(names) == 1 else (names or None))
  return PartitionSpec(*dims)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
