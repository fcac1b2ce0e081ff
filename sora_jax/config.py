"""Loading config files and validating their cross-field rules.

Owns `load(path)`, `from_json(saved)` (a checkpoint's config, with fields added since filled in) and
`validate(config)`, one check per config group: every binary validates before it builds anything,
so a bad combination fails in milliseconds with one `ConfigError` naming the fields involved.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

import ml_collections

from sora_jax import choices, patches


class ConfigError(ValueError):
  """A config value, or a combination of values, that sora_jax cannot run."""


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f"{field}={value!r}; expected one of {allowed}")


def load(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file path (e.g. `configs/tiny.py`) and validates it."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; expected a path like configs/tiny.py")
  spec = importlib.util.spec_from_file_location(f"_sora_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  config = module.get_config()
  validate(config)
  return config


def _tuplify(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuplify(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuplify(v) for k, v in value.items()}
  return value


def from_json(data: dict[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from the JSON the trainer saves (lists back to tuples, as the config files use).

  Fields added to configs/base.py after the checkpoint was written take their defaults: the one place
  old checkpoints are brought up to date, so no reader needs a fallback for a field base.py declares.
  """
  from sora_jax.configs import base

  config = ml_collections.ConfigDict(_tuplify(data))
  defaults = base.get_config()
  for group in defaults:
    if group not in config:
      config[group] = defaults[group]
      continue
    for key in defaults[group]:
      if key not in config[group]:
        config[group][key] = defaults[group][key]
  config.mesh.logical_axis_rules = _with_activation_rules(tuple(config.mesh.logical_axis_rules))
  return config


# Activations once shared the parameters' names (and `act_embed` was the timestep MLP's width).
_ACTIVATION_NAMES_BEFORE = {"act_batch": "batch", "act_seq": "seq", "act_text_seq": "text_seq",
                            "act_heads": "heads", "act_head_dim": "head_dim", "act_mlp": "mlp",
                            "act_temb": "act_embed"}


