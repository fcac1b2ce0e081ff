"""Analytic FLOP count of the DiT: matmuls and attention, per example, forward and training.

Owns `forward_flops_per_example` and `train_flops_per_example`, the numerator of the trainer's MFU.
A multiply-add counts 2 FLOPs; norms, activations and softmax are left out (a few percent at most).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections

from sora_jax import patches
from sora_jax.model import sparse_attention as sparse_lib


def flops_breakdown(model: ml_collections.ConfigDict, latent_shape: Sequence[int], text_len: int,
                    per_token_timesteps: bool = False, hardware: bool = False) -> dict[str, float]:
  """Forward FLOPs of one example by part: `embed` (inputs), `blocks`, `attention` (the part of blocks
  in QK^T and PV), `head`, and `no_input_grad` (first-layer matmuls whose input needs no gradient);
  `sparse_kept` is the share of self-attention's tile pairs computed (1 = dense), already applied to
  `attention` and `blocks`. The blocks count real tokens only (a tiled sequence's padding is not model
  work) unless `hardware`: then they count the padded tiles the chips compute on too."""
  tokens = patches.num_tokens(latent_shape, model.patch_size)
  layout = sparse_lib.model_plan(model, patches.grid(latent_shape, model.patch_size))
  kept = 1.0 if layout is None else layout.kept_fraction
  # The sequence the blocks run on: a tiled clip's padded tiles, for the FLOPs the chips compute.
  rows = layout.padded_tokens if hardware and layout is not None else tokens
  dim, ffn, layers = model.dim, model.ffn_dim, model.num_layers
  patch_volume = math.prod(model.patch_size)
  patch_in, patch_out = patch_volume * model.in_channels, patch_volume * model.out_channels
  time_rows = tokens if per_token_timesteps else 1

  patch_embed = 2 * tokens * patch_in * dim
  text_embed_1 = 2 * text_len * model.text_dim * dim
  text_embed_2 = 2 * text_len * dim * dim
  time_embed_1 = 2 * time_rows * model.freq_dim * dim
  time_rest = 2 * time_rows * (dim * dim + dim * 6 * dim)

  self_projections = 4 * 2 * rows * dim * dim  # q, k, v, out
  cross_projections = 2 * 2 * rows * dim * dim + 2 * 2 * text_len * dim * dim  # q, out; k, v on text
  # QK^T and PV, self (the kept tile pairs; top-k's pooled scores are a 1/tile^2 share, left out) + cross
  attention = kept * 2 * 2 * rows * rows * dim + 2 * 2 * rows * text_len * dim
  feed_forward = 2 * 2 * rows * dim * ffn
  per_block = self_projections + cross_projections + attention + feed_forward

  return {
      "embed": float(patch_embed + text_embed_1 + text_embed_2 + time_embed_1 + time_rest),
      "blocks": float(layers * per_block),
      "attention": float(layers * attention),
      "head": float(2 * tokens * dim * patch_out),
      "no_input_grad": float(patch_embed + text_embed_1 + time_embed_1),
      "sparse_kept": float(kept),
  }


def forward_flops_per_example(model: ml_collections.ConfigDict, latent_shape: Sequence[int],
                              text_len: int, per_token_timesteps: bool = False) -> float:
  """Matmul + attention FLOPs of one forward pass on one clip of latent `(T, H, W[, C])`."""
  parts = flops_breakdown(model, latent_shape, text_len, per_token_timesteps)
  return parts["embed"] + parts["blocks"] + parts["head"]


def train_flops_per_example(model: ml_collections.ConfigDict, latent_shape: Sequence[int],
                            text_len: int, per_token_timesteps: bool = False,
                            frozen_weights: bool = False, hardware: bool = False) -> float:
  """FLOPs of one training example: forward plus backward (twice the forward, for gradients of both
  the weights and the inputs of every matmul, except the first layers whose inputs are data).

  `frozen_weights` (LoRA): the matmuls' weights get no gradient, so the backward of a projection is
  its input gradient alone; attention's backward is unchanged, and the adapters' own products
  (rank << width) are left out. Rematerialisation is not counted: this is the model FLOPs of MFU, or
  with `hardware` the same on the padded tiles of a tile-sparse clip (`flops_breakdown`).
  """
  parts = flops_breakdown(model, latent_shape, text_len, per_token_timesteps, hardware)
  forward = parts["embed"] + parts["blocks"] + parts["head"]
  if frozen_weights:
    matmuls = forward - parts["attention"]
    return 2 * matmuls + 3 * parts["attention"] - parts["no_input_grad"]
  return 3 * forward - parts["no_input_grad"]
