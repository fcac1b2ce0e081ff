"""A pretrained Wan transformer directory in either layout, as the trainer and sampler start from it.

Owns telling the layout of a transformer directory (diffusers `WanTransformer3DModel` or the original
Wan2.1 `WanModel`) from its config.json, the model fields that config gives, applying them to a run's
config (`train.init_from`: a command-line override that contradicts them is an error), and reading
its weights as sora_jax parameters, one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from sora_jax.encoders import wan_vae_config
from sora_jax.export import diffusers as diffusers_lib
from sora_jax.export import wan
from sora_jax.files import layout, safetensors_io

WEIGHTS_PREFIX = layout.DIFFUSERS_WEIGHTS


class PretrainedModelError(ValueError):
  """A transformer directory that cannot start a run: unknown layout, mismatched weights or config."""


def source_format(directory: str, config_json: Mapping[str, Any]) -> str:
  """'diffusers' or 'wan', from config.json's class name (or, without one, its field names)."""
  class_name = config_json.get("_class_name")
  if class_name == diffusers_lib.DIFFUSERS_CLASS_NAME:
    return "diffusers"
  if class_name == wan.WAN_CLASS_NAME:
    return "wan"
  if class_name is None and "num_attention_heads" in config_json:
    return "diffusers"
  if class_name is None and "dim" in config_json:
    return "wan"
  raise PretrainedModelError(
      f"{directory}/config.json has _class_name={class_name!r}; expected "
      f"{diffusers_lib.DIFFUSERS_CLASS_NAME!r} (diffusers) or {wan.WAN_CLASS_NAME!r} (original Wan2.1)")


def model_updates(directory: str, fmt: str, config_json: Mapping[str, Any]) -> dict[str, Any]:
  """{"model.dim": 1536, ...} from a transformer config.json (Wan's also carries data.text_len)."""
  path = os.path.join(directory, layout.CONFIG_FILE)
  try:
    if fmt == "diffusers":
      return {f"model.{k}": v for k, v in diffusers_lib.model_config_from_diffusers(config_json).items()}
    return wan.model_updates_from_wan_config(dict(config_json), path)
  except ValueError as e:
    raise PretrainedModelError(f"cannot read {path} as a {fmt} transformer config: {e}") from None


def _read_transformer(directory: str) -> tuple[str, dict[str, Any]]:
  config_json = layout.read_config(directory, "transformer")
  fmt = source_format(directory, config_json)
  return fmt, model_updates(directory, fmt, config_json)


def read_source(path: str, field: str = "train.init_from") -> tuple[str, str, dict[str, Any]]:
  """(transformer directory, layout, model field updates) of a pipeline directory or its transformer/.

  A two-expert directory (Wan2.2 A14B) gives its high-noise expert's directory and `model.experts: 2`;
  its experts must have one shape.
  """
  experts = layout.expert_dirs(path, field)
  if experts is None:
    directory = layout.transformer_dir(path, field)
    return (directory, *_read_transformer(directory))
  (fmt, updates), (low_fmt, low_updates) = (_read_transformer(experts[name]) for name in ("high", "low"))
  if (fmt, updates) != (low_fmt, low_updates):
    differing = sorted(k for k in updates if updates[k] != low_updates.get(k)) or ["the layout"]
    raise PretrainedModelError(
        f"{field}={path}: its experts {experts['high']} and {experts['low']} differ in {differing[0]}; "
        f"expected two transformers of one shape")
  return experts["high"], fmt, {**updates, "model.experts": 2}


