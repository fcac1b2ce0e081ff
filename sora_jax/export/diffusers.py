"""Weights and config of diffusers' `WanTransformer3DModel` <-> sora_jax DiT parameters.

Owns the key map (one table: diffusers tensor name, sora_jax parameter path, layout transform), the
config translation both ways, and `load_transformer(path)` / `save_transformer(...)` for directories
in the layout `save_pretrained` writes; `load_vae(path)` and `load_text_encoder(path)` give the JAX Wan
VAE and umT5 of a pipeline's `vae/` and `text_encoder/`. Reads safetensors with numpy only (never torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.files import atomic, safetensors_io
from sora_jax.files import layout as dir_layout
from sora_jax.model import dit
from sora_jax.model.layers import dtype_of

DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"
# The diffusers release the parity tests run against; written into config.json like save_pretrained.
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_PREFIX = dir_layout.DIFFUSERS_WEIGHTS


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one tensor is laid out on each side; both functions are pure reshapes/transposes (bit-exact).

  `to_sora(array, sora_shape)` maps a PyTorch tensor to the sora_jax parameter; `to_torch(array)` back.
  """

  name: str
  to_sora: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


def _linear(in_ndim: int) -> Layout:
  # torch Linear weight [out, in]; sora kernel [*in_shape, *out_shape] (e.g. [D, H, Dh], [H, Dh, D]).
  return Layout(
      f"linear{in_ndim}",
      lambda array, shape: array.T.reshape(shape),
      lambda kernel: kernel.reshape(math.prod(kernel.shape[:in_ndim]), -1).T)


LINEAR = _linear(1)
LINEAR_FROM_HEADS = _linear(2)
VECTOR = Layout("vector", lambda array, shape: array.reshape(shape), lambda param: param.reshape(-1))
# torch Conv3d weight [D, C, p_t, p_h, p_w]; sora patch kernel [p_t, p_h, p_w, C, D].
CONV3D = Layout("conv3d", lambda array, shape: array.transpose(2, 3, 4, 1, 0).reshape(shape),
                lambda kernel: kernel.transpose(4, 3, 0, 1, 2))
# torch modulation table [1, k, D]; sora [k, D].
TABLE = Layout("table", lambda array, shape: array.reshape(shape), lambda table: table[None])


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """One checkpoint format's names: top-level and per-block (name, sora path, layout) rows.

  A block row's name follows `block_prefix.format(index)`. Rows whose `requires` names a false
  boolean model field (qk_norm, cross_attn_norm) are absent from that model.
  """

  top: tuple[tuple[str, str, Layout], ...]
  block: tuple[tuple[str, str, Layout, str | None], ...]
  block_prefix: str = "blocks.{}."


def _dense(torch_prefix: str, sora_path: str, kernel_layout: Layout = LINEAR, requires=None):
  return ((f"{torch_prefix}.weight", f"{sora_path}/kernel", kernel_layout, requires),
          (f"{torch_prefix}.bias", f"{sora_path}/bias", VECTOR, requires))


def _attention_rows(torch_prefix: str, sora_prefix: str):
  rows = []
  for proj in ("to_q", "to_k", "to_v"):
    rows += _dense(f"{torch_prefix}.{proj}", f"{sora_prefix}/{proj}")
  rows += _dense(f"{torch_prefix}.to_out.0", f"{sora_prefix}/to_out", LINEAR_FROM_HEADS)
  rows += [(f"{torch_prefix}.norm_q.weight", f"{sora_prefix}/norm_q/scale", VECTOR, "qk_norm"),
           (f"{torch_prefix}.norm_k.weight", f"{sora_prefix}/norm_k/scale", VECTOR, "qk_norm")]
  return rows


DIFFUSERS_KEYS = KeyMap(
    top=tuple((name, path, layout) for name, path, layout, _ in (
        ("patch_embedding.weight", "patch_embedding/kernel", CONV3D, None),
        ("patch_embedding.bias", "patch_embedding/bias", VECTOR, None),
        *_dense("condition_embedder.time_embedder.linear_1", "time_embedder_1"),
        *_dense("condition_embedder.time_embedder.linear_2", "time_embedder_2"),
        *_dense("condition_embedder.time_proj", "time_proj"),
        *_dense("condition_embedder.text_embedder.linear_1", "text_embedder_1"),
        *_dense("condition_embedder.text_embedder.linear_2", "text_embedder_2"),
        *_dense("proj_out", "proj_out"),
        ("scale_shift_table", "scale_shift_table", TABLE, None),
    )),
    block=(
        *_attention_rows("attn1", "attn1"),
        *_attention_rows("attn2", "attn2"),
        ("norm2.weight", "norm2/scale", VECTOR, "cross_attn_norm"),
        ("norm2.bias", "norm2/bias", VECTOR, "cross_attn_norm"),
        *_dense("ffn.net.0.proj", "ffn/proj_in"),
        *_dense("ffn.net.2", "ffn/proj_out"),
        ("scale_shift_table", "scale_shift_table", TABLE, None),
    ),
)


