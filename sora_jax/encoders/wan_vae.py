"""The Wan2.1 causal 3D video VAE (diffusers' `AutoencoderKLWan`) in JAX: pixels <-> normalised latents.

Owns the architecture read from a diffusers `config.json`, the conversion of its torch weights, the chunked
causal time loop (each causal conv takes and returns its cache of past frames) and spatial tiling.

Layout: channels last throughout, video [B, F, H, W, 3] in [-1, 1], latents [B, T', H/8, W/8, z_dim] with
T' = 1 + (F - 1) / 4. Time runs as diffusers runs it: the first frame alone, then chunks of 4 frames (encode)
or one latent frame at a time (decode), each chunk one call of a jitted function, so the compiled programs
are 2 per direction (per tile shape and batch size) whatever the clip length, and peak device memory is one
tile x one chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sora_jax.files import layout, safetensors_io

WEIGHTS_PREFIX = layout.DIFFUSERS_WEIGHTS
FRAME_POLICIES = ("crop", "pad", "error")
# diffusers' tile defaults (pixels): a frame larger than a tile is cut into tiles this far apart.
DEFAULT_TILE_SAMPLE_SIZE = 256
DEFAULT_TILE_SAMPLE_STRIDE = 192
# Frames per steady-state encoder chunk; the Wan2.1 VAE compresses time by exactly this factor.
_CHUNK_FRAMES = 4


class WanVAEError(ValueError):
  """A Wan VAE config or checkpoint that cannot be loaded, or video / latents of the wrong shape."""


# ------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """The architecture fields of a diffusers `AutoencoderKLWan` config.json (Wan2.1 variant only)."""

  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
  latents_mean: tuple[float, ...] = ()
  latents_std: tuple[float, ...] = ()
  scale_factor_temporal: int = 4
  scale_factor_spatial: int = 8

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(d) for d in self.temperal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> WanVAEConfig:
    """Reads a diffusers config dict; refuses the Wan2.2 VAE and inconsistent fields with a WanVAEError."""
    class_name = raw.get("_class_name", "AutoencoderKLWan")
    if class_name != "AutoencoderKLWan":
      raise WanVAEError(f"{source}: _class_name={class_name!r}; expected 'AutoencoderKLWan'")
    wan22 = {"is_residual": (raw.get("is_residual", False), False),
             "patch_size": (raw.get("patch_size"), None),
             "in_channels": (raw.get("in_channels", 3), 3),
             "out_channels": (raw.get("out_channels", 3), 3)}
    for field, (value, wan21) in wan22.items():
      if value != wan21:
        raise WanVAEError(
            f"{source}: {field}={value!r} is the Wan2.2 VAE; only the Wan2.1 VAE is supported "
            f"(expected {field}={wan21!r})")
    defaults = cls()
    try:
      config = cls(
          base_dim=int(raw.get("base_dim", defaults.base_dim)),
          decoder_base_dim=None if raw.get("decoder_base_dim") is None else int(raw["decoder_base_dim"]),
          z_dim=int(raw.get("z_dim", defaults.z_dim)),
          dim_mult=tuple(int(m) for m in raw.get("dim_mult", defaults.dim_mult)),
          num_res_blocks=int(raw.get("num_res_blocks", defaults.num_res_blocks)),
          attn_scales=tuple(float(s) for s in raw.get("attn_scales", defaults.attn_scales)),
          temperal_downsample=tuple(bool(d) for d in raw.get("temperal_downsample",
                                                              defaults.temperal_downsample)),
          latents_mean=tuple(float(m) for m in raw.get("latents_mean") or _WAN21_LATENTS_MEAN),
          latents_std=tuple(float(s) for s in raw.get("latents_std") or _WAN21_LATENTS_STD),
          scale_factor_temporal=int(raw.get("scale_factor_temporal") or 4),
          scale_factor_spatial=int(raw.get("scale_factor_spatial") or 8),
      )
    except (TypeError, ValueError) as e:
      raise WanVAEError(f"{source}: malformed AutoencoderKLWan field: {e}") from e
    config.validate(source)
    return config

  @classmethod
  def from_json(cls, path: str) -> WanVAEConfig:
    raw = layout.read_json(path, "diffusers AutoencoderKLWan", WanVAEError)
    return cls.from_dict(raw, source=path)

  def validate(self, source: str = "config") -> None:
    if self.attn_scales:
      # diffusers' encoder passes feat_cache to its down-block WanAttentionBlock and fails, and its decoder
      # has none: no reference to match, and no Wan2.1 checkpoint uses them.
      raise WanVAEError(
          f"{source}: attn_scales={list(self.attn_scales)}; the Wan2.1 VAE (and diffusers' runnable "
          f"AutoencoderKLWan) has attention only in its mid blocks, expected attn_scales=[]")
    if len(self.dim_mult) < 2 or self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
      raise WanVAEError(
          f"{source}: base_dim={self.base_dim}, z_dim={self.z_dim}, dim_mult={list(self.dim_mult)}, "
          f"num_res_blocks={self.num_res_blocks}; expected positive sizes and at least two levels")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise WanVAEError(
          f"{source}: temperal_downsample={list(self.temperal_downsample)} has "
          f"{len(self.temperal_downsample)} entries; expected len(dim_mult) - 1 = {len(self.dim_mult) - 1}")
    if self.temporal_factor != _CHUNK_FRAMES or self.scale_factor_temporal != _CHUNK_FRAMES:
      raise WanVAEError(
          f"{source}: temperal_downsample={list(self.temperal_downsample)} and scale_factor_temporal="
          f"{self.scale_factor_temporal} compress time by {self.temporal_factor}; the Wan2.1 VAE's chunked "
          f"time loop expects exactly {_CHUNK_FRAMES} (two True entries)")
    if self.scale_factor_spatial != self.spatial_factor:
      raise WanVAEError(
          f"{source}: scale_factor_spatial={self.scale_factor_spatial} but dim_mult={list(self.dim_mult)} "
          f"downsamples by {self.spatial_factor}")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise WanVAEError(
          f"{source}: latents_mean / latents_std have {len(self.latents_mean)} / {len(self.latents_std)} "
          f"entries; expected z_dim={self.z_dim} each")
    if min(self.latents_std) <= 0:
      raise WanVAEError(f"{source}: latents_std={list(self.latents_std)}; expected positive values")


# diffusers' defaults, which Wan2.1 checkpoints also write into their config.json.
_WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ------------------------------------------------------------------------------------- architecture
# The network as a static list of layers, each named by its torch module path, so the weight table, the
# forward functions and the cache dict all key on the same names.


@dataclasses.dataclass(frozen=True)
class _Residual:
  name: str
  in_dim: int
  out_dim: int


@dataclasses.dataclass(frozen=True)
class _Attention:
  name: str
  dim: int


@dataclasses.dataclass(frozen=True)
class _Resample:
  name: str
  dim: int
  mode: str  # downsample2d | downsample3d | upsample2d | upsample3d
  out_dim: int


_Layer = _Residual | _Attention | _Resample


@dataclasses.dataclass(frozen=True)
class _Arch:
  z_dim: int
  encoder_in_dim: int  # channels after encoder.conv_in
  encoder_layers: tuple[_Layer, ...]
  encoder_out_dim: int
  decoder_in_dim: int  # channels after decoder.conv_in
  decoder_layers: tuple[_Layer, ...]
  decoder_out_dim: int


def _mid_block(prefix: str, dim: int) -> tuple[_Layer, ...]:
  return (_Residual(f"{prefix}.mid_block.resnets.0", dim, dim),
          _Attention(f"{prefix}.mid_block.attentions.0", dim),
          _Residual(f"{prefix}.mid_block.resnets.1", dim, dim))


def _architecture(config: WanVAEConfig) -> _Arch:
  """Mirrors WanEncoder3d / WanDecoder3d construction (is_residual=False, attn_scales=[]) layer for layer."""
  dims = [config.base_dim * m for m in (1, *config.dim_mult)]
  last = len(config.dim_mult) - 1
  encoder: list[_Layer] = []
  for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
    for _ in range(config.num_res_blocks):
      encoder.append(_Residual(f"encoder.down_blocks.{len(encoder)}", in_dim, out_dim))
      in_dim = out_dim
    if level != last:
      mode = "downsample3d" if config.temperal_downsample[level] else "downsample2d"
      encoder.append(_Resample(f"encoder.down_blocks.{len(encoder)}", out_dim, mode, out_dim))
  encoder.extend(_mid_block("encoder", dims[-1]))

  decoder_dim = config.decoder_base_dim or config.base_dim
  up_dims = [decoder_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
  temperal_upsample = config.temperal_downsample[::-1]
  decoder: list[_Layer] = list(_mid_block("decoder", up_dims[0]))
  for level, (in_dim, out_dim) in enumerate(zip(up_dims[:-1], up_dims[1:], strict=True)):
    if level > 0:
      in_dim //= 2  # every Wan2.1 upsampler halves the channels
    for j in range(config.num_res_blocks + 1):
      decoder.append(_Residual(f"decoder.up_blocks.{level}.resnets.{j}", in_dim, out_dim))
      in_dim = out_dim
    if level != last:
      mode = "upsample3d" if temperal_upsample[level] else "upsample2d"
      decoder.append(_Resample(f"decoder.up_blocks.{level}.upsamplers.0", out_dim, mode, out_dim // 2))
  return _Arch(config.z_dim, dims[0], tuple(encoder), dims[-1], up_dims[0], tuple(decoder), up_dims[-1])


# ----------------------------------------------------------------------------------- weight layouts
# Torch layout -> channels-last layout, one converter per kind of tensor.


def _conv3d(w: np.ndarray) -> np.ndarray:  # [O, I, t, h, w] -> [t, h, w, I, O]
  return w.transpose(2, 3, 4, 1, 0)


def _conv2d(w: np.ndarray) -> np.ndarray:  # [O, I, h, w] -> [h, w, I, O]
  return w.transpose(2, 3, 1, 0)


def _pointwise(w: np.ndarray) -> np.ndarray:  # [O, I, 1, ...] -> [I, O]
  return w.reshape(w.shape[0], w.shape[1]).T


def _time_conv(w: np.ndarray) -> np.ndarray:  # [O, I, 3, 1, 1] -> [3, I, O]
  return w[:, :, :, 0, 0].transpose(2, 1, 0)


def _gamma(w: np.ndarray) -> np.ndarray:  # [C, 1, ...] -> [C], with WanRMS_norm's sqrt(C) folded in
  return w.reshape(-1) * np.float32(math.sqrt(w.shape[0]))


def _identity(w: np.ndarray) -> np.ndarray:
  return w


_CONVERTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv3d": _conv3d, "conv2d": _conv2d, "pointwise": _pointwise, "time_conv": _time_conv,
    "gamma": _gamma, "bias": _identity,
}
# Converted tensors kept in float32 whatever the compute dtype: norms run in float32.
_FLOAT32_KINDS = ("gamma",)


def _conv(name: str, shape: tuple[int, ...], kind: str) -> list[tuple[str, tuple[int, ...], str]]:
  return [(f"{name}.weight", shape, kind), (f"{name}.bias", (shape[0],), "bias")]


def _layer_tensors(layer: _Layer) -> list[tuple[str, tuple[int, ...], str]]:
  n = layer.name
  if isinstance(layer, _Residual):
    i, o = layer.in_dim, layer.out_dim
    tensors = [(f"{n}.norm1.gamma", (i, 1, 1, 1), "gamma"), *_conv(f"{n}.conv1", (o, i, 3, 3, 3), "conv3d"),
               (f"{n}.norm2.gamma", (o, 1, 1, 1), "gamma"), *_conv(f"{n}.conv2", (o, o, 3, 3, 3), "conv3d")]
    if i != o:
      tensors += _conv(f"{n}.conv_shortcut", (o, i, 1, 1, 1), "pointwise")
    return tensors
  if isinstance(layer, _Attention):
    d = layer.dim
    return [(f"{n}.norm.gamma", (d, 1, 1), "gamma"), *_conv(f"{n}.to_qkv", (3 * d, d, 1, 1), "pointwise"),
            *_conv(f"{n}.proj", (d, d, 1, 1), "pointwise")]
  d, o = layer.dim, layer.out_dim
  tensors = _conv(f"{n}.resample.1", (o, d, 3, 3), "conv2d")
  if layer.mode == "downsample3d":
    tensors += _conv(f"{n}.time_conv", (d, d, 3, 1, 1), "time_conv")
  elif layer.mode == "upsample3d":
    tensors += _conv(f"{n}.time_conv", (2 * d, d, 3, 1, 1), "time_conv")
  return tensors


def tensor_table(config: WanVAEConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """Every tensor of the diffusers checkpoint: torch name -> (torch shape, layout kind)."""
  arch = _architecture(config)
  z, e_out, d_out = config.z_dim, arch.encoder_out_dim, arch.decoder_out_dim
  table = _conv("encoder.conv_in", (arch.encoder_in_dim, 3, 3, 3, 3), "conv3d")
  for layer in arch.encoder_layers:
    table += _layer_tensors(layer)
  table += [("encoder.norm_out.gamma", (e_out, 1, 1, 1), "gamma"),
            *_conv("encoder.conv_out", (2 * z, e_out, 3, 3, 3), "conv3d"),
            *_conv("quant_conv", (2 * z, 2 * z, 1, 1, 1), "pointwise"),
            *_conv("post_quant_conv", (z, z, 1, 1, 1), "pointwise"),
            *_conv("decoder.conv_in", (arch.decoder_in_dim, z, 3, 3, 3), "conv3d")]
  for layer in arch.decoder_layers:
    table += _layer_tensors(layer)
  table += [("decoder.norm_out.gamma", (d_out, 1, 1, 1), "gamma"),
            *_conv("decoder.conv_out", (3, d_out, 3, 3, 3), "conv3d")]
  return {name: (shape, kind) for name, shape, kind in table}


def convert_weights(config: WanVAEConfig, read: Callable[[str], np.ndarray], available: set[str], *,
                    source: str, dtype: str = "float32") -> dict[str, np.ndarray]:
  """Torch tensors (by name, through `read`) -> the channels-last params dict the forward functions use.

  Every tensor of `tensor_table(config)` must be in `available` with its torch shape; the check covers all
  of them before any is read, so a wrong checkpoint fails in one message naming `source`.
  """
  compute_dtype = _compute_dtype(dtype)
  table = tensor_table(config)
  missing = [f"{name} {list(shape)}" for name, (shape, _) in table.items() if name not in available]
  if missing:
    raise WanVAEError(
        f"{source} lacks {len(missing)} tensor(s) of the Wan2.1 VAE this config.json describes, e.g. "
        f"{', '.join(missing[:4])} (name and expected torch shape)")
  unused = sorted(available - set(table))
  if unused:
    raise WanVAEError(
        f"{source} holds {len(unused)} tensor(s) the Wan2.1 VAE of its config.json does not have, e.g. "
        f"{', '.join(unused[:4])}; is the checkpoint from another architecture?")
  params = {}
  for name, (shape, kind) in table.items():
    tensor = read(name)
    if tuple(tensor.shape) != shape:
      raise WanVAEError(
          f"{source}: tensor {name!r} has shape {list(tensor.shape)}; expected {list(shape)} for the "
          f"architecture of its config.json")
    converted = _CONVERTERS[kind](np.asarray(tensor, np.float32))
    params[name] = np.ascontiguousarray(converted, np.float32 if kind in _FLOAT32_KINDS else compute_dtype)
  # Only the posterior mean is ever used: keep the quant conv's first z_dim outputs.
  params["quant_conv.weight"] = np.ascontiguousarray(params["quant_conv.weight"][:, :config.z_dim])
  params["quant_conv.bias"] = np.ascontiguousarray(params["quant_conv.bias"][:config.z_dim])
  return params


def _compute_dtype(dtype: str) -> np.dtype:
  if dtype == "float32":
    return np.dtype(np.float32)
  if dtype == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  raise WanVAEError(f"Wan VAE dtype={dtype!r}; expected 'float32' or 'bfloat16'")


# ------------------------------------------------------------------------------------------ layers
# Pure functions of (params, activations [B, T, H, W, C], caches). A causal conv's cache holds the two
# input frames before the chunk (zeros before the first frame, which is diffusers' causal zero padding).


class _Caches:
  """Cache dict threaded through one chunk at trace time: reads the previous chunk's, collects the next's."""

  def __init__(self, previous: dict[str, jax.Array] | None):
    self.previous = previous
    self.next: dict[str, jax.Array] = {}

  @property
  def first(self) -> bool:
    return self.previous is None


def _conv2d_nhwc(x: jax.Array, kernel: jax.Array, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=jnp.float32)


def _frames_2d(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Applies a per-frame [N, H, W, C] function to [B, T, H, W, C] with the frames folded into the batch."""
  b, t = x.shape[:2]
  y = fn(x.reshape(b * t, *x.shape[2:]))
  return y.reshape(b, t, *y.shape[1:])


