"""Ahead-of-time compilation of the real train step for a TPU topology, on any host (libtpu).

Owns topology naming (`v5p-128` accelerator types and `v5e:4x4` topology strings), the abstract
sharded state and batch, and the per-device memory report against the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax import config as config_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import state as state_lib
from sora_jax.train import step as step_lib

# HBM per chip in GiB; per device it is divided by the devices libtpu makes of a chip.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# Accelerator types count TensorCores for v4/v5p (2 per chip, 3D torus) and chips for v5e/v6e (2D).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


class TopologyError(ValueError):
  """A topology name sora_jax.compile cannot turn into TPU devices."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What one ahead-of-time compile found, per device."""

  topology: str
  num_devices: int
  device_kind: str
  mesh_shape: dict[str, int]
  latent_shape: tuple[int, ...]
  param_count: int
  argument_gib: float  # parameters, optimizer state, EMA and batch held by one device
  temp_gib: float  # activations and scratch of the step on one device
  output_gib: float
  alias_gib: float  # outputs that reuse donated inputs (counted once)
  hbm_gib: float
  flops_per_device: float | None
  compile_s: float

  @property
  def total_gib(self) -> float:
    return self.argument_gib + self.temp_gib + self.output_gib - self.alias_gib

  @property
  def fits(self) -> bool:
    return self.total_gib <= self.hbm_gib


def topology_string(name: str) -> tuple[str, str]:
  """('v5p', 'v5p:4x4x4') from an accelerator type `v5p-128` or a topology `v5p:4x4x4`."""
  if ":" in name:
    generation, _, shape = name.partition(":")
    generation = _ALIASES.get(generation, generation)
    if generation not in HBM_GIB or not all(part.isdigit() for part in shape.split("x")):
      raise TopologyError(
          f"--topology={name!r}: expected GEN:AxB[xC] with GEN one of {sorted(HBM_GIB)}")
    return generation, f"{generation}:{shape}"
  generation, _, count = name.partition("-")
  generation = _ALIASES.get(generation, generation)
  if generation not in HBM_GIB or not count.isdigit():
    raise TopologyError(
        f"--topology={name!r}: expected an accelerator type like v5p-128, v5e-16, v6e-256, v4-32 "
        f"or a topology like v5e:4x4")
  chips = int(count) // _CORES_PER_CHIP[generation]
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"--topology={name!r}: expected a power-of-two number of chips, got {chips}")
  # Torus sides double one at a time, the smallest (last of equals) first: v5p-128 -> 4x4x4,
  # v5e-32 -> 4x8. Below 8 chips the 3D tori are the flat 2x2x1 / 2x1x1 shapes.
  dims = [1, 1, 1] if _CORES_PER_CHIP[generation] == 2 else [1, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
  if len(dims) == 3 and chips < 8:
    dims.sort(reverse=True)
  return generation, f"{generation}:{'x'.join(str(d) for d in dims)}"


def topology_devices(name: str, num_slices: int = 1) -> tuple[str, list[Any], float]:
  """(topology, compile-only devices, HBM GiB per device) of a TPU topology; needs libtpu, not a TPU."""
  from jax.experimental import topologies

  generation, topology = topology_string(name)
  try:
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    description = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as error:  # noqa: BLE001 - libtpu raises several types for bad names / no libtpu
    raise TopologyError(
        f"cannot describe TPU topology {topology!r} ({error}); it needs libtpu "
        f"(pip install -e '.[tpu]') and a topology libtpu knows") from None
  devices = list(description.devices)
  chips = math.prod(int(d) for d in topology.split(":")[1].split("x")) * num_slices
  return topology, devices, HBM_GIB[generation] * chips / len(devices)


def abstract_batch(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """ShapeDtypeStructs of one global batch of the config's largest video bucket."""
  buckets = list(config.data.buckets) or list(config.data.image_buckets)
  latent_shape = max((config_lib.latent_shape(config, b) for b in buckets), key=math.prod)
  batch = config.train.global_batch_size
  return {
      "latents": jax.ShapeDtypeStruct((batch, *latent_shape), jnp.float32, sharding=sharding),
      "text_embeds": jax.ShapeDtypeStruct(
          (batch, config.data.text_len, config.model.text_dim), jnp.float32, sharding=sharding),
  }


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any], topology: str,
                       hbm_gib: float) -> CompileReport:
  """Lowers and compiles the trainer's step for `devices` and reports its per-device memory."""
  config_lib.validate(config, len(devices))
  mesh = mesh_lib.create_mesh(config, devices)
  trainable = step_lib.build(config, mesh)
  rules, train_step = trainable.rules, trainable.train_step
  state = trainable.abstract_state()
  batch = abstract_batch(config, trainable.batch_sharding)
  start = time.perf_counter()
  with sharding_lib.mesh_context(mesh, rules):
    compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  gib = lambda n: float(n) / 2**30
  return CompileReport(
      topology=topology, num_devices=len(devices), device_kind=devices[0].device_kind,
      mesh_shape=dict(mesh.shape), latent_shape=tuple(batch["latents"].shape[1:]),
      param_count=state_lib.param_count(trainable.setup.abstract_state.params),
      argument_gib=gib(memory.argument_size_in_bytes), temp_gib=gib(memory.temp_size_in_bytes),
      output_gib=gib(memory.output_size_in_bytes), alias_gib=gib(memory.alias_size_in_bytes),
      hbm_gib=hbm_gib, flops_per_device=flops or None, compile_s=compile_s)


def format_report(report: CompileReport) -> str:
  verdict = "FITS" if report.fits else "DOES NOT FIT"
  lines = [
      f"topology {report.topology}: {report.num_devices} x {report.device_kind}, "
      f"mesh {report.mesh_shape}",
      f"model {report.param_count:,} parameters; batch latents {report.latent_shape} per clip",
      f"per device: arguments {report.argument_gib:.2f} GiB + temporaries {report.temp_gib:.2f} GiB "
      f"+ outputs {report.output_gib:.2f} GiB - donated {report.alias_gib:.2f} GiB "
      f"= {report.total_gib:.2f} GiB of {report.hbm_gib:.1f} GiB HBM -> {verdict}",
      f"compiled in {report.compile_s:.1f} s"
      + (f"; {report.flops_per_device / 1e9:,.1f} GFLOP per step per device"
         if report.flops_per_device else ""),
  ]
  return "\n".join(lines)
