"""The umT5 encoder network in Flax: ids and a key mask to hidden states, as transformers' UMT5EncoderModel.

Owns the architecture (token embedding; blocks of RMSNorm -> self-attention with a per-layer relative
position bias -> RMSNorm -> gated-GELU FFN; final RMSNorm) and its parameter names, which follow
transformers' so `umt5.py` maps a checkpoint onto them one to one.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_BUCKETS = 32  # umT5 relative_attention_num_buckets
MAX_DISTANCE = 128  # umT5 relative_attention_max_distance


def relative_position_bucket(relative_position: jax.Array, num_buckets: int = NUM_BUCKETS,
                             max_distance: int = MAX_DISTANCE) -> jax.Array:
  """T5's bidirectional bucket of (key position - query position): exact near 0, log-spaced far."""
  num_buckets //= 2
  buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
  distance = jnp.abs(relative_position)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # max(distance, 1) only keeps log() finite where is_small already picks the exact bucket.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
      max_distance / max_exact)
  if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, if_large)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, statistics in fp32."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.initializers.ones, (hidden.shape[-1],))
    hidden32 = hidden.astype(jnp.float32)
    variance = jnp.mean(hidden32 * hidden32, axis=-1, keepdims=True)
    return weight * (hidden32 * jax.lax.rsqrt(variance + self.eps))


class SelfAttention(nn.Module):
  """umT5 self-attention: no score scaling (folded into init), its own relative position bias.

  Projections run in `dtype`; scores, position bias and softmax stay in float32, where bfloat16 would
  blur the unscaled umT5 logits.
  """

  num_heads: int
  head_dim: int
  position_bias_std: float = 0.0  # init std of the relative position bias; 0 = umT5's d_model**-0.5
  num_buckets: int = NUM_BUCKETS
  max_distance: int = MAX_DISTANCE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, key_mask: jax.Array) -> jax.Array:
    batch, length, d_model = hidden.shape
    inner = self.num_heads * self.head_dim
    normal = nn.initializers.normal
    dense = lambda name, std: nn.Dense(inner, use_bias=False, name=name, kernel_init=normal(std),
                                       dtype=self.dtype)
    query = dense("q", (d_model * self.head_dim) ** -0.5)(hidden)
    key = dense("k", d_model ** -0.5)(hidden)
    value = dense("v", d_model ** -0.5)(hidden)
    split = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(query), split(key),
                        preferred_element_type=jnp.float32)  # [B, heads, L, L]
    positions = jnp.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets,
                                       self.max_distance)  # [L(q), L(k)]
    bias_table = nn.Embed(self.num_buckets, self.num_heads, name="relative_attention_bias",
                          embedding_init=normal(self.position_bias_std or d_model ** -0.5))
    scores = scores + jnp.transpose(bias_table(buckets), (2, 0, 1))[None]
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), split(value))
    attended = attended.reshape(batch, length, inner)
    return nn.Dense(d_model, use_bias=False, name="o", kernel_init=normal(inner ** -0.5),
                    dtype=self.dtype)(attended)


class GatedGeluFFN(nn.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x), umT5's gated-GELU feed-forward."""

  ffn_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    d_model = hidden.shape[-1]
    normal = nn.initializers.normal
    dense = lambda features, name, std: nn.Dense(features, use_bias=False, name=name,
                                                 kernel_init=normal(std), dtype=self.dtype)
    wi_0 = dense(self.ffn_dim, "wi_0", d_model ** -0.5)
    wi_1 = dense(self.ffn_dim, "wi_1", d_model ** -0.5)
    wo = dense(d_model, "wo", self.ffn_dim ** -0.5)
    return wo(jax.nn.gelu(wi_0(hidden), approximate=True) * wi_1(hidden))


class UMT5Encoder(nn.Module):
  """umT5 encoder stack: ids [B, L] + key mask [B, L] -> hidden states [B, L, d_model] (fp32).

  `dtype` is the matmul dtype (bfloat16 for the pretrained XXL encoder); the residual stream, norms,
  attention scores and softmax stay in float32.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  ffn_dim: int
  eps: float = 1e-6
  position_bias_std: float = 0.0  # see SelfAttention; only matters for seeded (untrained) weights
  num_buckets: int = NUM_BUCKETS
  max_distance: int = MAX_DISTANCE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    # Looked up in `dtype`: a float32 lookup would first cast the whole table (1B entries in umT5-XXL).
    hidden = nn.Embed(self.vocab_size, self.d_model, name="shared", dtype=self.dtype,
                      embedding_init=nn.initializers.normal(1.0))(ids).astype(jnp.float32)
    for index in range(self.num_layers):
      attention = SelfAttention(self.num_heads, self.head_dim, self.position_bias_std, self.num_buckets,
                                self.max_distance, self.dtype, name=f"block_{index}_SelfAttention")
      hidden = hidden + attention(RMSNorm(self.eps, name=f"block_{index}_attention_norm")(hidden), mask)
      ffn = GatedGeluFFN(self.ffn_dim, self.dtype, name=f"block_{index}_DenseReluDense")
      hidden = hidden + ffn(RMSNorm(self.eps, name=f"block_{index}_ffn_norm")(hidden))
    return RMSNorm(self.eps, name="final_layer_norm")(hidden)