def apply_model_fields(config: ml_collections.ConfigDict, path: str,
                       overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` whose model shape fields are those of the transformer at `path`.

  `overrides` are the command-line `--config.*` values: one that sets a model field to something
  other than the checkpoint's value cannot be honoured, and is reported by name. Wan's text_len is
  not taken: the dataset's text length is the run's choice (shorter captions are zero-padded). A
  two-expert pipeline also gives its boundary_ratio.
  """
  directory, _, updates = read_source(path)
  overrides = overrides or {}
  updated = ml_collections.ConfigDict(config.to_dict())
  for field, value in updates.items():
    group, key = field.split(".")
    if group != "model":
      continue
    if field in overrides and _normalised(overrides[field]) != _normalised(value):
      raise PretrainedModelError(
          f"--config.{field}={overrides[field]} conflicts with train.init_from={path}: its "
          f"{directory}/config.json sets {field}={value}; drop the override or start from other weights")
    updated[group][key] = value
  if updates.get("model.experts") == 2:
    # A two-expert pipeline's boundary, unless the command line sets one (the config file's yields).
    for field, value in index_fields(path).items():
      if field not in overrides:
        layout.apply_updates(updated, {field: value})
  return updated


def _normalised(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


class RenamedStateDict(Mapping):
  """diffusers-named, read-on-access view of a safetensors directory in either layout."""

  def __init__(self, reader: safetensors_io.Reader, fmt: str):
    self._reader = reader
    names = list(reader.specs())
    if fmt == "wan":
      try:
        self._names = {wan.wan_to_diffusers_key(name): name for name in names}
      except KeyError as e:
        raise PretrainedModelError(f"{reader.directory}: {e.args[0]}") from None
    else:
      self._names = {name: name for name in names}

  def __getitem__(self, name: str) -> np.ndarray:
    return self._reader.read(self._names[name])

  def __iter__(self):
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


def load_params(path: str, model: ml_collections.ConfigDict, field: str = "train.init_from") -> dict:
  """The DiT parameters (numpy, fp32 as stored) of the transformer at `path` for the `model` group.

  `model` must already carry the checkpoint's shape fields (`apply_model_fields`). With
  model.experts = 2 the result is {"high": tree, "low": tree}: a two-expert directory's experts, or
  both started from one transformer (as Wan2.2's experts grew from one Wan2.1 model).
  """
  directory, fmt, updates = read_source(path, field)
  for name, value in updates.items():
    group, key = name.split(".")
    if group == "model" and _normalised(model[key]) != _normalised(value):
      raise PretrainedModelError(
          f"{field}={path}: {directory}/config.json has {name}={value}, the run's config {model[key]}")
  experts = layout.expert_dirs(path, field)
  if experts is not None:
    return {name: transformer_params(experts[name], fmt, model) for name in ("high", "low")}
  params = transformer_params(directory, fmt, model)
  if int(model.experts) == 2:
    return {"high": params, "low": params}  # placed on device as two trees: no host copy needed
  return params


def transformer_params(directory: str, fmt: str, model: ml_collections.ConfigDict,
                       field: str | None = None) -> dict:
  """One transformer directory's DiT parameters (numpy) for the `model` group, in the diffusers or Wan
  (`fmt`) layout; one PretrainedModelError naming `field` (default: the directory) or the mismatch."""
  field = field or directory
  try:
    reader = safetensors_io.Reader(directory, prefix=WEIGHTS_PREFIX)
  except safetensors_io.SafetensorsError as e:
    raise PretrainedModelError(f"{field}: {e}") from None
  try:
    return diffusers_lib.params_from_diffusers(RenamedStateDict(reader, fmt), model)
  except (ValueError, KeyError) as e:
    raise PretrainedModelError(
        f"weights in {directory} do not match its {layout.CONFIG_FILE} ({fmt} layout): {e}") from None


def sampling_fields(directory: str) -> dict[str, Any]:
  """{"diffusion.sampler": ..., "diffusion.sample_shift": ...} from a pipeline's scheduler config, if it
  names a scheduler sora_jax samples with; {} otherwise (the base config's defaults then apply)."""
  path = os.path.join(directory, layout.SCHEDULER_DIR, layout.SCHEDULER_CONFIG_FILE)
  if not os.path.isfile(path):
    return {}
  scheduler = layout.read_json(path, "scheduler")
  name = scheduler.get("_class_name")
  if name == "FlowMatchEulerDiscreteScheduler" and "shift" in scheduler:
    return {"diffusion.sampler": "euler", "diffusion.sample_shift": float(scheduler["shift"])}
  if name == "UniPCMultistepScheduler" and scheduler.get("use_flow_sigmas") and "flow_shift" in scheduler:
    return {"diffusion.sampler": "unipc", "diffusion.sample_shift": float(scheduler["flow_shift"])}
  return {}


# Wan2.2 TI2V-5B's published sampling settings (what configs/wan2_2_ti2v_5b.py also uses).
WAN22_SAMPLING = {"diffusion.sample_shift": 5.0, "eval.num_frames": 121, "eval.height": 704,
                  "eval.width": 1280, "data.fps": 24}


# Wan2.2 A14B's published sampling: 40 UniPC steps at shift 12, guidance 4 (high noise) and 3 (low).
WAN22_A14B_SAMPLING = {"diffusion.sample_shift": 12.0, "diffusion.sample_steps": 40,
                       "diffusion.guidance_scale": 4.0, "diffusion.guidance_scale_2": 3.0,
                       "eval.num_frames": 81, "eval.height": 720, "eval.width": 1280, "data.fps": 16}


def index_fields(root: str) -> dict[str, Any]:
  """{"diffusion.boundary_ratio": ...} from a pipeline's model_index.json when it sets one (Wan2.2 A14B)."""
  path = os.path.join(root, layout.MODEL_INDEX_FILE)
  if not os.path.isfile(path):
    return {}
  ratio = layout.read_json(path, "pipeline index").get("boundary_ratio")
  return {} if ratio is None else {"diffusion.boundary_ratio": float(ratio)}


def vae_fields(root: str) -> dict[str, Any]:
  """{"data.vae_spatial_factor": ..., "data.vae_temporal_factor": ...} of a pipeline's `vae/` (8 and 4 for
  Wan2.1's VAE, 16 and 4 for Wan2.2's); {} when it has none."""
  path = os.path.join(root, layout.VAE_DIR, layout.CONFIG_FILE)
  if not os.path.isfile(path):
    return {}
  vae = wan_vae_config.WanVAEConfig.from_json(path)
  return {"data.vae_spatial_factor": vae.spatial_factor, "data.vae_temporal_factor": vae.temporal_factor}


def pipeline_config(path: str, field: str = "--pretrained") -> ml_collections.ConfigDict:
  """A config that samples the pipeline directory `path` as it is: its transformer, Wan VAE and umT5.

  Sampling defaults are those of the model's family: Wan2.1's (UniPC, 50 steps, shift 3, guidance 5,
  33 x 480 x 832 at 16 fps), on the Wan2.2 VAE TI2V-5B's (shift 5, 121 x 704 x 1280 at 24 fps), with two
  experts A14B's (`WAN22_A14B_SAMPLING`, the boundary from model_index.json); a scheduler config the
  pipeline carries sets the sampler and shift (`sampling_fields`). The one bucket
  is the sample size: sampling reads no dataset.
  """
  from sora_jax import config as config_lib
  from sora_jax.configs import base

  config = base.get_config()
  config.data.pretrained = path
  config.data.vae = "wan"
  config.data.text_encoder = "umt5"
  config.model.compute_dtype = "float32"
  directory, _, updates = read_source(path, field)
  layout.apply_updates(config, updates)
  vae = vae_fields(path)
  layout.apply_updates(config, vae)
  if vae.get("data.vae_spatial_factor") == 16:
    layout.apply_updates(config, WAN22_SAMPLING)
  if updates.get("model.experts") == 2:
    layout.apply_updates(config, WAN22_A14B_SAMPLING)
  layout.apply_updates(config, index_fields(path))
  layout.apply_updates(config, sampling_fields(path))
  e = config.eval
  config.data.buckets = ((int(e.num_frames), int(e.height), int(e.width)),)
  config.data.image_buckets = ((1, int(e.height), int(e.width)),)
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise PretrainedModelError(
        f"{field}={path}: {directory} describes a model sora_jax cannot sample: {e}") from None
  return config
