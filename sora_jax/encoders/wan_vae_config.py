"""The config of a Wan causal 3D video VAE (diffusers' `AutoencoderKLWan` config.json), Wan2.1 or Wan2.2.

Owns reading and checking the architecture fields, the compression factors they imply, and the latent
normalisation statistics; one `WanVAEError` names the file and field of anything it cannot run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sora_jax.files import layout

# Frames per steady-state encoder chunk; the Wan VAEs compress time by exactly this factor.
CHUNK_FRAMES = 4


class WanVAEError(ValueError):
  """A Wan VAE config or checkpoint that cannot be loaded, or video / latents of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """The architecture fields of a diffusers `AutoencoderKLWan` config.json: Wan2.1's (the defaults) or
  Wan2.2's (`is_residual`: residual up/down blocks with parameter-free shortcuts; `patch_size` 2: pixels
  folded 2x2 into 12 channels before the encoder and unfolded after the decoder; z_dim 48)."""

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
  is_residual: bool = False
  patch_size: int | None = None
  in_channels: int = 3
  out_channels: int = 3

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(d) for d in self.temperal_downsample)

  @property
  def patch(self) -> int:
    """Pixels folded into channels per side before the encoder (1: none)."""
    return self.patch_size or 1

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent cell per side: the encoder's downsampling times the patch."""
    return 2 ** (len(self.dim_mult) - 1) * self.patch

  @property
  def version(self) -> str:
    return "Wan2.2" if self.is_residual else "Wan2.1"

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> WanVAEConfig:
    """Reads a diffusers config dict; refuses inconsistent fields with a WanVAEError."""
    class_name = raw.get("_class_name", "AutoencoderKLWan")
    if class_name != "AutoencoderKLWan":
      raise WanVAEError(f"{source}: _class_name={class_name!r}; expected 'AutoencoderKLWan'")
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
          is_residual=bool(raw.get("is_residual", False)),
          patch_size=None if raw.get("patch_size") in (None, 1) else int(raw["patch_size"]),
          in_channels=int(raw.get("in_channels", 3)),
          out_channels=int(raw.get("out_channels", 3)),
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
      # has none: no reference to match, and no Wan checkpoint uses them.
      raise WanVAEError(
          f"{source}: attn_scales={list(self.attn_scales)}; the Wan VAEs (and diffusers' runnable "
          f"AutoencoderKLWan) have attention only in their mid blocks, expected attn_scales=[]")
    pixels = 3 * self.patch * self.patch
    if self.in_channels != pixels or self.out_channels != pixels:
      raise WanVAEError(
          f"{source}: in_channels={self.in_channels}, out_channels={self.out_channels} with patch_size="
          f"{self.patch_size}; expected {pixels} each (RGB folded {self.patch}x{self.patch})")
    if len(self.dim_mult) < 2 or self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
      raise WanVAEError(
          f"{source}: base_dim={self.base_dim}, z_dim={self.z_dim}, dim_mult={list(self.dim_mult)}, "
          f"num_res_blocks={self.num_res_blocks}; expected positive sizes and at least two levels")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise WanVAEError(
          f"{source}: temperal_downsample={list(self.temperal_downsample)} has "
          f"{len(self.temperal_downsample)} entries; expected len(dim_mult) - 1 = {len(self.dim_mult) - 1}")
    if self.temporal_factor != CHUNK_FRAMES or self.scale_factor_temporal != CHUNK_FRAMES:
      raise WanVAEError(
          f"{source}: temperal_downsample={list(self.temperal_downsample)} and scale_factor_temporal="
          f"{self.scale_factor_temporal} compress time by {self.temporal_factor}; the Wan VAEs' chunked "
          f"time loop expects exactly {CHUNK_FRAMES} (two True entries)")
    if self.scale_factor_spatial != self.spatial_factor:
      raise WanVAEError(
          f"{source}: scale_factor_spatial={self.scale_factor_spatial} but dim_mult={list(self.dim_mult)} "
          f"and patch_size={self.patch_size} downsample by {self.spatial_factor}")
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
