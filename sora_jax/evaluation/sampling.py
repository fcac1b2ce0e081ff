"""Prompts to videos: text encoder -> seeded noise -> flow ODE sampler with guidance -> VAE decode.

Owns the sample protocol shared by the eval and sample binaries: prompt i's noise depends only on
(seed, i), the batch is padded to the mesh's batch divisor, results come back as uint8 frames.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import patches
from sora_jax.diffusion import conditioning, samplers
from sora_jax.diffusion import experts as experts_lib
from sora_jax.evaluation import media
from sora_jax.parallel import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """What a sample run asks for; `from_config` fills it from config.diffusion and config.eval."""

  num_frames: int
  height: int
  width: int
  sampler: str
  steps: int
  shift: float
  guidance_scale: float
  seed: int
  guidance_scale_2: float | None = None  # the low-noise expert's scale (None: guidance_scale)
  negative_prompt: str = ""
  # An empty negative prompt: False = the zero embedding sora_jax's caption dropout trains on; True = the
  # text encoder's embedding of "" (what Wan2.1 was trained with, so pretrained pipelines use it).
  encode_empty_negative: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides: Any) -> SampleSettings:
    d, e = config.diffusion, config.eval
    values = dict(num_frames=int(e.num_frames), height=int(e.height), width=int(e.width),
                  sampler=d.sampler, steps=int(d.sample_steps), shift=float(d.sample_shift),
                  guidance_scale=float(d.guidance_scale), seed=int(e.seed),
                  negative_prompt=e.negative_prompt,
                  guidance_scale_2=float(d.guidance_scale_2) if d.guidance_scale_2 >= 0 else None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)

  def sample_kwargs(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The static arguments of `samplers.sample` these settings ask for."""
    kwargs = {"sampler": self.sampler, "steps": self.steps, "shift": self.shift,
              "guidance_scale": self.guidance_scale,
              "num_train_timesteps": int(config.diffusion.num_train_timesteps)}
    if experts_lib.names(config.model):
      kwargs.update(guidance_scale_2=self.guidance_scale_2,
                    boundary_timestep=experts_lib.boundary_timestep(config.diffusion))
    return kwargs


def latent_shape(config: ml_collections.ConfigDict, settings: SampleSettings) -> tuple[int, int, int, int]:
  """Latent [T', H', W', C] of the requested pixel size; raises if the VAE or patch grid cannot make it."""
  sf = config.data.vae_spatial_factor
  if settings.num_frames < 1:
    raise ValueError(f"num_frames={settings.num_frames}: expected at least 1 frame")
  if settings.steps < 1:
    raise ValueError(f"steps={settings.steps}: expected at least 1 sampler step")
  if settings.height % sf or settings.width % sf or min(settings.height, settings.width) < 1:
    raise ValueError(
        f"sample size {settings.num_frames}x{settings.height}x{settings.width} (frames x height x width): "
        f"height and width must be positive multiples of data.vae_spatial_factor={sf}")
  tf = config.data.vae_temporal_factor
  if config.data.vae == "wan" and (settings.num_frames - 1) % tf:
    raise ValueError(
        f"num_frames={settings.num_frames}: the Wan VAE decodes 1 + {tf}k frames; expected e.g. "
        f"{1 + tf * ((settings.num_frames - 1) // tf)} or {1 + tf * ((settings.num_frames - 1) // tf + 1)}")
  shape = patches.latent_shape(config, (settings.num_frames, settings.height, settings.width))
  patch = tuple(config.model.patch_size)
  if any(size % p for size, p in zip(shape[:3], patch, strict=True)):
    raise ValueError(
        f"sample size {settings.num_frames}x{settings.height}x{settings.width} gives latents (T', H', W') = "
        f"{shape[:3]}, not divisible by model.patch_size={patch}")
  return shape


def slug(prompt: str, max_len: int = 48) -> str:
  """File-name-safe short form of a prompt."""
  return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_len] or "prompt"


