"""The Wan2.1 spacetime-patch diffusion transformer (DiT) as a Flax Linen module.

Owns `DiT` (patch embedding, timestep/text conditioning, scanned blocks, output head), its
`Block`, the remat policies and the parameter layout the export key map mirrors; the token layout
is sora_jax/patches.py.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from sora_jax import patches
from sora_jax.model import attention as attention_lib
from sora_jax.model import context_parallel, rope
from sora_jax.model import lora as lora_lib
from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model.layers import (
  DenseGeneral,
  LayerNorm,
  RMSNorm,
  constrain,
  dtype_of,
  logical,
  scale_features,
)
from sora_jax.model.layers import timestep_embedding as sinusoidal_embedding

_EMBED_INIT = nn.initializers.normal(stddev=0.02)
# The residual stream entering a block: the one activation the `offload` remat policy keeps (in host memory).
BLOCK_INPUT = "block_input"


def remat_policy(name: str):
  """The jax.checkpoint policy of `model.remat_policy`, or None for no rematerialisation."""
  policies = {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      # Weight matmuls only: attention's batched QK^T/PV products are [B, H, N, N]-sized and cheap
      # to recompute relative to their memory.
      "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
          names_which_can_be_saved=(), names_which_can_be_offloaded=(BLOCK_INPUT,),
          offload_src="device", offload_dst="pinned_host"),
      "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }
  if name not in policies:
    raise ValueError(f"model.remat_policy={name!r}; expected one of {tuple(policies)}")
  return policies[name]


class Attention(nn.Module):
  """Wan attention: q/k/v projections, RMSNorm on q and k across heads, optional RoPE, out proj."""

  config: ml_collections.ConfigDict
  is_cross: bool
  lora: lora_lib.LoraSpec | None = None
  sparse: sparse_lib.TileLayout | None = None  # self-attention over tiled tokens (sparse_attention.py)

  @nn.compact
  def __call__(self, hidden: jax.Array, context: jax.Array, cos=None, sin=None,
               query_segment_ids=None, kv_segment_ids=None) -> jax.Array:
    cfg = self.config
    heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
    dense = lambda name, in_shape, out_shape, axes: DenseGeneral(
        in_shape=in_shape, out_shape=out_shape, kernel_axes=axes, dtype=dtype_of(cfg.compute_dtype),
        param_dtype=dtype_of(cfg.param_dtype), lora=self.lora, name=name)
    qkv_axes = ("embed", "heads", "head_dim")
    query = dense("to_q", (cfg.dim,), (heads, head_dim), qkv_axes)(hidden)
    key = dense("to_k", (cfg.dim,), (heads, head_dim), qkv_axes)(context)
    value = dense("to_v", (cfg.dim,), (heads, head_dim), qkv_axes)(context)
    if cfg.qk_norm:
      norm = lambda name: RMSNorm((heads, head_dim), ("heads", "head_dim"), eps=cfg.eps,
                                  param_dtype=dtype_of(cfg.param_dtype), name=name)
      query, key = norm("norm_q")(query), norm("norm_k")(key)
    kv_seq = "act_text_seq" if self.is_cross else "act_seq"
    query = constrain(query, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
    key = constrain(key, ("act_batch", kv_seq, "act_heads", "act_head_dim"))
    value = constrain(value, ("act_batch", kv_seq, "act_heads", "act_head_dim"))
    if cos is not None:
      query, key = rope.apply_rope(query, cos, sin), rope.apply_rope(key, cos, sin)
    backend = cfg.attention_backend
    if self.is_cross and backend == "auto":
      backend = attention_lib.resolve_backend(backend, query, key)
    if self.is_cross and backend in context_parallel.BACKENDS:
      # Text keys are few and not split over `context`: each sequence shard attends to all of them.
      backend = "xla"
    attended = attention_lib.attention(
        query, key, value, backend=backend, query_segment_ids=query_segment_ids,
        kv_segment_ids=kv_segment_ids, sparse=None if self.is_cross else self.sparse)
    attended = constrain(attended, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
    return dense("to_out", (heads, head_dim), (cfg.dim,), ("heads", "head_dim", "embed"))(attended)


class FeedForward(nn.Module):
  """Linear -> GELU(tanh) -> Linear, in the compute dtype."""

  config: ml_collections.ConfigDict
  lora: lora_lib.LoraSpec | None = None

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.config
    kwargs = dict(dtype=dtype_of(cfg.compute_dtype), param_dtype=dtype_of(cfg.param_dtype), lora=self.lora)
    inner = DenseGeneral((cfg.dim,), (cfg.ffn_dim,), ("embed", "mlp"), name="proj_in", **kwargs)(hidden)
    inner = constrain(nn.gelu(inner, approximate=True), ("act_batch", "act_seq", "act_mlp"))
    return DenseGeneral((cfg.ffn_dim,), (cfg.dim,), ("mlp", "embed"), name="proj_out", **kwargs)(inner)


class Block(nn.Module):
  """One Wan block: modulated self-attention, normed cross-attention, modulated FFN.

  The residual stream `hidden [B, N, D]` enters and leaves in `model.residual_dtype` (fp32 as Wan's amp
  autocast leaves it, or bf16) and is fp32 inside the block; matmuls run in the compute dtype.
  Returns `(hidden, None)` so it scans over layers.
  """

  config: ml_collections.ConfigDict
  lora: lora_lib.LoraSpec | None = None
  sparse: sparse_lib.TileLayout | None = None

  @nn.compact
  def __call__(self, hidden, context, modulation, cos, sin, segment_ids, text_segment_ids):
    cfg = self.config
    compute = dtype_of(cfg.compute_dtype)
    residual = hidden.dtype  # model.residual_dtype between blocks; the block's own adds run in fp32
    hidden = checkpoint_name(hidden, BLOCK_INPUT).astype(jnp.float32)
    table = self.param(
        "scale_shift_table",
        logical(lambda rng, shape, dtype: jax.random.normal(rng, shape, dtype) / math.sqrt(cfg.dim),
                ("modulation", "embed")),
        (6, cfg.dim), dtype_of(cfg.param_dtype))
    # modulation: [B, 6, D] (one timestep per clip) or [B, N, 6, D] (per token); fp32 throughout.
    mod = table.astype(jnp.float32) + modulation
    if mod.ndim == 3:
      mod = mod[:, None]
    shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn = (
        mod[:, :, i] for i in range(6))

    normed = scale_features(LayerNorm(eps=cfg.eps, name="norm1")(hidden), 1 + scale_attn) + shift_attn
    attended = Attention(cfg, is_cross=False, lora=self.lora, sparse=self.sparse, name="attn1")(
        normed.astype(compute), normed.astype(compute), cos, sin, segment_ids, segment_ids)
    hidden = hidden + scale_features(attended.astype(jnp.float32), gate_attn)
    hidden = constrain(hidden, ("act_batch", "act_seq", "act_embed"))

    if cfg.cross_attn_norm:
      normed = LayerNorm(eps=cfg.eps, affine=True, param_dtype=dtype_of(cfg.param_dtype),
                         name="norm2")(hidden)
    else:
      normed = hidden
    text_query_ids = segment_ids if text_segment_ids is not None else None
    attended = Attention(cfg, is_cross=True, lora=self.lora, name="attn2")(
        normed.astype(compute), context, None, None, text_query_ids, text_segment_ids)
    hidden = hidden + attended.astype(jnp.float32)

    normed = scale_features(LayerNorm(eps=cfg.eps, name="norm3")(hidden), 1 + scale_ffn) + shift_ffn
    ffn = FeedForward(cfg, lora=self.lora, name="ffn")(normed.astype(compute))
    hidden = hidden + scale_features(ffn.astype(jnp.float32), gate_ffn)
    return constrain(hidden.astype(residual), ("act_batch", "act_seq", "act_embed")), None


def absolute_position_embedding(positions: Any, dim: int) -> jax.Array:
  """Fixed sin-cos features `[..., N, dim]` of patch-grid positions `[..., N, 3]` (t, h, w).

  The width is split over (t, h, w) as Wan splits RoPE channels; each part is the sinusoidal timestep
  embedding of that coordinate (periods from 2*pi up to 10000 * 2*pi).
  """
  parts = patches.rope_split(dim)
  positions = jnp.asarray(positions, jnp.float32)
  return jnp.concatenate(
      [sinusoidal_embedding(positions[..., axis], width) for axis, width in enumerate(parts)], axis=-1)


# sigma below which an x0-predicting model's velocity is not amplified further: 1/sigma would turn
# the rare near-clean training example into a gradient spike. Samplers' last steps stay above it.
X0_MIN_SIGMA = 0.02


def velocity_from_x0(noisy: jax.Array, x0: jax.Array, timesteps: jax.Array) -> jax.Array:
  """Velocity (x_t - x0) / sigma of tokens `[B, N, D]` at timesteps `[B]` or `[B, N]` (= 1000 * sigma)."""
  sigma = jnp.asarray(timesteps, jnp.float32) / 1000.0
  sigma = sigma.reshape(sigma.shape + (1,) * (noisy.ndim - sigma.ndim))
  return (noisy.astype(jnp.float32) - x0) / jnp.maximum(sigma, X0_MIN_SIGMA)


class DiT(nn.Module):
  """Wan2.1 DiT: latents `[B, T, H, W, C]`, timesteps `[B]` or `[B, N]` (0..1000), text `[B, L, D_text]`
  -> velocity `[B, T, H, W, C_out]` fp32.

  Packing: pass `positions [B, N, 3]` (patch-grid t, h, w per token) with latents given as patch tokens
  `[B, N, p_t·p_h·p_w·C]` (`patches.patchify`); `segment_ids [B, N]` keep self-attention within a clip
  (0 = padding), and `text_segment_ids [B, L]` tie each text token to a clip for cross-attention
  (text of several clips concatenated along L). The output then is `[B, N, p_t·p_h·p_w·C_out]`.
  `lora` adds low-rank adapters to the projections it targets (sora_jax/model/lora.py).
  `model.sparse_attention_keep` < 1 makes self-attention tile-sparse (sora_jax/model/sparse_attention.py)
  for unpacked input.
  """

  config: ml_collections.ConfigDict
  lora: lora_lib.LoraSpec | None = None

  @nn.compact
  def __call__(self, latents: jax.Array, timesteps: jax.Array, text_embeds: jax.Array, *,
               segment_ids: jax.Array | None = None, positions: Any = None,
               text_segment_ids: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    compute, param_dtype = dtype_of(cfg.compute_dtype), dtype_of(cfg.param_dtype)
    patch_size = tuple(cfg.patch_size)
    patch_volume = math.prod(patch_size)
    head_dim = cfg.dim // cfg.num_heads
    tokens, grid = self._tokens(latents, positions)
    batch, num_tokens = tokens.shape[:2]
    self._check_conditioning(batch, num_tokens, timesteps, text_embeds, segment_ids, text_segment_ids)
    # Tile-sparse self-attention runs on tokens in tile order: permuted here once, undone at the end.
    layout = None if grid is None else sparse_lib.model_plan(cfg, grid)
    if layout is not None:
      tokens = sparse_lib.to_tiles(layout, tokens)
      timesteps = timesteps if timesteps.ndim == 1 else sparse_lib.to_tiles(layout, timesteps)
      segment_ids = None if segment_ids is None else sparse_lib.to_tiles(layout, segment_ids)
      positions = layout.positions() if positions is None else sparse_lib.to_tiles(
          layout, jnp.asarray(positions))

    if positions is None:
      cos, sin = rope.frequencies(patches.grid_positions(grid), head_dim, cfg.rope_max_seq_len,
                                  cfg.rope_theta)
    else:
      cos, sin = rope.frequencies(positions, head_dim, cfg.rope_max_seq_len, cfg.rope_theta)

    hidden = DenseGeneral(
        patch_size + (cfg.in_channels,), (cfg.dim,), (None, None, None, "channels", "embed"),
        dtype=compute, param_dtype=param_dtype, lora=self.lora,
        name="patch_embedding")(tokens.astype(compute))
    hidden = hidden.astype(jnp.float32)
    if cfg.abs_pos_embedding:
      # RoPE tells a token only its offset to another token; absolute (t, h, w) lets even a model
      # with diffuse attention place content by frame and position (e.g. the arrow of time).
      grid_positions = patches.grid_positions(grid) if positions is None else positions
      hidden = hidden + absolute_position_embedding(grid_positions, cfg.dim)
    hidden = constrain(hidden, ("act_batch", "act_seq", "act_embed"))

    # Timestep conditioning stays fp32: it scales every residual update.
    fp32 = dict(dtype=jnp.float32, param_dtype=param_dtype, kernel_init=_EMBED_INIT)
    time_features = sinusoidal_embedding(timesteps, cfg.freq_dim)
    # The time MLP's activations are batch-sharded like the tokens they modulate; left alone they
    # take their kernels' `embed` sharding, which XLA turns into the tokens' layout only by
    # replicating them first.
    time_axes = ("act_batch", "act_temb") if timesteps.ndim == 1 else ("act_batch", "act_seq", "act_temb")
    temb = DenseGeneral((cfg.freq_dim,), (cfg.dim,), (None, "embed"), lora=self.lora, name="time_embedder_1",
                        **fp32)(time_features)
    temb = DenseGeneral((cfg.dim,), (cfg.dim,), ("mlp", "embed"), lora=self.lora, name="time_embedder_2",
                        **fp32)(nn.silu(constrain(temb, time_axes)))
    temb = constrain(temb, time_axes)
    modulation = DenseGeneral((cfg.dim,), (6 * cfg.dim,), ("embed", "mlp"), dtype=jnp.float32,
                              param_dtype=param_dtype, lora=self.lora, name="time_proj")(nn.silu(temb))
    modulation = modulation.reshape(*modulation.shape[:-1], 6, cfg.dim)

    text_kwargs = dict(dtype=compute, param_dtype=param_dtype, kernel_init=_EMBED_INIT)
    text_kwargs = dict(text_kwargs, lora=self.lora)
    context = DenseGeneral((cfg.text_dim,), (cfg.dim,), ("text_embed", "embed"), name="text_embedder_1",
                           **text_kwargs)(text_embeds)
    context = DenseGeneral((cfg.dim,), (cfg.dim,), ("mlp", "embed"), name="text_embedder_2",
                           **text_kwargs)(nn.gelu(context, approximate=True))
    context = constrain(context.astype(compute), ("act_batch", "act_text_seq", "act_embed"))

    # The residual stream between blocks: fp32 as Wan's amp autocast keeps it, or bf16 as diffusers'
    # bf16 pipeline does (each block computes its adds in fp32 and stores the sum in bf16).
    hidden = hidden.astype(dtype_of(cfg.get("residual_dtype", "float32")))
    hidden = self._blocks(hidden, context, modulation, cos, sin, segment_ids, text_segment_ids, layout)
    hidden = hidden.astype(jnp.float32)

    head_table = self.param(
        "scale_shift_table",
        logical(lambda rng, shape, dtype: jax.random.normal(rng, shape, dtype) / math.sqrt(cfg.dim),
                ("modulation", "embed")),
        (2, cfg.dim), param_dtype)
    # temb [B, D] or [B, N, D] -> shift/scale broadcast over tokens.
    head_mod = head_table.astype(jnp.float32) + temb[..., None, :]
    if head_mod.ndim == 3:
      head_mod = head_mod[:, None]
    shift, scale = head_mod[:, :, 0], head_mod[:, :, 1]
    normed = scale_features(LayerNorm(eps=cfg.eps, name="norm_out")(hidden), 1 + scale) + shift
    output = DenseGeneral(
        (cfg.dim,), (patch_volume * cfg.out_channels,), ("embed", "channels"), dtype=compute,
        param_dtype=param_dtype, kernel_init=nn.initializers.zeros_init(), lora=self.lora,
        name="proj_out")(normed.astype(compute))
    output = output.astype(jnp.float32)
    if cfg.prediction == "x0":
      output = velocity_from_x0(tokens.reshape(output.shape), output, timesteps)
    if layout is not None:
      output = sparse_lib.from_tiles(layout, output)
    if grid is None:
      return output
    return patches.unpatchify(output, grid, patch_size)

  def _tokens(self, latents: jax.Array, positions: Any) -> tuple[jax.Array, tuple[int, int, int] | None]:
    """Patch tokens `[B, N, p_t, p_h, p_w, C]` and the patch grid (None for packed input)."""
    cfg = self.config
    patch_size = tuple(cfg.patch_size)
    if positions is not None and latents.ndim == 3:
      batch, num_tokens, width = latents.shape
      if width != math.prod(patch_size) * cfg.in_channels:
        raise ValueError(
            f"packed latents {latents.shape}: expected [B, N, p_t*p_h*p_w*C] = "
            f"[B, N, {math.prod(patch_size) * cfg.in_channels}]")
      if tuple(positions.shape) != (batch, num_tokens, 3):
        raise ValueError(
            f"positions {tuple(positions.shape)}: expected [B, N, 3] = [{batch}, {num_tokens}, 3]")
      return latents.reshape(batch, num_tokens, *patch_size, cfg.in_channels), None
    if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
      raise ValueError(
          f"latents {latents.shape}: expected [B, T, H, W, C] with C = model.in_channels = "
          f"{cfg.in_channels} (or [B, N, p_t*p_h*p_w*C] patch tokens together with positions)")
    grid = patches.grid(latents.shape[1:], patch_size)
    if positions is not None and tuple(positions.shape) != (latents.shape[0], math.prod(grid), 3):
      raise ValueError(
          f"positions {tuple(positions.shape)}: expected [B, N, 3] = "
          f"[{latents.shape[0]}, {math.prod(grid)}, 3]")
    tokens = patches.patchify(latents, patch_size)
    return tokens.reshape(*tokens.shape[:2], *patch_size, cfg.in_channels), grid

  def _check_conditioning(self, batch, num_tokens, timesteps, text_embeds, segment_ids, text_segment_ids):
    cfg = self.config
    if tuple(timesteps.shape) not in ((batch,), (batch, num_tokens)):
      raise ValueError(
          f"timesteps {tuple(timesteps.shape)}: expected [B] = [{batch}] or per token [B, N] = "
          f"[{batch}, {num_tokens}]")
    if text_embeds.ndim != 3 or text_embeds.shape[0] != batch or text_embeds.shape[-1] != cfg.text_dim:
      raise ValueError(
          f"text_embeds {text_embeds.shape}: expected [B, L, D_text] = [{batch}, L, {cfg.text_dim}] "
          f"(model.text_dim)")
    if segment_ids is not None and tuple(segment_ids.shape) != (batch, num_tokens):
      raise ValueError(f"segment_ids {tuple(segment_ids.shape)}: expected [B, N] = [{batch}, {num_tokens}]")
    if text_segment_ids is not None:
      if segment_ids is None:
        raise ValueError("text_segment_ids needs segment_ids (which clip each video token belongs to)")
      if tuple(text_segment_ids.shape) != tuple(text_embeds.shape[:2]):
        raise ValueError(
            f"text_segment_ids {tuple(text_segment_ids.shape)}: expected [B, L] = "
            f"{tuple(text_embeds.shape[:2])}")

  def _blocks(self, hidden, context, modulation, cos, sin, segment_ids, text_segment_ids, layout):
    cfg = self.config
    block_cls = Block
    policy_name = cfg.remat_policy
    if policy_name != "none":
      # Under scan, CSE across iterations is impossible anyway, so prevent_cse only costs speed.
      block_cls = nn.remat(Block, policy=remat_policy(policy_name), prevent_cse=not cfg.scan_layers)
    cos, sin = jnp.asarray(cos), jnp.asarray(sin)
    args = (context, modulation, cos, sin, segment_ids, text_segment_ids)
    if cfg.scan_layers:
      scanned = nn.scan(
          block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,) * len(args), length=cfg.num_layers,
          unroll=cfg.num_layers if cfg.scan_unroll == 0 else cfg.scan_unroll,
          metadata_params={nn.PARTITION_NAME: "layers"})
      hidden, _ = scanned(cfg, lora=self.lora, sparse=layout, name="blocks")(hidden, *args)
      return hidden
    for index in range(cfg.num_layers):
      hidden, _ = block_cls(cfg, lora=self.lora, sparse=layout, name=f"blocks_{index}")(hidden, *args)
    return hidden


def init_params(config: ml_collections.ConfigDict, rng: jax.Array, latent_shape, text_len: int,
                batch: int = 1) -> dict:
  """Initial parameters (boxed with logical names stripped) for `latent_shape` (T, H, W, C) inputs."""
  model = DiT(config)
  latents = jnp.zeros((batch, *latent_shape), jnp.float32)
  timesteps = jnp.zeros((batch,), jnp.float32)
  text_embeds = jnp.zeros((batch, text_len, config.text_dim), jnp.float32)
  # Jitted: an eager Flax init dispatches every op separately and is slow even for tiny models.
  init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, latents, timesteps, text_embeds)["params"]))
  return init(rng)


def abstract_params(config: ml_collections.ConfigDict, latent_shape=None, text_len: int = 8,
                    lora: lora_lib.LoraSpec | None = None) -> dict:
  """Parameter shapes/dtypes (`jax.ShapeDtypeStruct`, with logical boxes) without allocating memory."""
  if latent_shape is None:
    latent_shape = (*config.patch_size, config.in_channels)
  model = DiT(config, lora=lora)
  latents = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
  timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
  text_embeds = jax.ShapeDtypeStruct((1, text_len, config.text_dim), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), latents, timesteps, text_embeds)
  return variables["params"]


def count_params(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))