def _rows(model: ml_collections.ConfigDict, keys: KeyMap = DIFFUSERS_KEYS):
  """(torch name, sora path, layout, layer index or None) for every tensor of this model."""
  rows = [(name, path, layout, None) for name, path, layout in keys.top]
  for index in range(model.num_layers):
    for name, path, layout, requires in keys.block:
      if requires is None or model[requires]:
        rows.append((keys.block_prefix.format(index) + name, path, layout, index))
  return rows


def _sora_location(model: ml_collections.ConfigDict, path: str, layer: int | None):
  """Key path into the parameter tree, and the layer to index for scanned (stacked) blocks."""
  parts = path.split("/")
  if layer is None:
    return parts, None
  if model.scan_layers:
    return ["blocks", *parts], layer
  return [f"blocks_{layer}", *parts], None


def _get(tree: Mapping, parts: list[str]):
  for part in parts:
    tree = tree[part]
  return tree


def _set(tree: dict, parts: list[str], value) -> None:
  for part in parts[:-1]:
    tree = tree.setdefault(part, {})
  tree[parts[-1]] = value


def _abstract_shapes(model: ml_collections.ConfigDict) -> dict:
  boxed = dit.abstract_params(model)
  return jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), nn.meta.unbox(boxed))


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One diffusers tensor and where it lives in the sora_jax parameter tree."""

  name: str  # diffusers tensor name, e.g. "blocks.3.attn1.to_q.weight"
  parts: tuple[str, ...]  # key path into the parameter tree
  layer: int | None  # index on the leading `layers` axis of a scanned parameter, else None
  layout: Layout
  sora_shape: tuple[int, ...]  # one layer's parameter shape (without the `layers` axis)
  torch_shape: tuple[int, ...]


def tensor_entries(model: ml_collections.ConfigDict, keys: KeyMap = DIFFUSERS_KEYS) -> list[TensorEntry]:
  """Every tensor of the model in diffusers' module order, with shapes on both sides (no memory)."""
  shapes = _abstract_shapes(model)
  entries = []
  for name, path, layout, layer in _rows(model, keys):
    parts, stack_index = _sora_location(model, path, layer)
    shape = tuple(_get(shapes, parts))
    if stack_index is not None:
      shape = shape[1:]
    torch_shape = tuple(layout.to_torch(np.empty(shape, np.int8)).shape)
    entries.append(TensorEntry(name, tuple(parts), stack_index, layout, shape, torch_shape))
  return entries


def param_at(params: Mapping, entry: TensorEntry):
  """The (one layer's) parameter array of `entry` in `params`, sliced where it lives (no host copy)."""
  try:
    array = _get(params, list(entry.parts))
  except (KeyError, TypeError) as e:
    raise ValueError(
        f"sora_jax params lack {'/'.join(entry.parts)} (for diffusers tensor {entry.name!r})") from e
  return array if entry.layer is None else array[entry.layer]


def params_from_diffusers(state_dict: Mapping[str, np.ndarray],
                          model: ml_collections.ConfigDict) -> dict:
  """sora_jax parameters (nested dict of numpy arrays, `model.param_dtype`) from a diffusers state dict.

  `model` is the config's `model` group. Every tensor must be present with the expected shape, and no
  unknown tensor may be left over.
  """
  param_dtype = np.dtype(dtype_of(model.param_dtype))
  entries = tensor_entries(model)
  unknown = sorted(set(state_dict) - {entry.name for entry in entries})
  if unknown:
    raise ValueError(
        f"diffusers state dict has tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''} that a "
        f"text-to-video WanTransformer3DModel of this config does not have (image conditioning?)")
  params: dict = {}
  stacked: dict[tuple[str, ...], list] = {}
  for entry in entries:
    if entry.name not in state_dict:
      raise ValueError(f"diffusers state dict lacks tensor {entry.name!r}")
    array = np.asarray(state_dict[entry.name])
    if tuple(array.shape) != entry.torch_shape:
      raise ValueError(
          f"diffusers tensor {entry.name!r} has shape {tuple(array.shape)}; expected {entry.torch_shape}")
    converted = np.ascontiguousarray(entry.layout.to_sora(array, entry.sora_shape)).astype(param_dtype)
    if entry.layer is None:
      _set(params, list(entry.parts), converted)
    else:
      stacked.setdefault(entry.parts, [None] * model.num_layers)[entry.layer] = converted
  for parts, layers in stacked.items():
    _set(params, list(parts), np.stack(layers))
  return params


