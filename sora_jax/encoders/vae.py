"""Video autoencoders that map pixels to the latents the DiT is trained on, and back.

Owns the interface (`get_vae(config)` -> object with `.encode(pixels)` / `.decode(latents)`) and the
demo's pixel VAE: an exact space-to-depth rearrangement, so decoded latents are the input pixels.
`data.vae='wan'` loads the Wan2.1 causal 3D VAE (`wan_vae.py`) from `data.pretrained`'s `vae/`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.files import layout


class VAEError(ValueError):
  """A VAE that cannot be built, or pixels/latents of the wrong shape."""


class VAEUnavailable(VAEError):
  """The config names a pretrained VAE but no weights to load it from (eval scores loss without it)."""


def _namespace(array: Any):
  return np if isinstance(array, np.ndarray) else jnp


class PixelVAE:
  """Space-to-depth by `spatial_factor` f: pixels [B, F, H, W, 3] <-> latents [B, F, H/f, W/f, 3f^2].

  Channel c of a latent cell holds pixel (dy, dx, rgb) of its f x f patch with
  c = (dy * f + dx) * 3 + rgb. Values stay in the pixel range [-1, 1]; decode(encode(x)) == x
  bit for bit. Works on numpy arrays (prepare) and jax arrays (inside jit, for samples).
  """

  temporal_factor = 1

  def __init__(self, spatial_factor: int):
    if spatial_factor < 1:
      raise VAEError(f"pixel VAE spatial_factor={spatial_factor}; expected >= 1")
    self.spatial_factor = spatial_factor
    self.latent_channels = 3 * spatial_factor ** 2

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[T', H', W', C] of a clip of `frames` x `height` x `width` pixels."""
    f = self.spatial_factor
    return frames, height // f, width // f, self.latent_channels

  def encode(self, pixels: Any) -> Any:
    """pixels [B, F, H, W, 3] in [-1, 1] -> latents [B, F, H/f, W/f, 3f^2] (same dtype)."""
    f = self.spatial_factor
    if pixels.ndim != 5 or pixels.shape[-1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
      raise VAEError(
          f"pixel VAE encode got pixels of shape {tuple(pixels.shape)}; expected [B, F, H, W, 3] with "
          f"H and W divisible by {f}")
    xp = _namespace(pixels)
    b, frames, h, w, _ = pixels.shape
    patches = pixels.reshape(b, frames, h // f, f, w // f, f, 3)
    return xp.transpose(patches, (0, 1, 2, 4, 3, 5, 6)).reshape(b, frames, h // f, w // f, 3 * f * f)

  def decode(self, latents: Any) -> Any:
    """latents [B, F, H', W', 3f^2] -> pixels [B, F, H'f, W'f, 3] (the exact inverse of encode)."""
    f = self.spatial_factor
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise VAEError(
          f"pixel VAE decode got latents of shape {tuple(latents.shape)}; expected "
          f"[B, F, H', W', {self.latent_channels}]")
    xp = _namespace(latents)
    b, frames, h, w, _ = latents.shape
    patches = latents.reshape(b, frames, h, w, f, f, 3)
    return xp.transpose(patches, (0, 1, 2, 4, 3, 5, 6)).reshape(b, frames, h * f, w * f, 3)


def get_vae(config: ml_collections.ConfigDict) -> Any:
  """The VAE named by config.data.vae, checked against the model's latent channels."""
  data = config.data
  if data.vae == "pixel":
    if data.vae_temporal_factor != 1:
      raise VAEError(
          f"data.vae='pixel' keeps every frame, but data.vae_temporal_factor={data.vae_temporal_factor}; "
          f"expected 1")
    vae = PixelVAE(data.vae_spatial_factor)
    if config.model.in_channels != vae.latent_channels:
      raise VAEError(
          f"data.vae='pixel' with data.vae_spatial_factor={data.vae_spatial_factor} gives "
          f"{vae.latent_channels} channels, but model.in_channels={config.model.in_channels}")
    return vae
  if data.vae == "wan":
    return _wan_vae(config)
  raise VAEError(f"data.vae={data.vae!r}; expected 'pixel' or 'wan'")


def _wan_vae(config: ml_collections.ConfigDict) -> Any:
  data = config.data
  directory = layout.vae_dir(layout.required_root(
      data.pretrained, "data.vae='wan'", "the Wan VAE weights", VAEUnavailable))
  from sora_jax.encoders import wan_vae  # deferred: the demo never needs it

  vae = wan_vae.load(directory, dtype=data.encoder_dtype)
  expected = {"model.in_channels": (config.model.in_channels, vae.latent_channels),
              "data.vae_spatial_factor": (data.vae_spatial_factor, vae.spatial_factor),
              "data.vae_temporal_factor": (data.vae_temporal_factor, vae.temporal_factor)}
  for field, (configured, actual) in expected.items():
    if configured != actual:
      raise VAEError(f"{field}={configured}, but the VAE in {data.pretrained}/vae gives {actual}")
  return vae
