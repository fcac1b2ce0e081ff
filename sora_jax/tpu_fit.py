"""Ahead-of-time compilation of the real train step for a TPU topology, on any host (libtpu).

Owns topology naming (`v5p-128` accelerator types and `v5e:4x4` topology strings), the abstract
sharded state and batch, and the per-device report against the chip's HBM: memory by category (what
the state and batch hold, from their shardings; what XLA's temporaries take), FLOPs per step from the
analytic count, and the step-time lower bound at the chip's peak. A compile-time out-of-memory is a
report too ("DOES NOT FIT" with the bytes XLA asked for), never a raw XLA error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax import config as config_lib
from sora_jax import patches
from sora_jax.model import attention as attention_lib
from sora_jax.model import dit
from sora_jax.model import flops as flops_lib
from sora_jax.model import lora as lora_lib
from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import metrics as metrics_lib
from sora_jax.train import step as step_lib

# HBM per chip in GiB; per device it is divided by the devices libtpu makes of a chip.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# Host RAM per chip in GiB: the TPU VM's memory over its chips (v4 407 GB / 4, v5p 448 GB / 4,
# v5e 512 GiB / 8, v6e 1536 GiB / 8). Offloaded activations and host-held state live there.
HOST_GIB_PER_CHIP = {"v4": 407e9 / 4 / 2**30, "v5p": 448e9 / 4 / 2**30, "v5e": 64.0, "v6e": 192.0}
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
  flops_per_device: float | None  # XLA's cost analysis: a scanned layer counted once, Pallas not at all
  compile_s: float
  state_gib: dict[str, float] = dataclasses.field(default_factory=dict)  # params, opt_state, ema, batch
  model_flops_per_step: float = 0.0  # analytic (model/flops.py), all devices, no remat recompute
  hardware_flops_per_step: float = 0.0  # the same plus remat recompute and tiling padding
  peak_flops_per_device: float | None = None  # dense bf16 FLOP/s of one device
  oom: str = ""  # XLA's compile-time out-of-memory message; the memory figures are then its request
  host_gib: float = 0.0  # host memory the step uses per device (offloaded activations, host-held state)
  host_capacity_gib: float = 0.0  # the host's RAM per device; 0 = unknown
  packed_tokens: int = 0  # data.packing: tokens per packed row (its clips are of latent_shape at most)
  sparse_attention: str = ""  # model.sparse_attention_keep < 1: the tiling of the largest clip

  @property
  def total_gib(self) -> float:
    return self.argument_gib + self.temp_gib + self.output_gib - self.alias_gib

  @property
  def host_fits(self) -> bool:
    return not self.host_capacity_gib or self.host_gib <= self.host_capacity_gib

  @property
  def fits(self) -> bool:
    return not self.oom and self.total_gib <= self.hbm_gib and self.host_fits

  @property
  def step_time_lower_bound_s(self) -> float | None:
    """Seconds per step if every device ran the hardware FLOPs at its peak (no communication)."""
    if not self.peak_flops_per_device or not self.hardware_flops_per_step:
      return None
    return self.hardware_flops_per_step / (self.num_devices * self.peak_flops_per_device)


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


def host_gib_per_device(topology: str) -> float:
  """The TPU VMs' RAM per device of `topology` (`v5p:2x2x1`; libtpu makes one device of each chip),
  or 0 where sora_jax does not know it."""
  return HOST_GIB_PER_CHIP.get(topology.partition(":")[0], 0.0)


def _largest_clip(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  buckets = list(config.data.buckets) or list(config.data.image_buckets)
  return max((patches.latent_shape(config, b) for b in buckets), key=math.prod)


def packed_clips_per_row(config: ml_collections.ConfigDict) -> int:
  """Clips of the largest bucket one packed row of data.token_budget tokens holds (at least 1)."""
  tokens = max(patches.bucket_tokens(config).values())
  return max(1, min(int(config.data.max_segments), int(config.data.token_budget) // tokens))


def abstract_batch(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """ShapeDtypeStructs of one global batch: of the largest video bucket, or packed rows (data.packing)
  of data.token_budget tokens with as many text slots as the pipeline would give them; with a
  mixture (data.sources), each clip's source as the pipeline gives it."""
  latent_shape = _largest_clip(config)
  batch = config.train.global_batch_size
  mixed = len(config_lib.data_sources(config.data)) > 1
  if config.data.packing:
    budget, model = int(config.data.token_budget), config.model
    segments = max(1, min(int(config.data.max_segments),
                          budget // min(patches.bucket_tokens(config).values())))
    text = segments * int(config.data.text_len)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=sharding)
    packed = {
        "latents": spec((budget, math.prod(model.patch_size) * model.in_channels), jnp.float32),
        "segment_ids": spec((budget,), jnp.int32), "positions": spec((budget, 3), jnp.int32),
        "loss_mask": spec((budget,), jnp.float32),
        "text_embeds": spec((text, model.text_dim), jnp.float32),
        "text_segment_ids": spec((text,), jnp.int32), "segment_grid": spec((segments, 3), jnp.int32),
    }
    return {**packed, "source": spec((segments,), jnp.int32)} if mixed else packed
  bucketed = {
      "latents": jax.ShapeDtypeStruct((batch, *latent_shape), jnp.float32, sharding=sharding),
      "text_embeds": jax.ShapeDtypeStruct(
          (batch, config.data.text_len, config.model.text_dim), jnp.float32, sharding=sharding),
  }
  if mixed:
    bucketed["source"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
  return bucketed


_OOM = re.compile(r"memory required for (?P<what>[^(]+?) \((?P<need>[\d.]+)(?P<need_unit>[KMGTP]?)i?B?\)"
                  r" exceeds available HBM \((?P<have>[\d.]+)(?P<have_unit>[KMGTP]?)i?B?\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_oom(message: str) -> tuple[str, float, float] | None:
  """(what XLA could not fit, GiB it needed, GiB available) from a compile-time HBM OOM, else None."""
  if "RESOURCE_EXHAUSTED" not in message and "HbmOom" not in message:
    return None
  match = _OOM.search(message)
  if not match:  # another memory space (a kernel's scalar memory, ...): no HBM figure to report
    space = re.search(r"memory in memory space (\w+)", message)
    return (space[1] if space else "memory", float("nan"), float("nan"))
  to_gib = lambda value, unit: float(value) * _UNITS[unit] / 2**30
  return (match["what"].strip(), to_gib(match["need"], match["need_unit"]),
          to_gib(match["have"], match["have_unit"]))


def _out_of_memory(error: Exception, arguments_gib: float) -> tuple[float, str]:
  """(GiB of temporaries XLA asked for, its message on one line) of a compile-time out-of-memory with
  `arguments_gib` of arguments; any other compile error is raised again."""
  oom = parse_oom(str(error))
  if oom is None:
    raise error
  what, need_gib, _ = oom
  temporaries = need_gib if "temporar" in what else max(need_gib - arguments_gib, 0.0)
  return temporaries, " ".join(str(error).split())[:400]


def _bytes_per_device(tree: Any) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (its largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return float(total)


def sparse_attention_text(model: ml_collections.ConfigDict, latent_shape) -> str:
  """What tile-sparse self-attention computes for a clip of `latent_shape` on TPU, and on which kernel
  ("" when it is dense)."""
  layout = sparse_lib.model_plan(model, patches.grid(latent_shape, model.patch_size))
  if layout is None:
    return ""
  backend = "splash" if model.attention_backend == "auto" else model.attention_backend
  return (f"sparse self-attention ({layout.rule}, on {attention_lib.sparse_kernel(backend, layout)}): "
          f"each query tile of {layout.tile} tokens attends {layout.keep_tiles} of {layout.num_tiles} key "
          f"tiles ({layout.kept_fraction:.1%}); {layout.tokens:,} tokens tiled to {layout.padded_tokens:,} "
          f"(+{layout.padded_tokens / layout.tokens - 1:.1%} padding)")


def step_flops(config: ml_collections.ConfigDict, latent_shape: tuple[int, ...]) -> tuple[float, float]:
  """(model FLOPs, hardware FLOPs) of one optimizer step over the global batch, from model/flops.py.

  Packed rows count as the clips of the largest bucket that fill them. Hardware FLOPs count a
  tile-sparse clip's padding tokens and add what the remat policy recomputes: `full` and `offload`
  rerun every block's forward in the backward pass; the other policies keep the matmul outputs, so
  they recompute no matmul.
  """
  model, text_len = config.model, int(config.data.text_len)
  batch = int(config.train.global_batch_size)
  if config.data.packing:  # full rows of the largest bucket's clips (attention stays within a clip)
    batch *= packed_clips_per_row(config)
  frozen = lora_lib.spec_of(config.train) is not None
  model_flops = batch * flops_lib.train_flops_per_example(model, latent_shape, text_len,
                                                          frozen_weights=frozen)
  hardware = batch * flops_lib.train_flops_per_example(model, latent_shape, text_len,
                                                       frozen_weights=frozen, hardware=True)
  if model.remat_policy in ("full", "offload"):
    hardware += batch * flops_lib.flops_breakdown(model, latent_shape, text_len, hardware=True)["blocks"]
  return model_flops, hardware


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any], topology: str,
                       hbm_gib: float) -> CompileReport:
  """Lowers and compiles the trainer's step for `devices` and reports its per-device memory.

  An out-of-memory at compile time gives a report that does not fit (with XLA's request), not an error.
  """
  config_lib.validate(config, len(devices))
  mesh = mesh_lib.create_mesh(config, devices)
  trainable = step_lib.build(config, mesh)
  rules, train_step = trainable.rules, trainable.train_step
  state = trainable.abstract_state()
  batch = abstract_batch(config, trainable.batch_sharding)
  gib = lambda n: float(n) / 2**30
  latent_shape = _largest_clip(config)
  # A LoRA run's step also takes the frozen weights its adapters train on.
  frozen = () if trainable.frozen is None else (jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      trainable.frozen.abstract, trainable.frozen.shardings),)
  state_gib = {}
  trees = [("params", state.params), ("opt_state", state.opt_state), ("ema", state.ema), ("batch", batch)]
  for name, tree in trees + [("frozen", tree) for tree in frozen]:
    # A tree may be split (LoRA's host-held frozen kernels beside its device-held norms): larger part first.
    leaves = jax.tree.leaves(tree)
    host = [leaf for leaf in leaves if leaf.sharding.memory_kind == "pinned_host"]
    device = [leaf for leaf in leaves if leaf.sharding.memory_kind != "pinned_host"]
    parts = [(f"{name} (host)", host)] * bool(host) + [(name, device)] * bool(device or not host)
    for key, part in sorted(parts, key=lambda part: -_bytes_per_device(part[1])):
      state_gib[key] = gib(_bytes_per_device(part))
  model_flops, hardware_flops = step_flops(config, latent_shape)
  report = dict(
      topology=topology, num_devices=len(devices), device_kind=devices[0].device_kind,
      mesh_shape=dict(mesh.shape), latent_shape=tuple(int(n) for n in latent_shape),
      packed_tokens=int(config.data.token_budget) if config.data.packing else 0,
      sparse_attention=sparse_attention_text(config.model, latent_shape),
      param_count=dit.count_params(trainable.setup.abstract_state.params), hbm_gib=hbm_gib,
      state_gib=state_gib, model_flops_per_step=model_flops, hardware_flops_per_step=hardware_flops,
      peak_flops_per_device=metrics_lib.peak_flops_per_device(devices[0].device_kind))
  start = time.perf_counter()
  try:
    with sharding_lib.mesh_context(mesh, rules):
      compiled = train_step.lower(state, batch, *frozen).compile()
  except Exception as error:  # noqa: BLE001 - XLA raises its own runtime error type for an OOM
    arguments = sum(value for name, value in state_gib.items() if not name.endswith("(host)"))
    temporaries, oom = _out_of_memory(error, arguments)
    return CompileReport(**report, argument_gib=arguments, temp_gib=temporaries, output_gib=0.0,
                         alias_gib=0.0, flops_per_device=None, compile_s=time.perf_counter() - start, oom=oom)
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  return CompileReport(
      **report, argument_gib=gib(memory.argument_size_in_bytes), temp_gib=gib(memory.temp_size_in_bytes),
      output_gib=gib(memory.output_size_in_bytes), alias_gib=gib(memory.alias_size_in_bytes),
      flops_per_device=flops or None, compile_s=compile_s,
      host_capacity_gib=host_gib_per_device(topology),
      host_gib=gib(memory.host_argument_size_in_bytes + memory.host_temp_size_in_bytes
                   + memory.host_output_size_in_bytes - memory.host_alias_size_in_bytes))


@dataclasses.dataclass(frozen=True)
class SamplerReport:
  """What one ahead-of-time compile of eval's sampler found, per device: one call of
  eval.sample_batch_size prompts, with every weight set eval restores held beside it."""

  prompts_per_call: int
  pixel_shape: tuple[int, int, int]  # eval.num_frames, height, width
  latent_shape: tuple[int, ...]
  steps: int
  weight_sets: int  # raw and one per train.ema_decays, each restored in float32
  weight_set_gib: float
  argument_gib: float  # one weight set, the noise and the text embeddings
  temp_gib: float
  output_gib: float
  hbm_gib: float
  compile_s: float
  oom: str = ""

  @property
  def total_gib(self) -> float:
    return self.argument_gib + (self.weight_sets - 1) * self.weight_set_gib + self.temp_gib + self.output_gib

  @property
  def fits(self) -> bool:
    return not self.oom and self.total_gib <= self.hbm_gib


def compile_eval_sampler(config: ml_collections.ConfigDict, devices: list[Any],
                         hbm_gib: float) -> SamplerReport:
  """Lowers and compiles one call of eval's sampler (the whole denoising loop) for `devices`.

  Eval restores every weight set (raw and each EMA) in float32 before it samples, so all of them count;
  the VAE decode after sampling (one clip per device) is not part of this compile.
  """
  from sora_jax.evaluation import sampling
  from sora_jax.train import run_weights

  config_lib.validate(config, len(devices))
  mesh = mesh_lib.create_mesh(config, devices)
  settings = sampling.SampleSettings.from_config(config)
  sampler = sampling.Sampler(dit.DiT(config.model), config, settings, mesh)
  count = sampler.call_size(int(config.eval.sample_batch_size))
  params = run_weights.abstract_weight_set(config, mesh)
  gib = lambda n: float(n) / 2**30
  report = dict(prompts_per_call=count, latent_shape=tuple(sampler.shape), steps=settings.steps,
                pixel_shape=(settings.num_frames, settings.height, settings.width),
                weight_sets=1 + len(config.train.ema_decays), weight_set_gib=gib(_bytes_per_device(params)),
                hbm_gib=hbm_gib)
  start = time.perf_counter()
  try:
    compiled = sampler.lower(params, count).compile()
  except Exception as error:  # noqa: BLE001 - XLA raises its own runtime error type for an OOM
    temporaries, oom = _out_of_memory(error, report["weight_set_gib"])
    return SamplerReport(**report, argument_gib=report["weight_set_gib"], output_gib=0.0,
                         temp_gib=temporaries, compile_s=time.perf_counter() - start, oom=oom)
  memory = compiled.memory_analysis()
  return SamplerReport(**report, argument_gib=gib(memory.argument_size_in_bytes),
                       temp_gib=gib(memory.temp_size_in_bytes), output_gib=gib(memory.output_size_in_bytes),
                       compile_s=time.perf_counter() - start)


def format_sampler_report(report: SamplerReport) -> str:
  verdict = "FITS" if report.fits else "DOES NOT FIT"
  frames, height, width = report.pixel_shape
  lines = [f"eval sampling: {report.prompts_per_call} prompts per call (eval.sample_batch_size) at "
           f"{frames}x{height}x{width}, latents {report.latent_shape}, {report.steps} steps"]
  held = (f"{report.weight_sets} weight sets x {report.weight_set_gib:.2f} GiB (raw and EMA, float32)")
  if report.oom:
    lines.append(f"per device: XLA asked for {report.temp_gib:.2f} GiB of temporaries + {held} = "
                 f"{report.total_gib:.2f} GiB of {report.hbm_gib:.1f} GiB HBM -> {verdict}")
    lines.append(f"compile stopped after {report.compile_s:.1f} s: {report.oom}")
  else:
    inputs = report.argument_gib - report.weight_set_gib
    lines.append(f"per device: {held} + noise and text {inputs:.2f} GiB + temporaries "
                 f"{report.temp_gib:.2f} GiB + outputs {report.output_gib:.2f} GiB = {report.total_gib:.2f} "
                 f"GiB of {report.hbm_gib:.1f} GiB HBM -> {verdict} (compiled in {report.compile_s:.1f} s)")
  if not report.fits:
    lines.append("lower eval.sample_batch_size, or sample a smaller eval.num_frames x height x width")
  return "\n".join(lines)


def format_report(report: CompileReport) -> str:
  verdict = "FITS" if report.fits else "DOES NOT FIT"
  held = ", ".join(f"{name} {value:.3g}" for name, value in report.state_gib.items())
  lines = [
      f"topology {report.topology}: {report.num_devices} x {report.device_kind}, "
      f"mesh {report.mesh_shape}",
      f"model {report.param_count:,} {'adapter ' if 'frozen' in report.state_gib else ''}parameters "
      f"trained; batch latents {report.latent_shape} per clip",
  ]
  if report.packed_tokens:
    lines[-1] += f", packed into rows of {report.packed_tokens:,} tokens (data.packing)"
  if report.sparse_attention:
    lines.append(report.sparse_attention)
  if report.oom and math.isnan(report.temp_gib):
    lines.append(f"per device: {report.argument_gib:.2f} GiB of state and batch; XLA ran out of a memory "
                 f"space it names below -> {verdict}")
  elif report.oom:
    lines.append(
        f"per device: XLA asked for {report.temp_gib:.2f} GiB of temporaries + {report.argument_gib:.2f} GiB "
        f"of state and batch = {report.total_gib:.2f} GiB of {report.hbm_gib:.1f} GiB HBM -> {verdict}")
  else:
    lines.append(
        f"per device: arguments {report.argument_gib:.2f} GiB + temporaries {report.temp_gib:.2f} GiB "
        f"+ outputs {report.output_gib:.2f} GiB - donated {report.alias_gib:.2f} GiB "
        f"= {report.total_gib:.2f} GiB of {report.hbm_gib:.1f} GiB HBM -> {verdict}")
  lines.append(f"held per device (GiB): {held}; activations and scratch: temporaries above")
  if report.host_gib:
    line = f"host memory per device: {report.host_gib:.2f} GiB (offloaded activations, host-held state)"
    if report.host_capacity_gib:
      line += (f" of the TPU VM's {report.host_capacity_gib:.1f} GiB per chip -> "
               f"{'fits' if report.host_fits else 'DOES NOT FIT in host RAM'}")
    lines.append(line)
  if report.model_flops_per_step:
    line = (f"FLOPs per step: {report.model_flops_per_step / 1e12:,.2f} TFLOP model, "
            f"{report.hardware_flops_per_step / 1e12:,.2f} TFLOP on the chips (remat recompute, sparse "
            f"tiles' padding; all devices)")
    bound = report.step_time_lower_bound_s
    if bound is not None:
      line += (f"; step time >= {bound:.3g} s at {report.peak_flops_per_device / 1e12:.0f} TFLOP/s "
               f"bf16 peak per device")
    lines.append(line)
  compiled = f"compiled in {report.compile_s:.1f} s"
  if report.oom:
    compiled = f"compile stopped after {report.compile_s:.1f} s: {report.oom}"
  elif report.flops_per_device:
    compiled += (f"; XLA's cost analysis: {report.flops_per_device / 1e9:,.1f} GFLOP per device (counts a "
                 f"scanned layer once)")
  lines.append(compiled)
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MaxBatch:
  """The largest global batch one step holds on a topology, and how to reach the config's batch with it."""

  batch: int  # largest per-step global batch that fits (0: not even one batch divisor's worth)
  divisor: int  # per-step batches are multiples of the data x fsdp mesh size
  tried: dict[int, bool]  # batch -> fits, every compile the search ran
  grad_accum_steps: int  # smallest accumulation that reaches train.global_batch_size; 0 if none can
  check: CompileReport | None  # the config at that accumulation, compiled


def _with_batch(config: ml_collections.ConfigDict, batch: int, accum: int) -> ml_collections.ConfigDict:
  trial = ml_collections.ConfigDict(config.to_dict())
  trial.train.global_batch_size = batch
  trial.train.grad_accum_steps = accum
  return trial


def max_batch(config: ml_collections.ConfigDict, devices: list[Any], topology: str, hbm_gib: float,
              limit: int | None = None) -> MaxBatch:
  """Searches by compiles (doubling, then bisection in multiples of the batch divisor) for the largest
  global batch one step holds, up to `limit` (default: the config's global batch, or one divisor)."""
  sizes = mesh_lib.resolved_sizes(config, len(devices))
  divisor = math.prod(ici * dcn for axis, (ici, dcn) in sizes.items() if axis in ("data", "fsdp"))
  target = int(config.train.global_batch_size)
  limit = max(limit or target, divisor)
  tried: dict[int, bool] = {}

  def fits(units: int) -> bool:
    batch = units * divisor
    if batch not in tried:
      report = compile_train_step(_with_batch(config, batch, 1), devices, topology, hbm_gib)
      tried[batch] = report.fits
    return tried[batch]

  best, top = 0, limit // divisor
  if fits(1):
    best, probe = 1, 2
    while probe <= top and fits(probe):
      best, probe = probe, probe * 2
    high = min(probe, top + 1)  # the first size known not to fit, or past the limit
    while high - best > 1:
      middle = (best + high) // 2
      best, high = (middle, high) if fits(middle) else (best, middle)
  batch = best * divisor
  accum = next((a for a in range(1, target + 1) if target % a == 0 and (target // a) % divisor == 0
                and target // a <= batch), 0) if batch else 0
  check = (compile_train_step(_with_batch(config, target, accum), devices, topology, hbm_gib)
           if accum else None)
  return MaxBatch(batch=batch, divisor=divisor, tried=tried, grad_accum_steps=accum, check=check)


def format_max_batch(result: MaxBatch, train: ml_collections.ConfigDict) -> str:
  tried = ", ".join(f"{b} {'fits' if ok else 'does not'}" for b, ok in sorted(result.tried.items()))
  target = train.global_batch_size
  if not result.batch:
    return (f"max batch: not even {result.divisor} clips (one per data x fsdp shard) fit in one step "
            f"({tried}); shard wider (tensor / context axes), remat more, or use a larger topology")
  lines = [f"max batch: {result.batch} clips per step fit (multiples of {result.divisor}; {tried})"]
  if result.check is not None:
    verdict = "FITS" if result.check.fits else "DOES NOT FIT"
    lines.append(
        f"train.global_batch_size={target} as {result.grad_accum_steps} accumulated micro-batches of "
        f"{target // result.grad_accum_steps}: --config.train.grad_accum_steps={result.grad_accum_steps} "
        f"({result.check.total_gib:.2f} GiB per device -> {verdict})")
  else:
    lines.append(f"train.global_batch_size={target} cannot be split into micro-batches of at most "
                 f"{result.batch} that are multiples of {result.divisor}")
  return "\n".join(lines)
