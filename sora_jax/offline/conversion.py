"""Export of a run's weights to PyTorch layouts (diffusers, original Wan2.1) and import back.

Owns the output directory discipline (temp dir, rename at the end, --overwrite), the per-tensor
stream from device arrays into safetensors, and the import into an orbax checkpoint the trainer
fine-tunes from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np

from sora_jax import config as config_lib
from sora_jax.diffusion import experts as experts_lib
from sora_jax.export import diffusers as diffusers_lib
from sora_jax.export import peft_lora, pretrained, wan
from sora_jax.files import atomic, layout, safetensors_io
from sora_jax.model import lora as lora_lib
from sora_jax.model.dit import DiT
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import checkpoint as checkpoint_lib
from sora_jax.train import optimizer as optimizer_lib
from sora_jax.train import run_weights as weights_lib
from sora_jax.train import state as state_lib

FORMATS = ("diffusers", "wan")
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
WEIGHTS_PREFIX = diffusers_lib.WEIGHTS_PREFIX  # both layouts use diffusers' file names
CONFIG_FILE = layout.CONFIG_FILE


class ExportError(ValueError):
  """Bad export / import input: unknown format or dtype, a non-empty output, unloadable weights."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
  out: str
  step: int
  weight_set: str
  files: list[str]
  num_tensors: int
  num_bytes: int


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}; expected one of {FORMATS}")


def local_mesh() -> jax.sharding.Mesh:
  """All local devices on the fsdp axis: export and import run on one host whatever the run's mesh."""
  devices = np.asarray(jax.local_devices(), dtype=object).reshape(1, -1, 1, 1)
  return jax.sharding.Mesh(devices, ("data", "fsdp", "context", "tensor"))


def check_output(out: str, overwrite: bool) -> None:
  """Refuses an output that is a file, or a non-empty directory without `overwrite`."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f"output {out} exists and is not a directory")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ExportError(f"output {out} is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_directory(out: str, overwrite: bool) -> Iterator[str]:
  """Yields a temp directory next to `out` that becomes `out` only if the body succeeds.

  An existing non-empty `out` is refused unless `overwrite`; on failure nothing is left behind.
  """
  check_output(os.path.abspath(out), overwrite)
  with atomic.staged_directory(out) as staged:
    yield staged


def _tensor_plan(model: ml_collections.ConfigDict, fmt: str, dtype: np.dtype):
  """({file tensor name: diffusers key-map entry}, tensor specs) in diffusers' module order."""
  plan, specs = {}, []
  for entry in diffusers_lib.tensor_entries(model):
    file_name = entry.name if fmt == "diffusers" else wan.diffusers_to_wan_key(entry.name)
    plan[file_name] = entry
    specs.append(safetensors_io.TensorSpec(file_name, entry.torch_shape, dtype))
  return plan, specs


def check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ExportError(f"--dtype={dtype!r}; expected one of {tuple(DTYPES)}")