def params_to_diffusers(params: Mapping, model: ml_collections.ConfigDict,
                        dtype: Any = None) -> dict[str, np.ndarray]:
  """diffusers state dict (numpy, PyTorch layouts) from sora_jax parameters; `dtype` casts if given."""
  params = nn.meta.unbox(params)
  state_dict = {}
  for entry in tensor_entries(model):
    array = np.asarray(jax.device_get(param_at(params, entry)))
    array = np.ascontiguousarray(entry.layout.to_torch(array))
    state_dict[entry.name] = array if dtype is None else array.astype(dtype)
  return state_dict


def check_wan_architecture(model: ml_collections.ConfigDict, target: str) -> None:
  """Raises ValueError if `model` uses a sora_jax-only option that the Wan2.1 model `target` lacks."""
  if model.abs_pos_embedding:
    raise ValueError(f"model.abs_pos_embedding=True has no equivalent in {target}, which has no absolute "
                     f"position embedding")
  if model.prediction != "velocity":
    raise ValueError(f"model.prediction={model.prediction!r} has no equivalent in {target}, whose output "
                     f"is the velocity (noise - x0) that its schedulers integrate")


def model_config_to_diffusers(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """`WanTransformer3DModel` config (the config.json fields) for a sora_jax model config."""
  if not model.qk_norm:
    raise ValueError("model.qk_norm=False has no diffusers equivalent: WanTransformer3DModel always "
                     "normalises q and k")
  check_wan_architecture(model, "diffusers' WanTransformer3DModel")
  return {
      "_class_name": DIFFUSERS_CLASS_NAME,
      "_diffusers_version": DIFFUSERS_VERSION,
      "patch_size": [int(p) for p in model.patch_size],
      "num_attention_heads": int(model.num_heads),
      "attention_head_dim": int(model.dim // model.num_heads),
      "in_channels": int(model.in_channels),
      "out_channels": int(model.out_channels),
      "text_dim": int(model.text_dim),
      "freq_dim": int(model.freq_dim),
      "ffn_dim": int(model.ffn_dim),
      "num_layers": int(model.num_layers),
      "cross_attn_norm": bool(model.cross_attn_norm),
      "qk_norm": "rms_norm_across_heads",
      "eps": float(model.eps),
      "image_dim": None,
      "added_kv_proj_dim": None,
      "rope_max_seq_len": int(model.rope_max_seq_len),
      "pos_embed_seq_len": None,
  }


# WanTransformer3DModel.__init__ defaults, for fields a config.json leaves out.
_DIFFUSERS_DEFAULTS = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}


def model_config_from_diffusers(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model` field overrides for a `WanTransformer3DModel` config dict; raises on i2v features."""
  class_name = config_json.get("_class_name", DIFFUSERS_CLASS_NAME)
  if class_name != DIFFUSERS_CLASS_NAME:
    raise ValueError(f"config _class_name={class_name!r}; expected {DIFFUSERS_CLASS_NAME!r}")
  unknown = sorted(k for k in config_json if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f"WanTransformer3DModel config fields {unknown} are not ones sora_jax can represent")
  hf = {**_DIFFUSERS_DEFAULTS, **config_json}
  for field in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
    if hf[field] is not None:
      raise ValueError(
          f"config {field}={hf[field]}: image conditioning (i2v) is not supported; expected None")
  if hf["qk_norm"] is None:
    # diffusers builds and applies norm_q/norm_k whatever this field says.
    hf["qk_norm"] = "rms_norm_across_heads"
  if hf["qk_norm"] != "rms_norm_across_heads":
    raise ValueError(f"config qk_norm={hf['qk_norm']!r}; expected 'rms_norm_across_heads'")
  if len(hf["patch_size"]) != 3:
    raise ValueError(f"config patch_size={hf['patch_size']}; expected three ints (p_t, p_h, p_w)")
  heads, head_dim = int(hf["num_attention_heads"]), int(hf["attention_head_dim"])
  return {
      "dim": heads * head_dim,
      "num_heads": heads,
      "ffn_dim": int(hf["ffn_dim"]),
      "num_layers": int(hf["num_layers"]),
      "in_channels": int(hf["in_channels"]),
      "out_channels": int(hf["out_channels"] or hf["in_channels"]),
      "patch_size": tuple(int(p) for p in hf["patch_size"]),
      "text_dim": int(hf["text_dim"]),
      "freq_dim": int(hf["freq_dim"]),
      "eps": float(hf["eps"]),
      "rope_max_seq_len": int(hf["rope_max_seq_len"]),
      "cross_attn_norm": bool(hf["cross_attn_norm"]),
      "qk_norm": True,
  }


def model_config(overrides: Mapping[str, Any] | None = None, **fields) -> ml_collections.ConfigDict:
  """The base config's `model` ConfigDict with `overrides` (and keyword fields) applied."""
  from sora_jax.configs import base  # configs/ is packaged as sora_jax.configs

  model = base.get_config().model
  for key, value in {**(overrides or {}), **fields}.items():
    if key not in model:
      raise ValueError(f"model config has no field {key!r}")
    model[key] = value
  return model


class Transformer:
  """A loaded Wan transformer: `model(latents, timesteps, text_embeds)` -> velocity (channels-last).

  Accepts numpy or jax arrays: latents `[B, T, H, W, C]`, timesteps `[B]` (or `[B, N]`) in 0..1000,
  text_embeds `[B, L, D_text]`; returns a float32 jax array `[B, T, H, W, C_out]`. Keyword arguments
  (segment_ids, positions, text_segment_ids) pass through to `DiT`.
  """

  def __init__(self, params: Mapping, model: ml_collections.ConfigDict):
    self.config = model
    self.params = jax.tree_util.tree_map(jnp.asarray, params)
    self.module = dit.DiT(model)
    self._apply = jax.jit(self.module.apply)

  def __call__(self, latents, timesteps, text_embeds, **kwargs) -> jax.Array:
    latents = jnp.asarray(latents, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    if timesteps.ndim == 0:
      timesteps = jnp.broadcast_to(timesteps, latents.shape[:1])
    text_embeds = jnp.asarray(text_embeds, jnp.float32)
    return self._apply({"params": self.params}, latents, timesteps, text_embeds, **kwargs)


def load_transformer(path: str, *, compute_dtype: str = "float32", param_dtype: str = "float32",
                     scan_layers: bool = True, attention_backend: str = "xla") -> Transformer:
  """Loads a directory written by diffusers' `WanTransformer3DModel.save_pretrained` (safetensors).

  Single-file and sharded (index json) layouts are read tensor by tensor with numpy. Compute defaults
  to float32, the precision parity is measured in.
  """
  config_path = os.path.join(path, dir_layout.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path!r} has no config.json; expected a diffusers save_pretrained directory")
  with open(config_path) as f:
    config_json = json.load(f)
  model = model_config(model_config_from_diffusers(config_json), compute_dtype=compute_dtype,
                       param_dtype=param_dtype, scan_layers=scan_layers,
                       attention_backend=attention_backend)
  reader = safetensors_io.Reader(path, prefix=WEIGHTS_PREFIX)
  params = params_from_diffusers(_LazyStateDict(reader), model)
  return Transformer(params, model)


def load_vae(path: str, *, dtype: str = "float32", tile: bool | None = None):
  """The Wan2.1 VAE of a diffusers `vae/` directory (`AutoencoderKLWan.save_pretrained`), in JAX.

  `vae.encode(video [B, F, H, W, 3] in [-1, 1])` -> normalised latents `[B, T', H/8, W/8, 16]`;
  `vae.decode(latents)` -> video. See `sora_jax.encoders.wan_vae.WanVAE`.
  """
  from sora_jax.encoders import wan_vae

  return wan_vae.load(path, dtype=dtype, tile=tile)


def load_text_encoder(path: str, *, dtype: str = "float32"):
  """umT5 of a transformers directory (`UMT5EncoderModel.save_pretrained`, sharded or not), in JAX.

  `enc(input_ids, attention_mask)` (`[B, L]` int32 each) -> last hidden state `[B, L, D]` float32.
  """
  from sora_jax.encoders import umt5

  return umt5.load(path, dtype=dtype)


def save_transformer(params: Mapping, model: ml_collections.ConfigDict, path: str, *,
                     dtype: Any = None,
                     max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes config.json and safetensors weights that `WanTransformer3DModel.from_pretrained` reads."""
  os.makedirs(path, exist_ok=True)
  state_dict = params_to_diffusers(params, model, dtype=dtype)
  atomic.write_json(os.path.join(path, dir_layout.CONFIG_FILE), model_config_to_diffusers(model))
  specs = [safetensors_io.TensorSpec(name, tuple(array.shape), array.dtype)
           for name, array in state_dict.items()]
  return safetensors_io.write_sharded(path, specs, state_dict.__getitem__, prefix=WEIGHTS_PREFIX,
                                      max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})


class _LazyStateDict(Mapping):
  """A read-on-access state dict over a safetensors Reader, so conversion holds one tensor at a time."""

  def __init__(self, reader: safetensors_io.Reader):
    self._reader = reader
    self._names = list(reader.specs())

  def __getitem__(self, name: str) -> np.ndarray:
    return self._reader.read(name)

  def __iter__(self):
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)
