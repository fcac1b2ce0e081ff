"""The Wan VAE network (diffusers' WanEncoder3d / WanDecoder3d, Wan2.1 and Wan2.2) as pure JAX functions.

Owns the architecture as a static list of layers named by their torch module paths (so the weight table,
the forward functions and the cache dict key on the same names), and one chunk of the causal encoder or
decoder: (params, activations [B, T, H, W, C], the previous chunk's caches) -> (output, next caches). A
causal conv's cache holds the two input frames before the chunk (zeros before the first frame, which is
diffusers' causal zero padding). Wan2.2's residual groups add parameter-free shortcuts (`avg_down`,
`dup_up`), and its pixels are folded 2x2 into channels around the network (`patchify`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.encoders import wan_vae_convs as convs
from sora_jax.encoders.wan_vae_config import WanVAEConfig


@dataclasses.dataclass(frozen=True)
class Residual:
  name: str
  in_dim: int
  out_dim: int


@dataclasses.dataclass(frozen=True)
class Attention:
  name: str
  dim: int


@dataclasses.dataclass(frozen=True)
class Resample:
  name: str
  dim: int
  mode: str  # downsample2d | downsample3d | upsample2d | upsample3d
  out_dim: int


@dataclasses.dataclass(frozen=True)
class Group:
  """Wan2.2's WanResidualDownBlock / WanResidualUpBlock: `layers`, plus a parameter-free shortcut from the
  group's input: AvgDown3D (channel groups averaged over space-time blocks) or DupUp3D (channels
  duplicated into space-time blocks), by `factor_t` in time and `factor_s` in space."""

  name: str
  layers: tuple[Residual | Resample, ...]
  in_dim: int
  out_dim: int
  factor_t: int
  factor_s: int
  up: bool  # DupUp3D (decoder) or AvgDown3D (encoder); a decoder group with factor_s 0 has none


Layer = Residual | Attention | Resample | Group


@dataclasses.dataclass(frozen=True)
class Arch:
  z_dim: int
  encoder_in_dim: int  # channels after encoder.conv_in
  encoder_layers: tuple[Layer, ...]
  encoder_out_dim: int
  decoder_in_dim: int  # channels after decoder.conv_in
  decoder_layers: tuple[Layer, ...]
  decoder_out_dim: int


def _mid_block(prefix: str, dim: int) -> tuple[Layer, ...]:
  return (Residual(f"{prefix}.mid_block.resnets.0", dim, dim),
          Attention(f"{prefix}.mid_block.attentions.0", dim),
          Residual(f"{prefix}.mid_block.resnets.1", dim, dim))


def _decoder_levels(config: WanVAEConfig) -> tuple[list[int], tuple[bool, ...]]:
  """(channels at the decoder's mid block and after each up level, which up levels double time)."""
  decoder_dim = config.decoder_base_dim or config.base_dim
  return ([decoder_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])],
          config.temperal_downsample[::-1])