# Winograd F(m, 3) along time (Lavin & Gray 2016), by output frames m: (B^T, G, A^T) with
# out = A^T [(G kernel) * (B^T frames)], i.e. m + 2 2D convs for m output frames instead of 3m.
_TIME_WINOGRAD = {
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
}


def _combine(coefficients: tuple[float, ...], terms: list[jax.Array]) -> jax.Array:
  out = None
  for c, term in zip(coefficients, terms, strict=True):
    if c:
      scaled = term if c == 1 else term * c
      out = scaled if out is None else out + scaled
  return out


def _conv_method(in_channels: int, out_frames: int, dtype: Any) -> str:
  """How `_conv3x3x3` computes: measured on XLA CPU, whose 2D convs are twice as fast as its 3D ones."""
  if jax.default_backend() != "cpu":
    return "direct"  # cuDNN / the TPU convolution units handle 3D convs natively
  if in_channels <= 16:
    return "stacked"
  if out_frames in _TIME_WINOGRAD and jnp.dtype(dtype) == jnp.float32:
    return "winograd"  # half the multiply-adds at 4 frames, for ~3e-6 relative rounding per conv
  return "taps"


def _conv3x3x3(frames: jax.Array, kernel: jax.Array, method: str | None = None) -> jax.Array:
  """Valid-in-time, same-in-space 3x3x3 conv: frames [B, T + 2, H, W, I] -> [B, T, H, W, O] float32.

  method: "direct" (one 3D conv), "stacked" (the three time taps stacked into the channels, one 2D conv:
  for few input channels), "taps" (one 2D conv per time tap, frames in the batch), "winograd" (T + 2 2D
  convs of time-transformed frames); None picks by backend, channels and frames.
  """
  b, t2, h, w, i = frames.shape
  t = t2 - 2
  method = method or _conv_method(i, t, frames.dtype)
  if method == "direct":
    return jax.lax.conv_general_dilated(frames, kernel, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                        dimension_numbers=("NTHWC", "THWIO", "NTHWC"),
                                        preferred_element_type=jnp.float32)
  if method == "stacked":
    stacked = jnp.concatenate([frames[:, k:k + t] for k in range(3)], axis=-1)
    folded = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * i, kernel.shape[-1])
    return _frames_2d(lambda x: _conv2d_nhwc(x, folded), stacked)
  if method == "winograd":
    frames_t, kernel_t, output_t = _TIME_WINOGRAD[t]
    inputs = [frames[:, j].astype(jnp.float32) for j in range(t2)]
    taps = [kernel[k].astype(jnp.float32) for k in range(3)]
    products = [_conv2d_nhwc(_combine(frames_t[m], inputs), _combine(kernel_t[m], taps))
                for m in range(len(frames_t))]
    return jnp.stack([_combine(output_t[j], products) for j in range(t)], axis=1)
  out = None
  for k in range(3):
    tap = _frames_2d(lambda x, k=k: _conv2d_nhwc(x, kernel[k]), frames[:, k:k + t])
    out = tap if out is None else out + tap
  return out


