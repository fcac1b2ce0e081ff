"""The Wan causal 3D video VAEs (diffusers' `AutoencoderKLWan`, Wan2.1 and Wan2.2) in JAX: pixels <-> latents.

Owns the chunked causal time loop (each causal conv takes and returns its cache of past frames), spatial
tiling as diffusers tiles, latent normalisation and loading a diffusers `vae/` directory; the config, the
network, its convolutions and the weight conversion are the `wan_vae_*` modules beside this one.

Layout: channels last throughout, video [B, F, H, W, 3] in [-1, 1], latents [B, T', H/s, W/s, z_dim] with
T' = 1 + (F - 1) / 4 and s = 8 (Wan2.1, 16 channels) or 16 (Wan2.2: 2x2 pixels folded into channels
around the network, 48 channels). Time runs as diffusers runs it: the first frame alone, then chunks of
4 frames (encode) or one latent frame at a time (decode), each chunk one call of a jitted function, so
the compiled programs are 2 per direction (per tile shape and batch size) whatever the clip length, and
peak device memory is one tile x one chunk.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.encoders import wan_vae_network as network
from sora_jax.encoders.wan_vae_config import WanVAEConfig, WanVAEError
from sora_jax.encoders.wan_vae_weights import compute_dtype, convert_weights, tensor_table
from sora_jax.files import layout, safetensors_io

__all__ = ["WanVAE", "WanVAEConfig", "WanVAEError", "convert_weights", "load", "tensor_table"]

WEIGHTS_PREFIX = layout.DIFFUSERS_WEIGHTS
FRAME_POLICIES = ("crop", "pad", "error")
# diffusers' tile defaults: a frame larger than a tile is cut into tiles this far apart (pixels for the
# Wan2.1 VAE; diffusers reads the same numbers in patch units when it encodes with the Wan2.2 VAE).
DEFAULT_TILE_SAMPLE_SIZE = 256
DEFAULT_TILE_SAMPLE_STRIDE = 192


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
  """A Wan VAE: `encode` video [B, F, H, W, 3] in [-1, 1] -> latents [B, T', H/s, W/s, z_dim], `decode`.

  Latents are normalised per channel, `(z - latents_mean) / latents_std` (what the Wan DiT is trained on);
  pass `normalize=False` for the raw posterior mean. Encoding is deterministic (the posterior mode).

  Tiling (`tile`): None (default) tiles a frame larger than the tile size in either dimension (diffusers'
  rule once tiling is enabled), True always tiles, False never does. Tiles are `tile_sample_size` apart by
  `tile_sample_stride` (diffusers' 256 / 192 by default), blended as diffusers blends them. With the
  Wan2.2 VAE, diffusers tiles the encoder's input in patch units (256 / 192 patches of 2x2 pixels) and
  the decoder's output in pixels (blending in patch space), and so does this class.
  """

  def __init__(self, config: WanVAEConfig, params: Mapping[str, Any], *, dtype: str = "float32",
               tile: bool | None = None,
               tile_sample_size: int | tuple[int, int] = DEFAULT_TILE_SAMPLE_SIZE,
               tile_sample_stride: int | tuple[int, int] = DEFAULT_TILE_SAMPLE_STRIDE):
    config.validate()
    self.config = config
    self.dtype = dtype
    self.compute_dtype = compute_dtype(dtype)
    self.temporal_factor = config.temporal_factor
    self.spatial_factor = config.spatial_factor
    self.patch = config.patch
    self.network_factor = config.spatial_factor // config.patch  # the encoder's own downsampling
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
    arch = network.architecture(config)
    encode = functools.partial(network.encode_chunk, arch=arch, dtype=self.compute_dtype)
    decode = functools.partial(network.decode_chunk, arch=arch, dtype=self.compute_dtype)
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
    """video [B, F, H, W, 3] in [-1, 1] (numpy or jax) -> latents [B, T', H/s, W/s, z_dim] float32 numpy.

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
    video = network.patchify(video, self.patch)  # the network sees (and diffusers tiles) patch space
    height, width, f = video.shape[2], video.shape[3], self.network_factor
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
    """The chunked time loop over one (tile of a) patchified clip of 1 + 4k frames -> raw posterior mean."""
    b, frames, h, w, _ = video.shape
    f, step = self.network_factor, self.temporal_factor
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
    """latents [B, T', H', W', z_dim] -> video [B, 1 + 4(T' - 1), sH', sW', 3] float32 numpy in [-1, 1].

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
    f, p = self.spatial_factor, self.patch
    if self._use_tiles(tile, height, width, f):
      size = self.tile_sample_size
      stride = self.tile_sample_stride
      grid = [[self._decode_frames(latents[:, :, i:i + size[0] // f, j:j + size[1] // f])
               for j in _tile_starts(width, stride[1] // f)] for i in _tile_starts(height, stride[0] // f)]
      # Blended in patch space, as diffusers does, then unfolded.
      blend = (size[0] // p - stride[0] // p, size[1] // p - stride[1] // p)
      video = _blend_tiles(grid, blend, (stride[0] // p, stride[1] // p),
                           (height * self.network_factor, width * self.network_factor))
    else:
      video = self._decode_frames(latents)
    return np.clip(network.unpatchify(video, p), -1.0, 1.0)

  def _decode_frames(self, latents: np.ndarray) -> np.ndarray:
    """The time loop over one (tile of a) latent clip, one latent frame per call -> unclipped pixels in
    patch space."""
    b, t, h, w, _ = latents.shape
    f, step = self.network_factor, self.temporal_factor
    out = np.empty((b, 1 + step * (t - 1), h * f, w * f, self.config.out_channels), np.float32)
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
  """The Wan VAE of a diffusers `vae/` directory: config.json + diffusion_pytorch_model(.safetensors |
  -0000N-of-0000M.safetensors with its index json). Parameters are cast once to `dtype` ("float32" or
  "bfloat16"; norms always run in float32). `tile` and the tile sizes (pixels): see `WanVAE`.
  """
  compute_dtype(dtype)
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