def write_transformer(params: Mapping, config: ml_collections.ConfigDict, out: str, *, fmt: str,
                      dtype: str = "fp32", overwrite: bool = False,
                      max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes config.json + safetensors of `params` (jax or numpy tree) in `fmt` into `out`, atomically."""
  _check_format(fmt)
  check_dtype(dtype)
  with atomic_directory(out, overwrite) as temp:
    return write_model_files(params, config, temp, fmt=fmt, dtype=dtype, max_shard_bytes=max_shard_bytes)


def write_model_files(params: Mapping, config: ml_collections.ConfigDict, directory: str, *, fmt: str,
                      dtype: str = "fp32",
                      max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """One DiT's files into `directory`; with experts, each expert's into its own subdirectory
  (`transformer/` + `transformer_2/` for diffusers, `high_noise_model/` + `low_noise_model/` for Wan)."""
  experts = experts_lib.names(config.model)
  if not experts:
    return write_transformer_files(params, config, directory, fmt=fmt, dtype=dtype,
                                   max_shard_bytes=max_shard_bytes)
  files = []
  for name in experts:
    sub = layout.EXPERT_DIRS[fmt][name]
    written = write_transformer_files(params[name], config, os.path.join(directory, sub), fmt=fmt,
                                      dtype=dtype, max_shard_bytes=max_shard_bytes)
    files += [f"{sub}/{file}" for file in written]
  return files


def weight_specs(directory: str, model: ml_collections.ConfigDict,
                 fmt: str) -> list[safetensors_io.TensorSpec]:
  """The tensors `write_model_files` wrote into `directory` (every expert's)."""
  experts = experts_lib.names(model)
  parts = [os.path.join(directory, layout.EXPERT_DIRS[fmt][name]) for name in experts] or [directory]
  return [spec for part in parts
          for spec in safetensors_io.Reader(part, prefix=WEIGHTS_PREFIX).specs().values()]


def write_transformer_files(params: Mapping, config: ml_collections.ConfigDict, directory: str, *, fmt: str,
                            dtype: str = "fp32",
                            max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes config.json + safetensors of `params` in `fmt` into `directory` (made if missing).

  Tensors leave the devices one at a time (one layer's slice of a scanned parameter), so host
  memory holds one tensor, not the model.
  """
  _check_format(fmt)
  check_dtype(dtype)
  model = config.model
  if fmt == "diffusers":
    config_json = diffusers_lib.model_config_to_diffusers(model)
  else:
    config_json = wan.wan_config(model, config.data.text_len)
  plan, specs = _tensor_plan(model, fmt, DTYPES[dtype])

  def load(file_name: str) -> np.ndarray:
    entry = plan[file_name]
    # One layer's slice is taken where the array lives, before the copy to host.
    host = np.asarray(jax.device_get(diffusers_lib.param_at(params, entry)))
    return np.ascontiguousarray(entry.layout.to_torch(host)).astype(DTYPES[dtype])

  os.makedirs(directory, exist_ok=True)
  atomic.write_json(os.path.join(directory, CONFIG_FILE), config_json)
  files = safetensors_io.write_sharded(directory, specs, load, prefix=WEIGHTS_PREFIX,
                                       max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
  return [CONFIG_FILE, *files]


def weight_set_name(ema: float | None) -> str:
  """`raw`, or the EMA weight set of a decay (named as the trainer keys it: repr of the float)."""
  return weights_lib.RAW if ema is None else weights_lib.ema_name(repr(float(ema)))


def export_checkpoint(workdir: str, out: str, *, fmt: str, step: int | None = None,
                      ema: float | None = None, dtype: str = "fp32", overwrite: bool = False,
                      max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> ExportResult:
  """Exports the raw (or `ema`) weights of checkpoint `step` (default: newest) of `workdir`."""
  _check_format(fmt)
  check_dtype(dtype)
  check_output(out, overwrite)  # before any restore: bad input fails in milliseconds
  name = weight_set_name(ema)

  def load(candidate: int):
    config = weights_lib.saved_config(workdir, candidate)
    return config, weights_lib.restore_weights(workdir, candidate, config, local_mesh(), [name])[name]

  step, (config, params) = weights_lib.readable_checkpoint(
      workdir, step, load, warn=lambda line: print(f"sora_jax.export: {line}", file=sys.stderr, flush=True))
  files = write_transformer(params, config, out, fmt=fmt, dtype=dtype, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes)
  specs = weight_specs(out, config.model, fmt)
  return ExportResult(out=os.path.abspath(out), step=step, weight_set=name, files=files,
                      num_tensors=len(specs), num_bytes=sum(s.num_bytes for s in specs))


def export_lora(workdir: str, out: str, *, step: int | None = None, ema: float | None = None,
                dtype: str = "fp32", overwrite: bool = False) -> ExportResult:
  """Writes the raw (or `ema`) adapters of a LoRA run's checkpoint as `out/pytorch_lora_weights.safetensors`
  (`WanPipeline.load_lora_weights(out)` loads them onto the weights the run adapted)."""
  check_dtype(dtype)
  check_output(out, overwrite)
  name = weight_set_name(ema)

  def load(candidate: int):
    config = weights_lib.saved_config(workdir, candidate)
    if lora_lib.spec_of(config.train) is None:
      raise ExportError(f"--format=lora: {workdir} step {candidate} trained the whole DiT "
                        "(train.lora_rank=0); it has no adapters to export (--format=diffusers exports it)")
    return config, weights_lib.restore_adapters(workdir, candidate, config, local_mesh(), [name])[name]

  step, (config, adapters) = weights_lib.readable_checkpoint(
      workdir, step, load, warn=lambda line: print(f"sora_jax.export: {line}", file=sys.stderr, flush=True))
  try:
    tensors = peft_lora.state_dict(adapters, config.model, lora_lib.spec_of(config.train).scale)
  except ValueError as error:
    raise ExportError(f"--format=lora: {error}") from None
  tensors = {key: value.astype(DTYPES[dtype]) for key, value in tensors.items()}
  specs = [safetensors_io.TensorSpec(key, value.shape, value.dtype) for key, value in tensors.items()]
  with atomic_directory(out, overwrite) as staged:
    safetensors_io.write_file(os.path.join(staged, peft_lora.WEIGHTS_FILE), specs, tensors.__getitem__,
                              metadata={"format": "pt"})
  return ExportResult(out=os.path.abspath(out), step=step, weight_set=name, files=[peft_lora.WEIGHTS_FILE],
                      num_tensors=len(specs), num_bytes=sum(s.num_bytes for s in specs))


def imported_config(source: str, fmt: str, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`base` with the model fields (and Wan's text_len) of `source`/config.json; validated."""
  _check_format(fmt)
  path = os.path.join(source, CONFIG_FILE)
  try:
    with open(path) as f:
      config_json = json.load(f)
  except FileNotFoundError:
    raise ExportError(f"--import_from={source} has no {CONFIG_FILE}") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ExportError(f"cannot read {path}: {e}") from e
  try:
    updates = pretrained.model_updates(source, fmt, config_json)
  except pretrained.PretrainedModelError as e:
    raise ExportError(str(e)) from None
  config = ml_collections.ConfigDict(base.to_dict())
  layout.apply_updates(config, updates)
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise ExportError(
        f"{path} describes a model sora_jax cannot represent with this config: {e} "
        f"(pass --config=FILE whose non-model fields fit the imported model)") from e
  return config


def import_weights(source: str, fmt: str, workdir: str, base: ml_collections.ConfigDict, *,
                   overwrite: bool = False, step: int = 0) -> ml_collections.ConfigDict:
  """Writes `source` (diffusers or Wan layout) as checkpoint `step` of a new `workdir`; returns its config.

  The checkpoint is a full train state (fresh optimizer, EMA trees = the imported weights), so
  `sora_jax.train --workdir=NEW` resumes from it and fine-tunes.
  """

  check_output(workdir, overwrite)
  try:
    experts = layout.expert_dirs(source, "--import_from")
  except layout.PretrainedError as e:
    raise ExportError(str(e)) from None
  config = imported_config(experts["high"] if experts else source, fmt, base)
  if experts:
    config.model.experts = 2
    layout.apply_updates(config, pretrained.index_fields(source))
    params = {name: _read_params(experts[name], fmt, config.model)
              for name in experts_lib.names(config.model)}
  else:
    params = _read_params(source, fmt, config.model)

  mesh = local_mesh()
  rules = sharding_lib.logical_rules(config.mesh)
  model = DiT(config.model)
  optimizer = optimizer_lib.make_optimizer(config.train, state_lib.abstract_params(model, config))
  setup = state_lib.setup_state(model, config, optimizer, mesh, rules)
  state = state_lib.state_from_params(params, config, optimizer, setup, step=step)
  with atomic_directory(workdir, overwrite) as temp:
    checkpointer = checkpoint_lib.Checkpointer(temp, config)
    checkpointer.save(step, state)
    checkpointer.close()
    atomic.write_json(os.path.join(temp, CONFIG_FILE), checkpoint_lib.config_to_json(config))
  return config


def _read_params(source: str, fmt: str, model: ml_collections.ConfigDict) -> Any:
  try:
    return pretrained.transformer_params(source, fmt, model, field=f"--import_from={source}")
  except pretrained.PretrainedModelError as e:
    raise ExportError(str(e)) from None


def config_differences(before: ml_collections.ConfigDict, after: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"group.field": (before, after)} of the model / data fields an import changed."""
  changes = {}
  for group in ("model", "data", "diffusion"):
    for key in after[group]:
      if before[group].get(key) != after[group][key]:
        changes[f"{group}.{key}"] = (before[group].get(key), after[group][key])
  return changes
