"""The spacetime-patch layout: how latents [T, H, W, C] become the DiT's tokens and back.

One module for the DiT, packing, FLOP counts and config validation, with the shape arithmetic
around it: a pixel bucket's latent shape under the VAE, tokens per bucket, and RoPE's (t, h, w)
channel split. A clip's tokens are its (p_t, p_h, p_w) patches in row-major (t, h, w) order over the
patch grid, each flattened as (p_t, p_h, p_w, C): the layout a Conv3d patch embedding with stride =
kernel = patch sees, and diffusers' `proj_out` writes. The functions take numpy or jax arrays with
any leading batch axes. No jax here: config validation imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def grid(latent_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
  """Patch grid (g_t, g_h, g_w) of latents (T, H, W[, C]); ValueError if a patch does not divide it."""
  if len(latent_shape) not in (3, 4):
    raise ValueError(f"latent_shape {tuple(latent_shape)}: expected (T, H, W) or (T, H, W, C)")
  spatial, patch = tuple(int(n) for n in latent_shape[:3]), tuple(int(p) for p in patch_size)
  if any(size % p for size, p in zip(spatial, patch, strict=True)):
    raise ValueError(f"latent (T, H, W) = {spatial} is not divisible by model.patch_size = {patch}")
  return tuple(size // p for size, p in zip(spatial, patch, strict=True))


def num_tokens(latent_shape: Sequence[int], patch_size: Sequence[int]) -> int:
  """Patch tokens of one clip of latents (T, H, W[, C])."""
  return math.prod(grid(latent_shape, patch_size))


def patchify(latents: Any, patch_size: Sequence[int]) -> Any:
  """[..., T, H, W, C] -> tokens [..., N, p_t*p_h*p_w*C]."""
  *lead, frames, height, width, channels = latents.shape
  gt, gh, gw = grid((frames, height, width), patch_size)
  pt, ph, pw = patch_size
  k = len(lead)
  tokens = latents.reshape(*lead, gt, pt, gh, ph, gw, pw, channels)
  tokens = tokens.transpose(*range(k), k, k + 2, k + 4, k + 1, k + 3, k + 5, k + 6)
  return tokens.reshape(*lead, gt * gh * gw, pt * ph * pw * channels)


def unpatchify(tokens: Any, patch_grid: Sequence[int], patch_size: Sequence[int]) -> Any:
  """Inverse of patchify: tokens [..., N', p_t*p_h*p_w*C] (the first g_t*g_h*g_w of them are the clip's;
  any after are padding) -> [..., T, H, W, C]."""
  gt, gh, gw = (int(g) for g in patch_grid)
  pt, ph, pw = patch_size
  *lead, _, width = tokens.shape
  channels = width // (pt * ph * pw)
  k = len(lead)
  video = tokens[..., :gt * gh * gw, :].reshape(*lead, gt, gh, gw, pt, ph, pw, channels)
  video = video.transpose(*range(k), k, k + 3, k + 1, k + 4, k + 2, k + 5, k + 6)
  return video.reshape(*lead, gt * pt, gh * ph, gw * pw, channels)


def grid_positions(patch_grid: Sequence[int]) -> np.ndarray:
  """(t, h, w) patch-grid coordinates [N, 3] int32 of a clip's tokens in patchify order."""
  return np.stack(np.meshgrid(*(np.arange(int(g), dtype=np.int32) for g in patch_grid), indexing="ij"),
                  axis=-1).reshape(-1, 3)


def rope_split(head_dim_: int) -> tuple[int, int, int]:
  """Channels of head_dim given to the (t, h, w) rotary parts, as Wan2.1 splits them."""
  hw = 2 * (head_dim_ // 6)
  return head_dim_ - 2 * hw, hw, hw


def latent_shape(config: Any, bucket: Sequence[int]) -> tuple[int, int, int, int]:
  """Latent [T', H', W', C] of a pixel bucket (frames, height, width) under the configured VAE."""
  frames, height, width = bucket
  tf, sf = config.data.vae_temporal_factor, config.data.vae_spatial_factor
  latent_frames = 1 + (frames - 1) // tf if tf > 1 else frames
  return latent_frames, height // sf, width // sf, config.model.in_channels


def bucket_tokens(config: Any) -> dict[tuple[int, int, int], int]:
  """Patch tokens per clip of every video and image bucket."""
  tokens = {}
  for bucket in tuple(config.data.buckets) + tuple(config.data.image_buckets):
    tokens[tuple(bucket)] = num_tokens(latent_shape(config, bucket), config.model.patch_size)
  return tokens