def _causal_conv(params: dict, name: str, x: jax.Array, caches: _Caches) -> jax.Array:
  """WanCausalConv3d (3x3x3, padding 1 in space, 2 frames into the past) with its cache of 2 frames."""
  kernel, bias = params[f"{name}.weight"], params[f"{name}.bias"]
  if caches.first and x.shape[1] == 1:
    # The two frames before a clip are zeros: only the last time tap sees data.
    out = _frames_2d(lambda f: _conv2d_nhwc(f, kernel[2]), x)
    caches.next[name] = jnp.concatenate([jnp.zeros_like(x), x], axis=1)
  else:
    past = jnp.zeros_like(x[:, :1]).repeat(2, axis=1) if caches.first else caches.previous[name]
    frames = jnp.concatenate([past, x], axis=1)
    out = _conv3x3x3(frames, kernel)
    caches.next[name] = frames[:, -2:]
  return (out + bias).astype(x.dtype)


def _pointwise_conv(params: dict, name: str, x: jax.Array) -> jax.Array:
  out = jnp.dot(x, params[f"{name}.weight"], preferred_element_type=jnp.float32) + params[f"{name}.bias"]
  return out.astype(x.dtype)


def _rms_norm(x: jax.Array, gamma: jax.Array) -> jax.Array:
  """WanRMS_norm: F.normalize over channels (eps 1e-12) times sqrt(C) * gamma (pre-multiplied), in float32."""
  x32 = x.astype(jnp.float32)
  sum_sq = jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
  return (x32 * jax.lax.rsqrt(jnp.maximum(sum_sq, 1e-24)) * gamma).astype(x.dtype)


