"""Text encoders that turn captions into the [B, L, D_text] embeddings the DiT cross-attends to.

Owns the umT5 encoder architecture in Flax (token embedding; blocks of RMSNorm -> self-attention
with a per-layer relative position bias -> RMSNorm -> gated-GELU FFN; final RMSNorm; parameter
names follow transformers' UMT5EncoderModel) and `get_text_encoder(config)`, which for the demo
builds a small seeded instance ("tiny_umt5"). Outputs are zero past each caption's length, as Wan
feeds them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.encoders import tokenizer as tokenizer_lib

NUM_BUCKETS = 32  # umT5 relative_attention_num_buckets
MAX_DISTANCE = 128  # umT5 relative_attention_max_distance
_ENCODE_BATCH = 32  # most captions per jitted call (the last batch is padded to a power of two)


class TextEncoderError(ValueError):
  """A text encoder that cannot be built as configured."""


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


class TextEncoder:
  """Tokenizer + encoder: `.encode(captions)` -> (embeds [B, L, D] float32 zero past length, lengths)."""

  def __init__(self, module: UMT5Encoder, params: Any, tokenizer: tokenizer_lib.Tokenizer,
               text_len: int, identity: dict[str, Any]):
    self.module = module
    self.params = params
    self.tokenizer = tokenizer
    self.text_len = text_len
    self.dim = module.d_model
    self.identity = identity
    self._apply = jax.jit(self._embed)

  def _embed(self, params, ids, lengths):
    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    hidden = self.module.apply({"params": params}, ids, mask)
    return jnp.where(mask[..., None], hidden, 0.0)

  def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """captions -> (embeds [B, text_len, D] float32, lengths [B] int32 incl. EOS)."""
    ids, lengths = self.tokenizer.encode(list(captions), self.text_len)
    embeds = np.zeros((len(captions), self.text_len, self.dim), np.float32)
    # Batches of 32, the last one padded to a power of two: a single prompt costs one row, not 32
    # (umT5-XXL on a CPU: ~30 s a row), and at most 6 batch shapes are ever compiled.
    for start in range(0, len(captions), _ENCODE_BATCH):
      chunk_ids = ids[start:start + _ENCODE_BATCH]
      chunk_lengths = lengths[start:start + _ENCODE_BATCH]
      count = len(chunk_ids)
      pad = min(_ENCODE_BATCH, 1 << (count - 1).bit_length()) - count
      if pad:
        chunk_ids = np.concatenate([chunk_ids, np.zeros((pad, self.text_len), np.int32)])
        chunk_lengths = np.concatenate([chunk_lengths, np.ones((pad,), np.int32)])
      embeds[start:start + count] = np.asarray(self._apply(self.params, chunk_ids, chunk_lengths))[:count]
    return embeds, lengths


def tiny_umt5(config: ml_collections.ConfigDict) -> UMT5Encoder:
  """The demo's small umT5 encoder; width = model.text_dim."""
  data = config.data
  d_model, heads = config.model.text_dim, data.text_encoder_heads
  if heads < 1 or d_model % heads:
    raise TextEncoderError(
        f"model.text_dim={d_model} is not divisible by data.text_encoder_heads={heads}")
  return UMT5Encoder(
      vocab_size=data.vocab_size, d_model=d_model, num_layers=data.text_encoder_layers,
      num_heads=heads, head_dim=d_model // heads, ffn_dim=data.text_encoder_ffn_dim,
      position_bias_std=float(data.text_encoder_position_bias_std))


class TextEncoderUnavailable(TextEncoderError):
  """The config names a pretrained text encoder but no weights to load it from."""


def resolve_tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """data.tokenizer if set, else data.pretrained's tokenizer, else the one stored in the dataset data.dir."""
  if config.data.tokenizer:
    return config.data.tokenizer
  if config.data.pretrained:
    from sora_jax.encoders import pretrained

    return pretrained.tokenizer_path(config.data.pretrained)
  if config.data.dir:
    from sora_jax.data import schema  # deferred: schema pulls in tfds only when reading shards

    return schema.tokenizer_path(config.data.dir)
  raise TextEncoderError(
      "no tokenizer: set data.tokenizer to a sentencepiece .model file, data.pretrained to a Wan pipeline "
      "directory, or data.dir to a prepared dataset (which stores the one its captions were encoded with)")


def get_text_encoder(config: ml_collections.ConfigDict,
                     tokenizer: tokenizer_lib.Tokenizer | None = None) -> TextEncoder:
  """The text encoder named by config.data.text_encoder, with its tokenizer.

  `tokenizer` overrides the lookup (prepare passes the one it just trained); otherwise it comes
  from `resolve_tokenizer_path(config)`. `umt5` loads data.pretrained's text_encoder/.
  """
  name = config.data.text_encoder
  if name == "umt5":
    return _pretrained_umt5(config, tokenizer)
  if name != "tiny_umt5":
    raise TextEncoderError(f"data.text_encoder={name!r}; expected 'umt5' or 'tiny_umt5'")
  if tokenizer is None:
    tokenizer = tokenizer_lib.load(resolve_tokenizer_path(config))
  tokenizer_lib.check_fits(tokenizer, config.data.vocab_size)
  module = tiny_umt5(config)
  seed = config.data.text_encoder_seed
  ids = jnp.zeros((1, config.data.text_len), jnp.int32)
  params = jax.jit(module.init)(jax.random.key(seed), ids, jnp.ones_like(ids, bool))["params"]
  architecture = {
      "vocab_size": module.vocab_size, "d_model": module.d_model, "num_layers": module.num_layers,
      "num_heads": module.num_heads, "head_dim": module.head_dim, "ffn_dim": module.ffn_dim,
      "position_bias_std": module.position_bias_std}
  identity = {
      "name": name, "seed": seed, "architecture": architecture, "text_len": config.data.text_len,
      "tokenizer_sha256": tokenizer.sha256, "tokenizer_vocab_size": tokenizer.vocab_size,
      "params_sha256": params_fingerprint(params)}
  return TextEncoder(module, params, tokenizer, config.data.text_len, identity)


def _pretrained_umt5(config: ml_collections.ConfigDict,
                     tokenizer: tokenizer_lib.Tokenizer | None) -> TextEncoder:
  from sora_jax.encoders import pretrained

  data = config.data
  directory = pretrained.text_encoder_dir(pretrained.required_root(
      data.pretrained, "data.text_encoder='umt5'", "the umT5 weights", TextEncoderUnavailable))
  from sora_jax.encoders import umt5  # deferred: the demo never needs it

  if tokenizer is None:
    tokenizer = tokenizer_lib.load(resolve_tokenizer_path(config))
  encoder = umt5.text_encoder_from_pretrained(directory, tokenizer, int(data.text_len), data.encoder_dtype)
  if encoder.dim != config.model.text_dim:
    raise TextEncoderError(
        f"model.text_dim={config.model.text_dim}, but the umT5 encoder in {directory} gives "
        f"{encoder.dim}-wide embeddings")
  return encoder


def params_fingerprint(params: Any) -> str:
  """sha256 over parameter names and bytes: the same seed must give the same encoder everywhere."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    digest.update(json.dumps(jax.tree_util.keystr(path)).encode())
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()