def _with_activation_rules(rules: tuple) -> tuple:
  """Rules saved before activations had names of their own, given `act_*` rules placing them as then."""
  if any(rule[0] == "act_batch" for rule in rules):
    return rules
  old = {rule[0]: rule[1] for rule in reversed(rules)}  # the first rule of a name was the one applied
  added = [(name, old.get(before)) for name, before in _ACTIVATION_NAMES_BEFORE.items()]
  added.append(("act_embed", None))  # the residual stream found its mesh axes taken and stayed whole
  kept = [rule for rule in rules if rule[0] not in ("batch", "seq", "text_seq", "act_embed")]
  return tuple(added + kept)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError on the first rule the config breaks; with `num_devices`, checks the mesh too."""
  _validate_model(config)
  _validate_diffusion(config.diffusion)
  _validate_data(config)
  _validate_mesh(config, num_devices)
  _validate_train(config.train)
  _validate_lora(config)
  _validate_conditioning(config)
  _validate_eval(config.eval)
  _validate_checkpoint(config.checkpoint)


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """model.*: divisibility of heads, the RoPE split, patch size, choices and the prediction."""
  m = config.model
  if m.dim % m.num_heads:
    raise ConfigError(f"model.dim={m.dim} is not divisible by model.num_heads={m.num_heads}")
  hd = m.dim // m.num_heads
  t_part, h_part, w_part = patches.rope_split(hd)
  if hd % 2 or min(t_part, h_part, w_part) < 2:
    raise ConfigError(
        f"head_dim={hd} (model.dim/model.num_heads) is too small for the 3D RoPE split "
        f"(t, h, w) = {(t_part, h_part, w_part)}; expected an even head_dim >= 6")
  if not 0 <= m.scan_unroll <= m.num_layers:
    raise ConfigError(f"model.scan_unroll={m.scan_unroll}; expected 0 (all layers) to model.num_layers="
                      f"{m.num_layers}")
  if len(m.patch_size) != 3 or min(m.patch_size) < 1:
    raise ConfigError(f"model.patch_size={m.patch_size} must be three positive ints (p_t, p_h, p_w)")
  _check_choice("model.attention_backend", m.attention_backend, choices.ATTENTION_BACKENDS)
  _check_choice("model.remat_policy", m.remat_policy, choices.REMAT_POLICIES)
  _validate_sparse_attention(config)
  prediction = m.prediction
  _check_choice("model.prediction", prediction, choices.PREDICTIONS)
  if prediction == "x0" and m.in_channels != m.out_channels:
    raise ConfigError(
        f"model.prediction='x0' needs model.in_channels == model.out_channels (the noisy latents are the "
        f"input); got {m.in_channels} and {m.out_channels}")
  if prediction == "x0" and config.diffusion.num_train_timesteps != 1000:
    raise ConfigError(
        f"model.prediction='x0' reads sigma as timestep / 1000; diffusion.num_train_timesteps="
        f"{config.diffusion.num_train_timesteps} must be 1000")
  for field in ("param_dtype", "compute_dtype"):
    _check_choice(f"model.{field}", m[field], choices.DTYPES)
  _check_choice("model.residual_dtype", m.residual_dtype, choices.RESIDUAL_DTYPES)
  _validate_experts(config)


def _validate_sparse_attention(config: ml_collections.ConfigDict) -> None:
  """model.sparse_attention_*: keep in (0, 1], a 3D tile, a rule, and where tiling cannot apply."""
  m = config.model
  keep = m.sparse_attention_keep
  if not 0.0 < keep <= 1.0:
    raise ConfigError(
        f"model.sparse_attention_keep={keep}; expected a share of key tiles in (0, 1] (1 = dense)")
  if len(m.sparse_attention_tile) != 3 or min(m.sparse_attention_tile) < 1:
    raise ConfigError(f"model.sparse_attention_tile={m.sparse_attention_tile}; expected three positive ints "
                      f"(t, h, w) in patch tokens")
  _check_choice("model.sparse_attention_rule", m.sparse_attention_rule, choices.SPARSE_ATTENTION_RULES)
  if keep == 1.0:
    return
  if config.data.packing:
    raise ConfigError(f"model.sparse_attention_keep={keep} tiles each clip's own patch grid; packed rows "
                      f"(data.packing) are not tiled: use bucketed batches or keep = 1")
  if m.attention_backend in choices.CONTEXT_PARALLEL_BACKENDS:
    raise ConfigError(f"model.sparse_attention_keep={keep} needs each sequence on one device; "
                      f"model.attention_backend={m.attention_backend!r} splits it over the context axis")


def _validate_experts(config: ml_collections.ConfigDict) -> None:
  """model.experts, diffusion.boundary_ratio and train.train_experts."""
  experts, trained = config.model.experts, tuple(config.train.train_experts)
  if experts not in (1, 2):
    raise ConfigError(f"model.experts={experts}; expected 1 (one DiT) or 2 (Wan2.2 A14B's high- and "
                      f"low-noise experts)")
  if experts == 1:
    return
  ratio = config.diffusion.boundary_ratio
  if not 0.0 < ratio < 1.0:
    raise ConfigError(f"diffusion.boundary_ratio={ratio} with model.experts=2; expected a sigma in (0, 1)")
  if not trained or len(set(trained)) != len(trained) or any(e not in choices.EXPERTS for e in trained):
    raise ConfigError(f"train.train_experts={trained!r}; expected distinct experts of {choices.EXPERTS}")


def _validate_diffusion(d: ml_collections.ConfigDict) -> None:
  """diffusion.*: sigma density, shifts, sampler."""
  _check_choice("diffusion.sigma_sampling", d.sigma_sampling, choices.SIGMA_SAMPLINGS)
  if d.logit_std <= 0:
    raise ConfigError(f"diffusion.logit_std={d.logit_std} must be > 0")
  if not -1.0 <= d.mode_scale <= 2.0 / (math.pi - 2.0):
    raise ConfigError(f"diffusion.mode_scale={d.mode_scale} must lie in [-1, 2/(pi-2)] (a monotone density)")
  bad_token_range = d.max_shift_tokens <= d.base_shift_tokens or min(d.base_shift, d.max_shift) <= 0
  if d.shift_from_tokens and bad_token_range:
    raise ConfigError(
        f"diffusion.shift_from_tokens needs diffusion.max_shift_tokens={d.max_shift_tokens} > "
        f"diffusion.base_shift_tokens={d.base_shift_tokens} and diffusion.base_shift={d.base_shift}, "
        f"diffusion.max_shift={d.max_shift} > 0")
  if d.sample_steps < 1:
    raise ConfigError(f"diffusion.sample_steps={d.sample_steps} must be >= 1")
  _check_choice("diffusion.sampler", d.sampler, choices.SAMPLERS)
  if not 0.0 <= d.caption_dropout <= 1.0:
    raise ConfigError(f"diffusion.caption_dropout={d.caption_dropout} must lie in [0, 1]")
  if d.shift <= 0 or d.sample_shift <= 0:
    raise ConfigError(f"diffusion.shift={d.shift} and diffusion.sample_shift={d.sample_shift} must be > 0")
  if d.final_shift < 0:
    raise ConfigError(f"diffusion.final_shift={d.final_shift} must be > 0 (a shift), or 0 (off)")
  if d.final_shift > 0 and not 0.0 < d.final_shift_fraction <= 1.0:
    raise ConfigError(
        f"diffusion.final_shift_fraction={d.final_shift_fraction} must lie in (0, 1]: the share of "
        f"train.num_steps trained with diffusion.final_shift={d.final_shift}")


def _validate_data(config: ml_collections.ConfigDict) -> None:
  """data.*: encoders, VAE factors, buckets against the patch grid, reader and packing settings."""
  m = config.model
  data = config.data
  if data.text_encoder_position_bias_std < 0:
    raise ConfigError(
        f"data.text_encoder_position_bias_std={data.text_encoder_position_bias_std} must be >= 0 "
        f"(0 = umT5's initialisation)")
  _check_choice("data.vae", data.vae, choices.VAES)
  _check_choice("data.encoder_dtype", data.encoder_dtype, choices.ENCODER_DTYPES)
  tf = data.vae_temporal_factor
  if data.vae == "wan" and tf > 1:
    uneven = [tuple(b) for b in data.buckets if len(b) == 3 and (b[0] - 1) % tf]
    if uneven:
      raise ConfigError(
          f"data.buckets {uneven}: the Wan VAE encodes 1 + {tf}k frames (its first frame alone, then "
          f"chunks of {tf}); expected frame counts such as {1 + tf * 4}, {1 + tf * 8} or {1 + tf * 20}")
  _check_choice("data.validation", data.validation, choices.VALIDATION_MODES)
  _check_choice("data.record_dtype", data.record_dtype, choices.RECORD_DTYPES)
  if data.vae == "pixel" and m.in_channels != 3 * data.vae_spatial_factor ** 2:
    raise ConfigError(
        f"model.in_channels={m.in_channels} does not match the pixel VAE's "
        f"3*data.vae_spatial_factor**2={3 * data.vae_spatial_factor ** 2} channels")
  pt, ph, pw = m.patch_size
  for name in ("buckets", "image_buckets"):
    for bucket in data[name]:
      if len(bucket) != 3:
        raise ConfigError(f"data.{name} entry {bucket} must be (frames, height, width)")
      frames, height, width = bucket
      sf = data.vae_spatial_factor
      if height % sf or width % sf:
        raise ConfigError(
            f"data.{name} entry {tuple(bucket)}: height and width must be divisible by "
            f"data.vae_spatial_factor={sf}")
      lt, lh, lw, _ = patches.latent_shape(config, bucket)
      if lt % pt or lh % ph or lw % pw:
        raise ConfigError(
            f"data.{name} entry {tuple(bucket)} gives latent (T', H', W') = {(lt, lh, lw)}, "
            f"not divisible by model.patch_size={tuple(m.patch_size)}")
      if max(patches.grid((lt, lh, lw), m.patch_size)) > m.rope_max_seq_len:
        raise ConfigError(
            f"data.{name} entry {tuple(bucket)} has a patch grid larger than "
            f"model.rope_max_seq_len={m.rope_max_seq_len}")
  if not 0.0 <= data.original_caption_prob <= 1.0:
    raise ConfigError(f"data.original_caption_prob={data.original_caption_prob} must lie in [0, 1]")
  data_sources(data)
  if not 0.0 <= data.image_ratio <= 1.0:
    raise ConfigError(f"data.image_ratio={data.image_ratio} must lie in [0, 1]")
  if data.worker_count < 0 or data.prefetch_buffer < 1 or data.read_threads < 1:
    raise ConfigError(
        f"data.worker_count={data.worker_count}, data.prefetch_buffer={data.prefetch_buffer}, "
        f"data.read_threads={data.read_threads}: expected >= 0, >= 1, >= 1")
  if not 0 <= data.malloc_mmap_threshold_mb <= 1024:
    raise ConfigError(f"data.malloc_mmap_threshold_mb={data.malloc_mmap_threshold_mb}: expected 0 (off) "
                      "to 1024")
  if data.packing:
    if data.max_segments < 1:
      raise ConfigError(f"data.max_segments={data.max_segments} must be >= 1 when data.packing is on")
    clip_tokens = patches.bucket_tokens(config)
    if clip_tokens and data.token_budget < max(clip_tokens.values()):
      raise ConfigError(
          f"data.token_budget={data.token_budget} cannot hold one clip of every bucket (tokens per "
          f"clip: {clip_tokens}); expected data.token_budget >= {max(clip_tokens.values())}")


@dataclasses.dataclass(frozen=True)
class DataSource:
  """One prepared dataset of the training mixture (data.sources, or data.dir alone)."""

  name: str  # the last part of its path, made unique: names its metrics and eval results
  path: str
  weight: float  # share of batches (clips when packing); a mixture's weights sum to 1
  caption_dropout: float | None  # None: diffusion.caption_dropout


def data_sources(data: ml_collections.ConfigDict) -> list[DataSource]:
  """The datasets a run trains on: data.sources, or [data.dir] (empty when neither is set).

  Raises ConfigError naming the entry that is not (path, weight[, caption_dropout]).
  """
  entries = tuple(data.sources)
  if entries and data.dir:
    raise ConfigError(f"data.dir={data.dir!r} and data.sources are both set; data.dir is the "
                      "one-source shorthand of data.sources=((dir, 1.0),): set one of them")
  if not entries:
    return [DataSource(_source_name(data.dir), data.dir, 1.0, None)] if data.dir else []
  parsed = []
  for entry in entries:
    expected = "expected (path, weight) or (path, weight, caption_dropout) with weight > 0"
    if not isinstance(entry, tuple | list) or len(entry) not in (2, 3):
      raise ConfigError(f"data.sources entry {entry!r}; {expected}")
    path, weight, *dropout = entry
    if not isinstance(path, str) or not path:
      raise ConfigError(f"data.sources entry {tuple(entry)!r}: the path must be a non-empty string; "
                        f"{expected}")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) \
        or weight <= 0:
      raise ConfigError(f"data.sources entry {tuple(entry)!r}: weight {weight!r}; {expected}")
    if dropout and (isinstance(dropout[0], bool) or not isinstance(dropout[0], int | float)
                    or not 0.0 <= dropout[0] <= 1.0):
      raise ConfigError(f"data.sources entry {tuple(entry)!r}: caption_dropout {dropout[0]!r} must "
                        "lie in [0, 1]")
    parsed.append((path, float(weight), float(dropout[0]) if dropout else None))
  paths_seen = [path.rstrip("/") for path, _, _ in parsed]
  repeated = sorted({p for p in paths_seen if paths_seen.count(p) > 1})
  if repeated:
    raise ConfigError(f"data.sources names {repeated} more than once; expected each dataset once "
                      "(raise its weight instead)")
  names = [_source_name(path) for path, _, _ in parsed]
  names = [name if names.count(name) == 1 else f"{name}_{index}" for index, name in enumerate(names)]
  total = sum(weight for _, weight, _ in parsed)
  return [DataSource(name, path, weight / total, dropout)
          for name, (path, weight, dropout) in zip(names, parsed, strict=True)]


def _source_name(path: str) -> str:
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path.rstrip("/")))
  return name or "dataset"


def _validate_mesh(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  """mesh.*: axes and sizes; with `num_devices`, against the devices too."""
  m = config.model
  mesh = config.mesh
  if not (len(mesh.axes) == len(mesh.ici) == len(mesh.dcn)):
    raise ConfigError(
        f"mesh.axes={mesh.axes}, mesh.ici={mesh.ici} and mesh.dcn={mesh.dcn} must have the same length")
  for name in ("ici", "dcn"):
    sizes = mesh[name]
    if sum(1 for s in sizes if s == -1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh.{name}={sizes}: sizes must be positive, with at most one -1 (fill)")
  tensor = _axis_size(mesh, "tensor", num_devices)
  if tensor and m.num_heads % tensor:
    raise ConfigError(
        f"model.num_heads={m.num_heads} is not divisible by the tensor mesh axis size {tensor}")
  if num_devices is not None:
    _validate_mesh_against_devices(config, num_devices)


def _validate_train(t: ml_collections.ConfigDict) -> None:
  """train.*: steps and batch, schedule, spike guard, host state, EMA."""
  if t.num_steps < 0 or t.global_batch_size < 1 or t.grad_accum_steps < 1:
    raise ConfigError(
        f"train.num_steps={t.num_steps}, train.global_batch_size={t.global_batch_size}, "
        f"train.grad_accum_steps={t.grad_accum_steps}: expected >= 0, >= 1, >= 1")
  if t.global_batch_size % t.grad_accum_steps:
    raise ConfigError(
        f"train.global_batch_size={t.global_batch_size} is not divisible by "
        f"train.grad_accum_steps={t.grad_accum_steps}")
  _check_choice("train.schedule", t.schedule, choices.SCHEDULES)
  if t.schedule == "wsd" and not 0.0 < t.decay_fraction <= 1.0:
    raise ConfigError(f"train.decay_fraction={t.decay_fraction} with train.schedule='wsd'; expected a "
                      f"fraction of the steps in (0, 1]")
  if t.spike_sigmas < 0 or t.spike_warmup_steps < 1 or not 0 < t.spike_decay < 1:
    raise ConfigError(f"train.spike_sigmas={t.spike_sigmas}, "
                      f"train.spike_warmup_steps={t.spike_warmup_steps}, "
                      f"train.spike_decay={t.spike_decay}: expected >= 0 (0 = off), >= 1, in (0, 1)")
  if t.peer_timeout_s < 10:
    raise ConfigError(f"train.peer_timeout_s={t.peer_timeout_s}; expected >= 10 seconds")
  host_state = tuple(t.host_state)
  unknown = [part for part in host_state if part not in choices.HOST_STATE_PARTS]
  if unknown or len(set(host_state)) != len(host_state):
    raise ConfigError(
        f"train.host_state={host_state!r}; expected distinct parts of {choices.HOST_STATE_PARTS}")
  for decay in t.ema_decays:
    if not 0.0 < decay < 1.0:
      raise ConfigError(f"train.ema_decays entry {decay} must lie in (0, 1)")
  if t.init_optimizer not in choices.INIT_OPTIMIZER:
    raise ConfigError(f"train.init_optimizer={t.init_optimizer!r}; expected one of {choices.INIT_OPTIMIZER}")
  if t.init_weights != "raw" and not re.fullmatch(r"ema_\d*\.?\d+", str(t.init_weights)):
    raise ConfigError(f"train.init_weights={t.init_weights!r}; expected raw or ema_<decay>, e.g. ema_0.999")


def _validate_lora(config: ml_collections.ConfigDict) -> None:
  """train.lora_*: a rank, its scale, the target patterns, and what LoRA runs need."""
  t = config.train
  if t.lora_rank < 0:
    raise ConfigError(f"train.lora_rank={t.lora_rank}; expected 0 (off) or a positive rank")
  if not t.lora_rank:
    if "frozen" in tuple(t.host_state):
      raise ConfigError("train.host_state names 'frozen', the frozen weights of a LoRA run; "
                        "train.lora_rank is 0 (no LoRA)")
    return
  if "frozen" in tuple(t.host_state) and config.model.remat_policy == "none":
    raise ConfigError(
        "train.host_state=('frozen',...) streams each layer's frozen weights to the device as it runs; "
        "model.remat_policy='none' keeps every layer's copy there for the backward pass, so nothing is "
        "saved: use a remat policy ('full', 'offload', ...)")
  _check_choice("train.lora_base_dtype", t.lora_base_dtype, choices.LORA_BASE_DTYPES)
  if t.lora_alpha == 0:
    raise ConfigError("train.lora_alpha=0 scales every adapter to nothing; expected > 0, or < 0 for the rank")
  targets = tuple(t.lora_targets)
  if not targets:
    raise ConfigError("train.lora_targets is empty; expected regexes of the projections to adapt, e.g. "
                      "('attn[12]/to_(q|k|v|out)$',)")
  for pattern in targets:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as error:
      raise ConfigError(f"train.lora_targets entry {pattern!r} is not a regex ({error})") from None
  if not t.init_from:
    raise ConfigError(f"train.lora_rank={t.lora_rank} trains adapters on frozen weights; set "
                      "train.init_from to them (a Wan pipeline directory or a run, RUN[@STEP])")
  if config.model.experts != 1:
    raise ConfigError(f"train.lora_rank={t.lora_rank} with model.experts={config.model.experts}: LoRA "
                      "trains one DiT; the two-expert A14B is not supported")
  if t.init_optimizer != "restart":
    raise ConfigError(f"train.init_optimizer={t.init_optimizer!r} with train.lora_rank={t.lora_rank}: "
                      "adapters start fresh; expected 'restart'")


def _validate_eval(e: ml_collections.ConfigDict) -> None:
  """eval.*: held-out clips, continuation, adherence prompts."""
  if e.continue_clips < 0 or not e.continue_frames or any(
      not isinstance(k, int) or k < 1 for k in e.continue_frames):
    raise ConfigError(f"eval.continue_clips={e.continue_clips}, eval.continue_frames="
                      f"{tuple(e.continue_frames)}: expected >= 0 clips (0 = off) and positive latent "
                      f"frame counts")
  if e.num_examples < 1 or e.batch_size < 1 or e.sigma_grid < 1 or e.adherence_prompts < 0:
    raise ConfigError(
        f"eval.num_examples={e.num_examples}, eval.batch_size={e.batch_size}, eval.sigma_grid="
        f"{e.sigma_grid} must be >= 1 and eval.adherence_prompts={e.adherence_prompts} >= 0")
  if e.sample_batch_size < 0:
    raise ConfigError(f"eval.sample_batch_size={e.sample_batch_size}: expected prompts per sampler call "
                      f">= 1, or 0 for one per batch shard")
  if e.fvd_reference_clips < 2 or e.clip_frames < 1:
    raise ConfigError(f"eval.fvd_reference_clips={e.fvd_reference_clips} must be >= 2 (a covariance needs "
                      f"two clips) and eval.clip_frames={e.clip_frames} >= 1")


def _validate_checkpoint(c: ml_collections.ConfigDict) -> None:
  """checkpoint.*: save interval, retention, failed-save limit."""
  if c.every_steps < 1 or c.keep_last < 1 or c.keep_every < 0:
    raise ConfigError(
        f"checkpoint.every_steps={c.every_steps}, checkpoint.keep_last={c.keep_last} must be >= 1 "
        f"and checkpoint.keep_every={c.keep_every} >= 0")
  if c.read_attempts < 2 or c.read_backoff_s < 0:
    raise ConfigError(
        f"checkpoint.read_attempts={c.read_attempts}, checkpoint.read_backoff_s={c.read_backoff_s}: expected "
        f">= 2 (a damaged step is one that fails the same way twice) and >= 0 seconds")
  if c.max_failed_saves < 1:
    raise ConfigError(f"checkpoint.max_failed_saves={c.max_failed_saves}; expected >= 1")


def _validate_conditioning(config: ml_collections.ConfigDict) -> None:
  """train.condition_prob / condition_frames: a probability, and frame counts some video bucket can give."""
  t = config.train
  prob, frames = t.condition_prob, tuple(t.condition_frames)
  if not 0.0 <= prob <= 1.0:
    raise ConfigError(
        f"train.condition_prob={prob}; expected a probability in [0, 1] (0 = text-to-video only)")
  pt = config.model.patch_size[0]
  if not frames or any(not isinstance(k, int) or k < 1 or k % pt for k in frames):
    raise ConfigError(f"train.condition_frames={frames}; expected positive latent frame counts, multiples "
                      f"of the temporal patch size model.patch_size[0]={pt}")
  if prob == 0.0:
    return
  if config.data.packing:
    raise ConfigError(f"train.condition_prob={prob} with data.packing: given frames are not supported in "
                      f"packed rows yet; use bucketed batches (data.packing=False)")
  video_frames = [patches.latent_shape(config, bucket)[0] for bucket in config.data.buckets]
  if not any(t_ > max(frames) for t_ in video_frames):
    raise ConfigError(
        f"train.condition_frames={frames}: no video bucket has more than {max(frames)} latent frames "
        f"(latent frames per bucket: {video_frames}); a conditioned clip needs frames left to denoise")


def resolved_mesh(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, tuple[int, int]]:
  """Checks mesh.ici / mesh.dcn against `num_devices` and resolves their -1 entries: {axis: (ici, dcn)}.

  The arithmetic lives here because validation needs it without jax; sora_jax.parallel.mesh's
  `resolved_sizes` is the entry point the rest of the code calls.
  """
  _validate_mesh_against_devices(config, num_devices)
  return _resolved(config.mesh, num_devices)


def _axis_size(mesh, axis: str, num_devices: int | None) -> int | None:
  if axis not in mesh.axes:
    return 1
  i = list(mesh.axes).index(axis)
  if mesh.ici[i] == -1 or mesh.dcn[i] == -1:
    if num_devices is None:
      return None
    ici, dcn = _resolved(mesh, num_devices)[axis]
    return ici * dcn
  return mesh.ici[i] * mesh.dcn[i]


def _resolved(mesh, num_devices: int) -> dict[str, tuple[int, int]]:
  dcn = list(mesh.dcn)
  num_slices = math.prod(s for s in dcn if s != -1)
  if -1 in dcn:
    dcn[dcn.index(-1)] = 1
  per_slice = num_devices // max(num_slices, 1)
  ici = list(mesh.ici)
  fixed = math.prod(s for s in ici if s != -1)
  if -1 in ici:
    ici[ici.index(-1)] = per_slice // fixed
  return {axis: (ici[i], dcn[i]) for i, axis in enumerate(mesh.axes)}


def _validate_mesh_against_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  mesh = config.mesh
  num_slices = math.prod(s for s in mesh.dcn if s != -1)
  if num_devices % num_slices:
    raise ConfigError(f"mesh.dcn={mesh.dcn} needs a multiple of {num_slices} devices; found {num_devices}")
  per_slice = num_devices // num_slices
  fixed = math.prod(s for s in mesh.ici if s != -1)
  if (-1 not in mesh.ici and fixed != per_slice) or per_slice % fixed:
    raise ConfigError(
        f"mesh.ici={mesh.ici} (x mesh.dcn={mesh.dcn}) does not divide the {num_devices} devices: "
        f"expected the product of mesh.ici to be {per_slice}")
  sizes = _resolved(mesh, num_devices)
  tensor = sizes.get("tensor", (1, 1))
  if config.model.num_heads % (tensor[0] * tensor[1]):
    raise ConfigError(
        f"model.num_heads={config.model.num_heads} is not divisible by the tensor mesh axis size "
        f"{tensor[0] * tensor[1]}")
  context = math.prod(sizes.get("context", (1, 1)))
  backend = config.model.attention_backend
  if backend == "auto" and context > 1:
    backend = "ring"  # what `auto` runs when the sequence is split over `context`
  if context > 1 and config.model.sparse_attention_keep < 1:
    raise ConfigError(f"model.sparse_attention_keep={config.model.sparse_attention_keep} needs each "
                      f"sequence on one device; the mesh splits it over a context axis of {context}")
  if backend in choices.CONTEXT_PARALLEL_BACKENDS and context > 1:
    # Self-attention's sequence is split evenly over `context`: a packed row, or each bucket's clip.
    lengths = ({"data.token_budget": config.data.token_budget} if config.data.packing
               else {str(bucket): tokens for bucket, tokens in patches.bucket_tokens(config).items()})
    uneven = {name: tokens for name, tokens in lengths.items() if tokens % context}
    if uneven:
      raise ConfigError(
          f"model.attention_backend={backend!r} splits each sequence over the context mesh axis ({context}); "
          f"these token counts are not divisible by it: {uneven}")
    if backend == "all_to_all" and config.model.num_heads % (tensor[0] * tensor[1] * context):
      raise ConfigError(
          f"model.attention_backend='all_to_all' needs model.num_heads={config.model.num_heads} divisible "
          f"by tensor x context = {tensor[0] * tensor[1] * context} (or use 'ring')")
  batch_axes = math.prod(a * b for axis, (a, b) in sizes.items() if axis in ("data", "fsdp"))
  micro = config.train.global_batch_size // config.train.grad_accum_steps
  if micro % batch_axes:
    raise ConfigError(
        f"train.global_batch_size={config.train.global_batch_size} / train.grad_accum_steps="
        f"{config.train.grad_accum_steps} = {micro} is not divisible by the data*fsdp mesh size "
        f"{batch_axes}")