def _residual(params: dict, layer: _Residual, x: jax.Array, caches: _Caches) -> jax.Array:
  n = layer.name
  shortcut = _pointwise_conv(params, f"{n}.conv_shortcut", x) if layer.in_dim != layer.out_dim else x
  h = jax.nn.silu(_rms_norm(x, params[f"{n}.norm1.gamma"]))
  h = _causal_conv(params, f"{n}.conv1", h, caches)
  h = jax.nn.silu(_rms_norm(h, params[f"{n}.norm2.gamma"]))
  h = _causal_conv(params, f"{n}.conv2", h, caches)
  return h + shortcut


def _attention(params: dict, layer: _Attention, x: jax.Array) -> jax.Array:
  """WanAttentionBlock: single-head self-attention over the pixels of each frame separately."""
  n = layer.name
  b, t, h, w, c = x.shape
  normed = _rms_norm(x, params[f"{n}.norm.gamma"]).reshape(b * t, h * w, c)
  qkv = jnp.dot(normed, params[f"{n}.to_qkv.weight"], preferred_element_type=jnp.float32)
  qkv = qkv + params[f"{n}.to_qkv.bias"]
  query, key, value = jnp.split(qkv, 3, axis=-1)
  scores = jnp.einsum("nqc,nkc->nqk", query, key) * (1.0 / math.sqrt(c))
  attended = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(scores, axis=-1), value)
  out = jnp.dot(attended.astype(x.dtype), params[f"{n}.proj.weight"], preferred_element_type=jnp.float32)
  out = out + params[f"{n}.proj.bias"]
  return x + out.reshape(b, t, h, w, c).astype(x.dtype)


