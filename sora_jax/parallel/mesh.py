"""Device mesh construction from the config's per-axis ICI and DCN sizes.

Owns `create_mesh(config, devices)`: resolves -1 sizes, lays devices out with jax's mesh_utils
(hybrid ICI x DCN layout across slices or processes) and returns a Mesh with Auto axis types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils

from sora_jax import config as config_lib

MESH_AXES = ("data", "fsdp", "context", "tensor")


class MeshError(ValueError):
  """A mesh layout that cannot be built on the available devices."""


def resolved_sizes(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, tuple[int, int]]:
  """{axis: (ici, dcn)} with -1 resolved for `num_devices`; raises ConfigError if they do not fit."""
  return config_lib.resolved_mesh(config, num_devices)


def create_mesh(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, context, tensor) mesh of `config.mesh` over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise MeshError("create_mesh got an empty device list; expected at least one device")
  axes = tuple(config.mesh.axes)
  unknown = [axis for axis in axes if axis not in MESH_AXES]
  if unknown:
    raise MeshError(f"mesh.axes={axes} names unknown axes {unknown}; expected a subset of {MESH_AXES}")
  sizes = resolved_sizes(config, len(devices))
  ici_shape = [sizes[axis][0] for axis in axes]
  dcn_shape = [sizes[axis][1] for axis in axes]
  if math.prod(ici_shape) * math.prod(dcn_shape) != len(devices):
    raise MeshError(
        f"mesh ici={ici_shape} x dcn={dcn_shape} does not cover the {len(devices)} devices")
  device_array = _layout(ici_shape, dcn_shape, devices)
  return jax.sharding.Mesh(
      device_array, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def _layout(ici_shape: list[int], dcn_shape: list[int], devices: list[jax.Device]) -> np.ndarray:
  """Physical device order: mesh_utils' topology-aware layouts, plain order where they do not apply."""
  if math.prod(dcn_shape) == 1:
    try:
      return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as error:
      # Topologies mesh_utils does not know (fake CPU devices, some GPU hosts): row-major order.
      _warn_fallback(devices, "devices in row-major order", error)
      return np.asarray(devices, dtype=object).reshape(ici_shape)
  # Slices (TPU multislice) are the granules when devices carry slice_index; otherwise processes.
  process_is_granule = not hasattr(devices[0], "slice_index")
  try:
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=process_is_granule,
        allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError, AttributeError) as error:
    # One process standing in for several slices (fake CPU devices in tests): consecutive blocks of
    # devices play the slices, so DCN is the outer factor of every axis, as in the hybrid layout.
    _warn_fallback(devices, "consecutive blocks of devices as the DCN granules", error)
    ndim = len(ici_shape)
    blocks = np.asarray(devices, dtype=object).reshape(list(dcn_shape) + list(ici_shape))
    order = [i for axis in range(ndim) for i in (axis, ndim + axis)]
    return blocks.transpose(order).reshape([d * i for d, i in zip(dcn_shape, ici_shape, strict=True)])


_WARNED: set[str] = set()


def _warn_fallback(devices: list[jax.Device], layout: str, error: BaseException) -> None:
  """One warning per process that an accelerator mesh fell back from mesh_utils' physical layout (which
  keeps each axis's neighbours on fast links) to `layout`. CPU devices have no links to follow."""
  if devices[0].platform == "cpu":
    return
  reason = " ".join(str(error).split())[:200] or type(error).__name__
  message = (f"mesh: {len(devices)} {devices[0].device_kind} devices laid out as {layout}, not by their "
             f"physical topology ({reason}); collectives may cross slower links than they need to")
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning("%s", message)