def architecture(config: WanVAEConfig) -> Arch:
  """Mirrors WanEncoder3d / WanDecoder3d construction (attn_scales=[]) layer for layer."""
  if config.is_residual:
    return _residual_architecture(config)
  dims = [config.base_dim * m for m in (1, *config.dim_mult)]
  last = len(config.dim_mult) - 1
  encoder: list[Layer] = []
  for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
    for _ in range(config.num_res_blocks):
      encoder.append(Residual(f"encoder.down_blocks.{len(encoder)}", in_dim, out_dim))
      in_dim = out_dim
    if level != last:
      mode = "downsample3d" if config.temperal_downsample[level] else "downsample2d"
      encoder.append(Resample(f"encoder.down_blocks.{len(encoder)}", out_dim, mode, out_dim))
  encoder.extend(_mid_block("encoder", dims[-1]))

  up_dims, temperal_upsample = _decoder_levels(config)
  decoder: list[Layer] = list(_mid_block("decoder", up_dims[0]))
  for level, (in_dim, out_dim) in enumerate(zip(up_dims[:-1], up_dims[1:], strict=True)):
    if level > 0:
      in_dim //= 2  # every Wan2.1 upsampler halves the channels
    for j in range(config.num_res_blocks + 1):
      decoder.append(Residual(f"decoder.up_blocks.{level}.resnets.{j}", in_dim, out_dim))
      in_dim = out_dim
    if level != last:
      mode = "upsample3d" if temperal_upsample[level] else "upsample2d"
      decoder.append(Resample(f"decoder.up_blocks.{level}.upsamplers.0", out_dim, mode, out_dim // 2))
  return Arch(config.z_dim, dims[0], tuple(encoder), dims[-1], up_dims[0], tuple(decoder), up_dims[-1])


def _residual_architecture(config: WanVAEConfig) -> Arch:
  """Wan2.2's is_residual=True encoder and decoder: one `Group` per level."""
  dims = [config.base_dim * m for m in (1, *config.dim_mult)]
  last = len(config.dim_mult) - 1
  encoder: list[Layer] = []
  for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
    name = f"encoder.down_blocks.{level}"
    down = level != last
    temporal = down and bool(config.temperal_downsample[level])
    inner: list[Residual | Resample] = []
    dim = in_dim
    for j in range(config.num_res_blocks):
      inner.append(Residual(f"{name}.resnets.{j}", dim, out_dim))
      dim = out_dim
    if down:
      inner.append(Resample(f"{name}.downsampler", out_dim, "downsample3d" if temporal else "downsample2d",
                             out_dim))
    encoder.append(Group(name, tuple(inner), in_dim, out_dim, 2 if temporal else 1, 2 if down else 1,
                          up=False))
  encoder.extend(_mid_block("encoder", dims[-1]))

  up_dims, temperal_upsample = _decoder_levels(config)
  decoder: list[Layer] = list(_mid_block("decoder", up_dims[0]))
  for level, (in_dim, out_dim) in enumerate(zip(up_dims[:-1], up_dims[1:], strict=True)):
    name = f"decoder.up_blocks.{level}"
    up = level != last
    temporal = up and bool(temperal_upsample[level])
    inner = []
    dim = in_dim
    for j in range(config.num_res_blocks + 1):
      inner.append(Residual(f"{name}.resnets.{j}", dim, out_dim))
      dim = out_dim
    if up:  # the residual upsampler keeps its width (Wan2.1's halves it)
      mode = "upsample3d" if temporal else "upsample2d"
      inner.append(Resample(f"{name}.upsampler", out_dim, mode, out_dim))
    # The last level has no upsampler and no shortcut (factor_s 0).
    decoder.append(Group(name, tuple(inner), in_dim, out_dim, 2 if temporal else 1, 2 if up else 0, up=True))
  return Arch(config.z_dim, dims[0], tuple(encoder), dims[-1], up_dims[0], tuple(decoder), up_dims[-1])


class _Caches:
  """Cache dict threaded through one chunk at trace time: reads the previous chunk's, collects the next's."""

  def __init__(self, previous: dict[str, jax.Array] | None):
    self.previous = previous
    self.next: dict[str, jax.Array] = {}

  @property
  def first(self) -> bool:
    return self.previous is None


def _causal_conv(params: dict, name: str, x: jax.Array, caches: _Caches) -> jax.Array:
  """WanCausalConv3d (3x3x3, padding 1 in space, 2 frames into the past) with its cache of 2 frames."""
  kernel, bias = params[f"{name}.weight"], params[f"{name}.bias"]
  if caches.first and x.shape[1] == 1:
    # The two frames before a clip are zeros: only the last time tap sees data.
    out = convs.frames_2d(lambda f: convs.conv2d_nhwc(f, kernel[2]), x)
    caches.next[name] = jnp.concatenate([jnp.zeros_like(x), x], axis=1)
  else:
    past = jnp.zeros_like(x[:, :1]).repeat(2, axis=1) if caches.first else caches.previous[name]
    frames = jnp.concatenate([past, x], axis=1)
    out = convs.conv3x3x3(frames, kernel)
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


def _residual(params: dict, layer: Residual, x: jax.Array, caches: _Caches) -> jax.Array:
  n = layer.name
  shortcut = _pointwise_conv(params, f"{n}.conv_shortcut", x) if layer.in_dim != layer.out_dim else x
  h = jax.nn.silu(_rms_norm(x, params[f"{n}.norm1.gamma"]))
  h = _causal_conv(params, f"{n}.conv1", h, caches)
  h = jax.nn.silu(_rms_norm(h, params[f"{n}.norm2.gamma"]))
  h = _causal_conv(params, f"{n}.conv2", h, caches)
  return h + shortcut


def _attention(params: dict, layer: Attention, x: jax.Array) -> jax.Array:
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


def _resample(params: dict, layer: Resample, x: jax.Array, caches: _Caches) -> jax.Array:
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
      doubled = convs.time_taps(frames, params[f"{n}.time_conv.weight"], params[f"{n}.time_conv.bias"], 1)
      b, t, h, w, c = x.shape
      # Channels [0, C) become frame 2t and [C, 2C) frame 2t + 1.
      x = doubled.astype(x.dtype).reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)
      x = x.reshape(b, 2 * t, h, w, c)
  if layer.mode.startswith("upsample"):
    out = convs.frames_2d(lambda f: convs.upsample_conv(f, kernel), x)
  else:
    out = convs.frames_2d(lambda f: convs.conv2d_nhwc(f, kernel, stride=2, padding=((0, 1), (0, 1))), x)
  out = (out + bias).astype(x.dtype)
  if layer.mode == "downsample3d":
    # diffusers skips the time conv on the first chunk (one frame) and keeps the last frame for the next.
    previous = None if caches.first else caches.previous[n]
    caches.next[n] = out[:, -1:]
    if previous is not None:
      frames = jnp.concatenate([previous, out], axis=1)
      out = convs.time_taps(frames, params[f"{n}.time_conv.weight"], params[f"{n}.time_conv.bias"], 2)
      out = out.astype(x.dtype)
  return out


def avg_down(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
  """AvgDown3D: [B, T, H, W, C] -> [B, ceil(T / ft), H / fs, W / fs, out_dim], each output channel the mean
  of a group of (channel, time, row, column) values; a time length that ft does not divide is padded with
  zero frames in front (the single first frame of a clip)."""
  b, t, h, w, c = x.shape
  pad = -t % factor_t
  if pad:
    x = jnp.concatenate([jnp.zeros_like(x[:, :pad]), x], axis=1)
    t += pad
  x = x.reshape(b, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
  x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # channel-major, then the block's (time, row, column)
  group = c * factor_t * factor_s * factor_s // out_dim
  x = x.reshape(b, t // factor_t, h // factor_s, w // factor_s, out_dim, group)
  return jnp.mean(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def dup_up(x: jax.Array, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> jax.Array:
  """DupUp3D: [B, T, H, W, C] -> [B, T * ft, H * fs, W * fs, out_dim], each input channel repeated into a
  (output channel, time, row, column) block; the first chunk drops its first ft - 1 frames."""
  b, t, h, w, c = x.shape
  repeats = out_dim * factor_t * factor_s * factor_s // c
  x = jnp.repeat(x, repeats, axis=-1).reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
  return x[:, factor_t - 1:] if first_chunk else x


def _group(params: dict, layer: Group, x: jax.Array, caches: _Caches) -> jax.Array:
  out = _apply_layers(params, layer.layers, x, caches)
  if layer.up:
    if not layer.factor_s:
      return out
    return out + dup_up(x, layer.out_dim, layer.factor_t, layer.factor_s, caches.first)
  return out + avg_down(x, layer.out_dim, layer.factor_t, layer.factor_s)


def _apply_layers(params: dict, layers: tuple[Layer, ...], x: jax.Array, caches: _Caches) -> jax.Array:
  for layer in layers:
    if isinstance(layer, Residual):
      x = _residual(params, layer, x, caches)
    elif isinstance(layer, Attention):
      x = _attention(params, layer, x)
    elif isinstance(layer, Group):
      x = _group(params, layer, x, caches)
    else:
      x = _resample(params, layer, x, caches)
  return x


def patchify(x: Any, patch: int) -> Any:
  """diffusers' patchify, channels last: [B, T, H, W, C] -> [B, T, H/p, W/p, C*p*p], channel (c, q_w, q_h)."""
  if patch == 1:
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // patch, patch, w // patch, patch, c).transpose(0, 1, 2, 4, 6, 5, 3)
  return x.reshape(b, t, h // patch, w // patch, c * patch * patch)


def unpatchify(x: Any, patch: int) -> Any:
  """The inverse of `patchify`: [B, T, h, w, C*p*p] -> [B, T, h*p, w*p, C]."""
  if patch == 1:
    return x
  b, t, h, w, cpp = x.shape
  c = cpp // (patch * patch)
  x = x.reshape(b, t, h, w, c, patch, patch).transpose(0, 1, 2, 6, 3, 5, 4)
  return x.reshape(b, t, h * patch, w * patch, c)


def encode_chunk(params: dict, video: jax.Array, previous: dict | None, *, arch: Arch,
                 dtype: np.dtype) -> tuple[jax.Array, dict]:
  """(patchified) video [B, 1 or 4, H, W, 3p^2] -> posterior mean [B, 1, H/8, W/8, z] float32, caches."""
  caches = _Caches(previous)
  x = _causal_conv(params, "encoder.conv_in", video.astype(dtype), caches)
  x = _apply_layers(params, arch.encoder_layers, x, caches)
  x = jax.nn.silu(_rms_norm(x, params["encoder.norm_out.gamma"]))
  x = _causal_conv(params, "encoder.conv_out", x, caches)
  mean = jnp.dot(x, params["quant_conv.weight"], preferred_element_type=jnp.float32)
  return (mean + params["quant_conv.bias"]).astype(jnp.float32), caches.next


def decode_chunk(params: dict, latents: jax.Array, previous: dict | None, *, arch: Arch,
                 dtype: np.dtype) -> tuple[jax.Array, dict]:
  """raw latents [B, 1, h, w, z] -> (patchified) pixels [B, 1 (first chunk) or 4, 8h, 8w, 3p^2] float32,
  unclipped."""
  caches = _Caches(previous)
  x = _pointwise_conv(params, "post_quant_conv", latents.astype(dtype))
  x = _causal_conv(params, "decoder.conv_in", x, caches)
  x = _apply_layers(params, arch.decoder_layers, x, caches)
  x = jax.nn.silu(_rms_norm(x, params["decoder.norm_out.gamma"]))
  x = _causal_conv(params, "decoder.conv_out", x, caches)
  return x.astype(jnp.float32), caches.next