def _time_taps(frames: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
  """A (3, 1, 1) time conv, valid padding: the three taps stacked into channels, one matmul."""
  t_out = (frames.shape[1] - 3) // stride + 1
  taps = [frames[:, k:k + stride * (t_out - 1) + 1:stride] for k in range(3)]
  stacked = jnp.concatenate(taps, axis=-1)
  folded = kernel.reshape(3 * kernel.shape[1], kernel.shape[2])
  return jnp.dot(stacked, folded, preferred_element_type=jnp.float32) + bias


def _upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Nearest 2x upsampling then a 3x3 conv (padding 1), as 4 output phases of 2x2 convs at input size.

  Output pixel (2i + a, 2j + b) of the conv over the upsampled image only sees input rows {i - 1, i}
  (a = 0) or {i, i + 1} (a = 1), with the 3 kernel rows merged into 2 (same for columns): 4/9 of the
  multiply-adds of convolving the upsampled image.
  """
  n, h, w, _ = x.shape
  rows = {0: (kernel[0], kernel[1] + kernel[2]), 1: (kernel[0] + kernel[1], kernel[2])}
  pads = {0: (1, 0), 1: (0, 1)}
  phases = []
  for a in (0, 1):
    row_kernel = jnp.stack(rows[a], axis=0)  # [2, 3, I, O]
    cols = {0: (row_kernel[:, 0], row_kernel[:, 1] + row_kernel[:, 2]),
            1: (row_kernel[:, 0] + row_kernel[:, 1], row_kernel[:, 2])}
    for b in (0, 1):
      phase_kernel = jnp.stack(cols[b], axis=1)  # [2, 2, I, O]
      phases.append(_conv2d_nhwc(x, phase_kernel, padding=(pads[a], pads[b])))
  out = jnp.stack(phases, axis=0).reshape(2, 2, n, h, w, -1)
  return out.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * h, 2 * w, -1)


def _resample(params: dict, layer: _Resample, x: jax.Array, caches: _Caches) -> jax.Array:
  """WanResample, including its time conv and diffusers' first-chunk behaviour (see the branches)."""
  n = layer.name
  kernel, bias = params[f"{n}.resample.1.weight"], params[f"{n}.resample.1.bias"]
  if layer.mode == "upsample3d":
    if caches.first:
      # diffusers marks the cache "Rep" and skips the time conv: the first latent frame stays one frame.
      caches.next[n] = jnp.zeros_like(x[:, :1]).repeat(2, axis=1)
    else:
      # After "Rep" the previous frames are zeros, the causal padding diffusers applies in that case.
      frames = jnp.concatenate([caches.previous[n], x], axis=1)
      caches.next[n] = frames[:, -2:]
      doubled = _time_taps(frames, params[f"{n}.time_conv.weight"], params[f"{n}.time_conv.bias"], 1)
      b, t, h, w, c = x.shape
      # Channels [0, C) become frame 2t and [C, 2C) frame 2t + 1.
      x = doubled.astype(x.dtype).reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)
      x = x.reshape(b, 2 * t, h, w, c)
  if layer.mode.startswith("upsample"):
    out = _frames_2d(lambda f: _upsample_conv(f, kernel), x)
  else:
    out = _frames_2d(lambda f: _conv2d_nhwc(f, kernel, stride=2, padding=((0, 1), (0, 1))), x)
  out = (out + bias).astype(x.dtype)
  if layer.mode == "downsample3d":
    # diffusers skips the time conv on the first chunk (one frame) and keeps the last frame for the next.
    previous = None if caches.first else caches.previous[n]
    caches.next[n] = out[:, -1:]
    if previous is not None:
      frames = jnp.concatenate([previous, out], axis=1)
      out = _time_taps(frames, params[f"{n}.time_conv.weight"], params[f"{n}.time_conv.bias"], 2)
      out = out.astype(x.dtype)
  return out