class Sampler:
  """Jitted sampling of one model config on a mesh: call with params and text embeddings."""

  def __init__(self, model, config: ml_collections.ConfigDict, settings: SampleSettings,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.settings = settings
    self.mesh = mesh
    self.rules = sharding_lib.logical_rules(config.mesh)
    self.shape = latent_shape(config, settings)
    self.divisor = sharding_lib.batch_size_divisor(mesh, self.rules)
    s = settings

    def run(params, noise, cond, uncond, given_latents=None, given_frames=None):
      velocity_fn = experts_lib.velocity_fn(
          lambda tree, *args: model.apply({"params": tree}, *args), params, config.model, config.diffusion)

      given = {}
      if given_latents is not None:
        given = dict(given_latents=given_latents,
                     given_cells=conditioning.cell_mask(given_frames, self.shape[0]),
                     given_tokens=conditioning.token_mask(given_frames, self.shape, config.model.patch_size))
      return samplers.sample(velocity_fn, noise, cond=cond, uncond=uncond, **s.sample_kwargs(config),
                             **given)

    batch = sharding_lib.batch_sharding(mesh, self.rules)
    replicated = sharding_lib.replicated(mesh)
    self._run = jax.jit(run, in_shardings=(None, batch, batch, batch), out_shardings=replicated)
    self._run_given = jax.jit(run, in_shardings=(None, batch, batch, batch, batch, batch),
                              out_shardings=replicated)

  def lower(self, params: Any, count: int) -> Any:
    """The sampler's call for `count` prompts, lowered for (abstract) `params`: ahead-of-time compiles."""
    batch = sharding_lib.batch_sharding(self.mesh, self.rules)
    spec = lambda shape: jax.ShapeDtypeStruct((count, *shape), jnp.float32, sharding=batch)
    text = (int(self.config.data.text_len), int(self.config.model.text_dim))
    with sharding_lib.mesh_context(self.mesh, self.rules):
      return self._run.lower(params, spec(self.shape), spec(text), spec(text))

  def check_given(self, given_latents: np.ndarray) -> int:
    """Latent frames of `given_latents` [k, H', W', C] or per sample [P, k, H', W', C] (the clips' first
    frames); raises unless they fit."""
    if given_latents.ndim == 5:
      given_latents = given_latents[0]
    k = given_latents.shape[0]
    pt = self.config.model.patch_size[0]
    if tuple(given_latents.shape[1:]) != tuple(self.shape[1:]):
      raise ValueError(f"given frames encode to latents {tuple(given_latents.shape)}; expected "
                       f"[k, {', '.join(map(str, self.shape[1:]))}] for the sample's size")
    if not 1 <= k < self.shape[0] or k % pt:
      raise ValueError(
          f"given frames fill {k} latent frames of the sample's {self.shape[0]}; expected at least one and "
          f"fewer than {self.shape[0]} (a frame must be left to generate), a multiple of "
          f"model.patch_size[0]={pt}")
    return k

  def entry_noise(self, seeds: Sequence[int | None], first_index: int = 0) -> np.ndarray:
    """Noise [P, T', H', W', C] of prompts first_index.. of an eval's entries: prompt i's is example 0 of
    its own seed where it has one, else example i of settings.seed (the same for any split into calls)."""
    noise = np.array(samplers.seeded_noise(self.settings.seed, (len(seeds), *self.shape), first_index))
    for index, seed in enumerate(seeds):
      if seed is not None:
        noise[index] = np.asarray(samplers.seeded_noise(int(seed), (1, *self.shape)))[0]
    return noise

  def call_size(self, requested: int) -> int:
    """Samples per sampler call for `requested` (0: one per data-parallel shard), rounded up to a
    multiple of the batch shards."""
    return -(-max(int(requested), 1) // self.divisor) * self.divisor

  def latents(self, params: Any, cond: np.ndarray, uncond: np.ndarray, seed: int | None = None,
              given_latents: np.ndarray | None = None, noise: np.ndarray | None = None,
              pad_to: int = 0) -> np.ndarray:
    """Sampled latents [P, T', H', W', C] for text embeddings cond / uncond [P, L, D] (numpy).

    `seed` overrides settings.seed; `noise` [P, T', H', W', C] replaces the seeded noise (prompts with
    seeds of their own, `entry_noise`). Noise is made outside the compiled loop, so it costs no compile.
    `given_latents` [k, H', W', C] (every sample) or [P, k, H', W', C] (one per sample): the samples
    start with these k latent frames, kept as given. The batch is padded to a multiple of the batch
    shards, and to at least `pad_to` (so the calls of one eval, its last short one too, compile once).
    """
    count = cond.shape[0]
    padded = max(-(-count // self.divisor) * self.divisor, pad_to)
    # Padding repeats the last prompt; prompt i's noise is seeded by i, so padding changes nothing.
    pad = lambda array: np.concatenate([array, np.repeat(array[-1:], padded - count, axis=0)])
    if noise is None:
      noise = samplers.seeded_noise(self.settings.seed if seed is None else seed, (padded, *self.shape))
    else:
      noise = pad(np.asarray(noise, np.float32))
    batch = sharding_lib.batch_sharding(self.mesh, self.rules)
    put = lambda array: jax.device_put(jnp.asarray(array, jnp.float32), batch)
    with sharding_lib.mesh_context(self.mesh, self.rules):
      if given_latents is None:
        result = self._run(params, put(noise), put(pad(cond)), put(pad(uncond)))
      else:
        k = self.check_given(given_latents)
        given = np.zeros((padded, *self.shape), np.float32)
        given[:, :k] = pad(given_latents) if given_latents.ndim == 5 else given_latents
        frames = jax.device_put(np.full((padded,), k, np.int32), batch)
        result = self._run_given(params, put(noise), put(pad(cond)), put(pad(uncond)), put(given), frames)
    return np.asarray(result.addressable_data(0))[:count]


def encode_prompts(text_encoder, prompts: Sequence[str], negative_prompt: str,
                   encode_empty_negative: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(cond, uncond) text embeddings [P, L, D]; an empty negative prompt is the zero (dropped) caption
  unless `encode_empty_negative`."""
  cond, _ = text_encoder.encode(list(prompts))
  if negative_prompt or encode_empty_negative:
    negative, _ = text_encoder.encode([negative_prompt])
    uncond = np.repeat(negative, len(prompts), axis=0)
  else:
    uncond = np.zeros_like(cond)  # what caption dropout trains the unconditional model on
  return cond, uncond


def encode_entries(text_encoder, entries: Sequence[Any], settings: SampleSettings,
                   extended: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(cond, uncond) [P, L, D] of prompt-suite entries: each prompt (or its extended text) and its own
  negative prompt where it has one, else settings.negative_prompt (`encode_prompts`'s rule)."""
  extended = extended or {}
  cond, uncond = encode_prompts(text_encoder, [extended.get(e.prompt, e.prompt) for e in entries],
                                settings.negative_prompt, settings.encode_empty_negative)
  # An entry's empty negative prompt follows the same rule: the zero caption unless encode_empty_negative.
  own = sorted({e.negative_prompt for e in entries
                if e.negative_prompt is not None and (e.negative_prompt or settings.encode_empty_negative)})
  negatives = dict(zip(own, text_encoder.encode(own)[0], strict=True)) if own else {}
  for index, entry in enumerate(entries):
    if entry.negative_prompt is not None:
      uncond[index] = negatives.get(entry.negative_prompt, 0.0)
  return cond, uncond


def decode_to_frames(vae, latents: np.ndarray, batch: int | None = None) -> tuple[list[np.ndarray], int]:
  """(VAE-decoded uint8 frames [F, H, W, 3] per sample, number of samples that had NaN / inf).

  Decodes `batch` samples per call (default: one per local device, which the VAE decodes data
  parallel), so the device holds one batch's decoder activations and the host one batch of float32
  pixels beside the uint8 videos: an eval's prompts at 720p x 81 are 0.9 GB of float32 pixels each.
  A diverged checkpoint's non-finite values are drawn as mid-grey rather than stopping the eval.
  """
  latents = np.asarray(latents, np.float32)
  batch = batch or jax.local_device_count()
  videos, nonfinite = [], 0
  for start in range(0, len(latents), batch):
    part = latents[start:start + batch]
    # A short last batch is padded with copies of its last sample (dropped after), so the VAE still
    # splits it one sample per device instead of decoding it whole on one.
    padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
    pixels = np.asarray(vae.decode(padded), np.float32)[:len(part)]
    nonfinite += int(sum(not np.all(np.isfinite(video)) for video in pixels))
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=-1.0)
    videos += [media.to_uint8(video) for video in pixels]
  return videos, nonfinite


def given_latents(vae, frames: np.ndarray) -> np.ndarray:
  """uint8 frames [F, H, W, 3] (an image: F = 1) -> their latents [k, H', W', C] through `vae`."""
  pixels = np.asarray(frames, np.float32)[None] / 127.5 - 1.0
  return np.asarray(vae.encode(pixels), np.float32)[0]


def sample_videos(config: ml_collections.ConfigDict, params: Any, prompts: Sequence[str],
                  settings: SampleSettings, mesh: jax.sharding.Mesh,
                  given_frames: np.ndarray | None = None) -> list[np.ndarray]:
  """Prompts -> uint8 videos [F, H, W, 3] through the configured text encoder, sampler and VAE.

  `given_frames` (uint8 [F_given, H, W, 3] at the sample's size): every video starts with them
  (image-to-video for one frame, extension for more) and continues from them.
  """
  from sora_jax.encoders import text_encoder as text_encoder_lib
  from sora_jax.encoders import vae as vae_lib
  from sora_jax.model.dit import DiT

  if not prompts or any(not p.strip() for p in prompts):
    raise ValueError(f"prompts {list(prompts)!r}: expected at least one non-empty prompt")
  sampler = Sampler(DiT(config.model), config, settings, mesh)  # checks the size first: no compile yet
  vae = vae_lib.get_vae(config)
  encoder = text_encoder_lib.get_text_encoder(config)
  given = None
  if given_frames is not None:
    given = given_latents(vae, given_frames)
    sampler.check_given(given)  # before the text encoder and the compile
  cond, uncond = encode_prompts(encoder, prompts, settings.negative_prompt, settings.encode_empty_negative)
  videos, nonfinite = decode_to_frames(vae, sampler.latents(params, cond, uncond, given_latents=given))
  if nonfinite:
    raise ValueError(f"{nonfinite} of {len(prompts)} samples have NaN or inf values: the checkpoint diverged")
  return videos