def _apply_layers(params: dict, layers: tuple[_Layer, ...], x: jax.Array, caches: _Caches) -> jax.Array:
  for layer in layers:
    if isinstance(layer, _Residual):
      x = _residual(params, layer, x, caches)
    elif isinstance(layer, _Attention):
      x = _attention(params, layer, x)
    else:
      x = _resample(params, layer, x, caches)
  return x


def _encode_chunk(params: dict, video: jax.Array, previous: dict | None, *, arch: _Arch,
                  dtype: np.dtype) -> tuple[jax.Array, dict]:
  """video [B, 1 or 4, H, W, 3] -> posterior mean [B, 1, H/8, W/8, z] float32, next caches."""
  caches = _Caches(previous)
  x = _causal_conv(params, "encoder.conv_in", video.astype(dtype), caches)
  x = _apply_layers(params, arch.encoder_layers, x, caches)
  x = jax.nn.silu(_rms_norm(x, params["encoder.norm_out.gamma"]))
  x = _causal_conv(params, "encoder.conv_out", x, caches)
  mean = jnp.dot(x, params["quant_conv.weight"], preferred_element_type=jnp.float32)
  return (mean + params["quant_conv.bias"]).astype(jnp.float32), caches.next


def _decode_chunk(params: dict, latents: jax.Array, previous: dict | None, *, arch: _Arch,
                  dtype: np.dtype) -> tuple[jax.Array, dict]:
  """raw latents [B, 1, h, w, z] -> pixels [B, 1 (first chunk) or 4, 8h, 8w, 3] float32, unclipped."""
  caches = _Caches(previous)
  x = _pointwise_conv(params, "post_quant_conv", latents.astype(dtype))
  x = _causal_conv(params, "decoder.conv_in", x, caches)
  x = _apply_layers(params, arch.decoder_layers, x, caches)
  x = jax.nn.silu(_rms_norm(x, params["decoder.norm_out.gamma"]))
  x = _causal_conv(params, "decoder.conv_out", x, caches)
  return x.astype(jnp.float32), caches.next


# --------------------------------------------------------------------------------------- the model


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2:
    raise WanVAEError(f"{what}={value!r}; expected an int or a (height, width) pair")
  return int(pair[0]), int(pair[1])


def _tile_starts(size: int, stride: int) -> range:
  return range(0, size, stride)


def _blend(previous: np.ndarray, tile: np.ndarray, extent: int, axis: int) -> np.ndarray:
  """diffusers' blend_v / blend_h: ramps `tile`'s first rows from `previous`'s last rows along `axis`."""
  extent = min(previous.shape[axis], tile.shape[axis], extent)
  if extent <= 0:
    return tile
  shape = [1] * tile.ndim
  shape[axis] = extent
  ramp = (np.arange(extent, dtype=np.float64) / extent).astype(np.float32).reshape(shape)
  head = [slice(None)] * tile.ndim
  tail = [slice(None)] * tile.ndim
  head[axis] = slice(0, extent)
  tail[axis] = slice(previous.shape[axis] - extent, previous.shape[axis])
  tile = tile.copy()
  tile[tuple(head)] = previous[tuple(tail)] * (1 - ramp) + tile[tuple(head)] * ramp
  return tile


def _blend_tiles(grid: list[list[np.ndarray]], blend: tuple[int, int], stride: tuple[int, int],
                 size: tuple[int, int]) -> np.ndarray:
  """Blends each tile with the (already blended) tile above and to its left, crops, stitches."""
  rows = []
  for i, row in enumerate(grid):
    for j in range(len(row)):
      tile = row[j]
      if i > 0:
        tile = _blend(grid[i - 1][j], tile, blend[0], axis=2)
      if j > 0:
        tile = _blend(row[j - 1], tile, blend[1], axis=3)
      row[j] = tile  # as diffusers' in-place blending: neighbours blend against the blended tile
    rows.append(np.concatenate([tile[:, :, :stride[0], :stride[1]] for tile in row], axis=3))
  return np.concatenate(rows, axis=2)[:, :, :size[0], :size[1]]


class WanVAE:
  """The Wan2.1 VAE: `encode` video [B, F, H, W, 3] in [-1, 1] -> latents [B, T', H/8, W/8, z_dim], `decode`.

  Latents are normalised per channel, `(z - latents_mean) / latents_std` (what the Wan DiT is trained on);
  pass `normalize=False` for the raw posterior mean. Encoding is deterministic (the posterior mode).

  Tiling (`tile`): None (default) tiles a frame larger than the tile size in either dimension (diffusers'
  rule once tiling is enabled), True always tiles, False never does. Tiles are `tile_sample_size` pixels
  apart by `tile_sample_stride` (diffusers' 256 / 192 by default, latent tiles 32 / 24), blended as
  diffusers blends them.
  """

  def __init__(self, config: WanVAEConfig, params: Mapping[str, Any], *, dtype: str = "float32",
               tile: bool | None = None,
               tile_sample_size: int | tuple[int, int] = DEFAULT_TILE_SAMPLE_SIZE,
               tile_sample_stride: int | tuple[int, int] = DEFAULT_TILE_SAMPLE_STRIDE):
    config.validate()
    self.config = config
    self.dtype = dtype
    self.compute_dtype = _compute_dtype(dtype)
    self.temporal_factor = config.temporal_factor
    self.spatial_factor = config.spatial_factor
    self.latent_channels = config.z_dim
    self.tile = tile
    self.tile_sample_size = _pair(tile_sample_size, "tile_sample_size")
    self.tile_sample_stride = _pair(tile_sample_stride, "tile_sample_stride")
    for size, stride in zip(self.tile_sample_size, self.tile_sample_stride, strict=True):
      if size % self.spatial_factor or stride % self.spatial_factor or not 0 < stride <= size:
        raise WanVAEError(
            f"tile_sample_size={self.tile_sample_size}, tile_sample_stride={self.tile_sample_stride}; "
            f"expected multiples of {self.spatial_factor} with 0 < stride <= size")
    self.latents_mean = np.asarray(config.latents_mean, np.float32)
    self.latents_std = np.asarray(config.latents_std, np.float32)
    self.params = {name: jnp.asarray(value) for name, value in params.items()}
    self._replicated: tuple[jax.sharding.NamedSharding, dict[str, jax.Array]] | None = None
    self._traces = {"encode_first": 0, "encode_step": 0, "decode_first": 0, "decode_step": 0}
    arch = _architecture(config)
    encode = functools.partial(_encode_chunk, arch=arch, dtype=self.compute_dtype)
    decode = functools.partial(_decode_chunk, arch=arch, dtype=self.compute_dtype)
    self._encode_first = self._jit("encode_first", lambda p, video: encode(p, video, None))
    self._encode_step = self._jit("encode_step", encode, donate_caches=True)
    self._decode_first = self._jit("decode_first", lambda p, latents: decode(p, latents, None))
    self._decode_step = self._jit("decode_step", decode, donate_caches=True)

  # A batch whose size the local device count divides is split over the local devices (data-parallel:
  # prepare batches clips of one bucket by that count); anything else runs on the default device.
  data_parallel = True

  def _placed(self, batch: int) -> tuple[dict[str, jax.Array], Callable[[np.ndarray], Any]]:
    """(params, put) for a batch of `batch` clips: params replicated and inputs split over local devices."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch % len(devices):
      return self.params, lambda array: array
    if self._replicated is None:
      mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self._replicated = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")),
                          jax.device_put(self.params, replicated))
    split, params = self._replicated
    return params, lambda array: jax.device_put(array, split)

  def _jit(self, key: str, fn: Callable, donate_caches: bool = False) -> Callable:
    def traced(*args):
      self._traces[key] += 1  # runs once per trace, i.e. per compiled program
      return fn(*args)
    return jax.jit(traced, donate_argnums=(2,) if donate_caches else ())

  def compiled_programs(self) -> dict[str, int]:
    """How many programs each chunk function has compiled (one per batch size and tile shape)."""
    return dict(self._traces)

  # ---------------------------------------------------------------------------------------- shapes

  def _frames_for(self, frames: int, frame_policy: str, what: str) -> int:
    if frame_policy not in FRAME_POLICIES:
      raise WanVAEError(f"frame_policy={frame_policy!r}; expected one of {FRAME_POLICIES}")
    if frames < 1:
      raise WanVAEError(f"{what} has {frames} frames; expected at least 1")
    extra = (frames - 1) % self.temporal_factor
    if extra == 0:
      return frames
    if frame_policy == "error":
      raise WanVAEError(
          f"{what} has {frames} frames; frame_policy='error' expects 1 + {self.temporal_factor}k frames "
          f"(crop to {frames - extra} or pad to {frames - extra + self.temporal_factor})")
    return frames - extra if frame_policy == "crop" else frames - extra + self.temporal_factor

  def latent_shape(self, frames: int, height: int, width: int,
                   frame_policy: str = "crop") -> tuple[int, int, int, int]:
    """[T', H', W', C] that `encode` gives a clip of `frames` x `height` x `width` pixels."""
    frames = self._frames_for(frames, frame_policy, f"a clip of shape {(frames, height, width)}")
    f = self.spatial_factor
    return 1 + (frames - 1) // self.temporal_factor, height // f, width // f, self.latent_channels

  def _use_tiles(self, tile: bool | None, height: int, width: int, scale: int) -> bool:
    tile = self.tile if tile is None else tile
    if tile is None:
      return height > self.tile_sample_size[0] // scale or width > self.tile_sample_size[1] // scale
    return bool(tile)

  # ---------------------------------------------------------------------------------------- encode

  def encode(self, video: Any, *, normalize: bool = True, frame_policy: str = "crop",
             tile: bool | None = None) -> np.ndarray:
    """video [B, F, H, W, 3] in [-1, 1] (numpy or jax) -> latents [B, T', H/8, W/8, z_dim] float32 numpy.

    F should be 1 + 4k. Otherwise `frame_policy` says what happens: "crop" (default, as Wan and diffusers
    do) drops the trailing frames down to 1 + 4k, "pad" repeats the last frame up to the next 1 + 4k,
    "error" raises. T' = 1 + (F - 1) // 4 after the policy. `tile`: None uses the VAE's setting (see the
    class docstring).
    """
    shape = tuple(getattr(video, "shape", ()))
    f = self.spatial_factor
    if len(shape) != 5 or shape[-1] != 3 or shape[2] % f or shape[3] % f or 0 in shape:
      raise WanVAEError(
          f"Wan VAE encode got video of shape {shape}; expected [B, F, H, W, 3] with H and W divisible "
          f"by {f}")
    frames = self._frames_for(shape[1], frame_policy, f"video of shape {shape}")
    video = np.asarray(video, np.float32)
    if frames < shape[1]:
      video = video[:, :frames]
    elif frames > shape[1]:
      video = np.concatenate([video, np.repeat(video[:, -1:], frames - shape[1], axis=1)], axis=1)
    height, width = shape[2], shape[3]
    if self._use_tiles(tile, height, width, 1):
      size = self.tile_sample_size
      stride = self.tile_sample_stride
      grid = [[self._encode_frames(video[:, :, i:i + size[0], j:j + size[1]])
               for j in _tile_starts(width, stride[1])] for i in _tile_starts(height, stride[0])]
      latent_blend = (size[0] // f - stride[0] // f, size[1] // f - stride[1] // f)
      latents = _blend_tiles(grid, latent_blend, (stride[0] // f, stride[1] // f), (height // f, width // f))
    else:
      latents = self._encode_frames(video)
    if normalize:
      latents = (latents - self.latents_mean) / self.latents_std
    return latents

  def _encode_frames(self, video: np.ndarray) -> np.ndarray:
    """The chunked time loop over one (tile of a) clip of 1 + 4k frames -> raw posterior mean."""
    b, frames, h, w, _ = video.shape
    f, step = self.spatial_factor, self.temporal_factor
    out = np.empty((b, 1 + (frames - 1) // step, h // f, w // f, self.latent_channels), np.float32)
    params, put = self._placed(b)
    pending, caches = self._encode_first(params, put(video[:, :1]))
    for k in range(1, out.shape[1]):
      latents, caches = self._encode_step(params, put(video[:, 1 + step * (k - 1):1 + step * k]), caches)
      out[:, k - 1] = np.asarray(pending)[:, 0]  # while chunk k runs; one chunk in flight bounds memory
      pending = latents
    out[:, -1] = np.asarray(pending)[:, 0]
    return out

  # ---------------------------------------------------------------------------------------- decode

  def decode(self, latents: Any, *, normalize: bool = True, tile: bool | None = None) -> np.ndarray:
    """latents [B, T', H', W', z_dim] -> video [B, 1 + 4(T' - 1), 8H', 8W', 3] float32 numpy in [-1, 1].

    With `normalize` (default) the latents are the normalised ones `encode` returns and are mapped back
    (z * latents_std + latents_mean) first. The output is clipped to [-1, 1], as diffusers does. `tile`:
    None uses the VAE's setting (see the class docstring).
    """
    shape = tuple(getattr(latents, "shape", ()))
    if len(shape) != 5 or shape[-1] != self.latent_channels or 0 in shape:
      raise WanVAEError(
          f"Wan VAE decode got latents of shape {shape}; expected [B, T', H', W', {self.latent_channels}]")
    latents = np.asarray(latents, np.float32)
    if normalize:
      latents = latents * self.latents_std + self.latents_mean
    height, width = shape[2], shape[3]
    f = self.spatial_factor
    if self._use_tiles(tile, height, width, f):
      size = self.tile_sample_size
      stride = self.tile_sample_stride
      grid = [[self._decode_frames(latents[:, :, i:i + size[0] // f, j:j + size[1] // f])
               for j in _tile_starts(width, stride[1] // f)] for i in _tile_starts(height, stride[0] // f)]
      blend = (size[0] - stride[0], size[1] - stride[1])
      video = _blend_tiles(grid, blend, stride, (height * f, width * f))
    else:
      video = self._decode_frames(latents)
    return np.clip(video, -1.0, 1.0)

  def _decode_frames(self, latents: np.ndarray) -> np.ndarray:
    """The time loop over one (tile of a) latent clip, one latent frame per call -> unclipped pixels."""
    b, t, h, w, _ = latents.shape
    f, step = self.spatial_factor, self.temporal_factor
    out = np.empty((b, 1 + step * (t - 1), h * f, w * f, 3), np.float32)
    params, put = self._placed(b)
    pending, caches = self._decode_first(params, put(latents[:, :1]))
    start = 0
    for k in range(1, t):
      pixels, caches = self._decode_step(params, put(latents[:, k:k + 1]), caches)
      chunk = np.asarray(pending)
      out[:, start:start + chunk.shape[1]] = chunk
      start += chunk.shape[1]
      pending = pixels
    out[:, start:] = np.asarray(pending)
    return out


# -------------------------------------------------------------------------------------------- load


def load(directory: str, *, dtype: str = "float32", tile: bool | None = None,
         tile_sample_size: int | tuple[int, int] = DEFAULT_TILE_SAMPLE_SIZE,
         tile_sample_stride: int | tuple[int, int] = DEFAULT_TILE_SAMPLE_STRIDE) -> WanVAE:
  """The Wan2.1 VAE of a diffusers `vae/` directory: config.json + diffusion_pytorch_model(.safetensors |
  -0000N-of-0000M.safetensors with its index json). Parameters are cast once to `dtype` ("float32" or
  "bfloat16"; norms always run in float32). `tile` and the tile sizes (pixels): see `WanVAE`.
  """
  _compute_dtype(dtype)
  if not os.path.isdir(directory):
    raise WanVAEError(f"Wan VAE directory {directory} does not exist; expected a diffusers vae/ directory")
  config = WanVAEConfig.from_json(os.path.join(directory, layout.CONFIG_FILE))
  try:
    reader = safetensors_io.Reader(directory, prefix=WEIGHTS_PREFIX)
  except safetensors_io.SafetensorsError as e:
    raise WanVAEError(f"cannot read the Wan VAE weights of {directory}: {e}") from e
  params = convert_weights(config, reader.read, set(reader.specs()), source=directory, dtype=dtype)
  return WanVAE(config, params, dtype=dtype, tile=tile, tile_sample_size=tile_sample_size,
                tile_sample_stride=tile_sample_stride)
