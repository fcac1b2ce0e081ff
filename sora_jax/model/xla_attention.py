"""The XLA attention kernels: plain softmax attention and its key-blocked (online-softmax) form.

Owns the `xla` path (fp32 softmax; its gradient recomputes the probabilities from the row
log-sum-exp), the `xla_chunked` path (blocks of keys: no `[Nq, Nk]` array), segment masking for packed
sequences, the online-softmax block steps (forward and gradient) that the key-blocked and ring
backends share, and the plain autodiff reference the tests hold both to. `attention.py` dispatches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax.model import cpu_kernels, platform

# Keys per block of the `xla_chunked` backend: its largest temporary is [B, H, Nq, _KEY_BLOCK] fp32.
_KEY_BLOCK = 512


def segment_mask(query_segment_ids: jax.Array | None,
                 kv_segment_ids: jax.Array | None) -> jax.Array | None:
  """`[B, 1, Nq, Nk]` bool: a query sees a key only within its own segment.

  Padding (segment 0) attends to padding, so every row keeps at least one key and the softmax stays
  finite; the loss masks those tokens out.
  """
  if query_segment_ids is None and kv_segment_ids is None:
    return None
  if query_segment_ids is None or kv_segment_ids is None:
    raise ValueError("segment ids must be given for both queries and keys, or for neither")
  return (query_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])


def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                  mask: jax.Array | None) -> jax.Array:
  """The `xla` backend: [B, N, H, Dh] attention whose gradient recomputes the probabilities; on one CPU
  device run a clip (or a head) at a time (`cpu_kernels.per_clip_attention`)."""
  if platform.one_cpu_device():
    return cpu_kernels.per_clip_attention(_recomputing_attention, query, key, value, mask)
  return _recomputing_attention(query, key, value, mask)


def heads_major(array: jax.Array) -> jax.Array:
  """`[B, N, H, Dh]` <-> `[B, H, N, Dh]`: the cheap transpose that keeps `[N, N]` products untransposed."""
  return jnp.swapaxes(array, 1, 2)


def _scaled_logits(query_h: jax.Array, key_h: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`[B, H, Nq, Nk]` fp32 logits, scaled by 1/sqrt(Dh), masked keys at the fp32 minimum."""
  # Logits and softmax in fp32 whatever the compute dtype: bf16 logits lose the small differences
  # that matter over thousands of video tokens.
  logits = jnp.einsum("bhqd,bhkd->bhqk", query_h, key_h, preferred_element_type=jnp.float32)
  logits = logits * query_h.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return logits


def key_major_product(scores: jax.Array, operand: jax.Array) -> jax.Array:
  """`einsum("bhqk,bhqd->bhkd", scores, operand)` in fp32: the backward's dV = P^T dO and dK = dS^T Q;
  when tracing for the CPU, `cpu_kernels.key_major_product`."""
  if platform.traced_platform() == "cpu":
    return cpu_kernels.key_major_product(scores, operand)
  return jnp.einsum("bhqk,bhqd->bhkd", scores, operand, preferred_element_type=jnp.float32)


def _attention_forward(query, key, value, mask):
  query_h, key_h, value_h = heads_major(query), heads_major(key), heads_major(value)
  logits = _scaled_logits(query_h, key_h, mask)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - row_max)  # unnormalised probabilities in [0, 1]
  row_sum = jnp.sum(weights, axis=-1, keepdims=True)
  output_h = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype), value_h,
                       preferred_element_type=jnp.float32) / row_sum
  output_h = output_h.astype(query.dtype)
  log_sum_exp = row_max + jnp.log(row_sum)  # [B, H, Nq, 1]
  return heads_major(output_h), (query_h, key_h, value_h, output_h, log_sum_exp, mask)


def _attention_backward(residuals, d_output):
  query_h, key_h, value_h, output_h, log_sum_exp, mask = residuals
  d_output_h = heads_major(d_output)
  # The probabilities are recomputed, not saved: saving them costs [B, H, N, N] per layer, which
  # under scanned layers is also stacked, zero-filled and copied; one more QK^T product is cheaper.
  probs = jnp.exp(_scaled_logits(query_h, key_h, mask) - log_sum_exp)
  # Every [N, N] operand is contracted in the layout it was produced in (heads-major), so XLA
  # never materialises a transposed [N, N] copy.
  d_value_h = key_major_product(probs.astype(value_h.dtype), d_output_h)
  # sum_k probs * d_probs equals sum_d d_output * output: an [N, Dh] reduction instead of [N, N].
  delta = jnp.einsum("bhqd,bhqd->bhq", d_output_h, output_h, preferred_element_type=jnp.float32)
  d_probs_centred = jnp.einsum("bhqd,bhkd->bhqk", d_output_h, value_h,
                               preferred_element_type=jnp.float32) - delta[..., None]
  d_logits = probs * d_probs_centred * query_h.shape[-1] ** -0.5
  d_query_h = jnp.einsum("bhqk,bhkd->bhqd", d_logits.astype(key_h.dtype), key_h,
                         preferred_element_type=jnp.float32)
  d_key_h = key_major_product(d_logits.astype(query_h.dtype), query_h)
  return (heads_major(d_query_h).astype(query_h.dtype), heads_major(d_key_h).astype(key_h.dtype),
          heads_major(d_value_h).astype(value_h.dtype), None)


@jax.custom_vjp
def _recomputing_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           mask: jax.Array | None) -> jax.Array:
  """Softmax attention whose gradient keeps only q, k, v, the output and the row log-sum-exp."""
  return _attention_forward(query, key, value, mask)[0]


_recomputing_attention.defvjp(_attention_forward, _attention_backward)


def dense_segment_ids(segment_ids, batch, tokens):
  """int32 segment ids `[B, N]`; all zeros (one segment) when there are none."""
  if segment_ids is None:
    return jnp.zeros((batch, tokens), jnp.int32)
  return segment_ids.astype(jnp.int32)


def _key_blocks(key_h, value_h, kv_segment_ids, block):
  """Keys/values `[nb, B, H, block, Dh]` and key segment ids `[nb, B, block]` (-1 marks padding keys)."""
  batch, heads, num_keys, head_dim = key_h.shape
  block = min(block, num_keys)  # a short sequence is one block, not padded up to a full one
  pad = -num_keys % block
  segments = dense_segment_ids(kv_segment_ids, batch, num_keys)
  if pad:
    key_h = jnp.pad(key_h, ((0, 0), (0, 0), (0, pad), (0, 0)))
    value_h = jnp.pad(value_h, ((0, 0), (0, 0), (0, pad), (0, 0)))
    segments = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)
  blocks = (num_keys + pad) // block
  split = lambda x: jnp.moveaxis(x.reshape(batch, heads, blocks, block, head_dim), 2, 0)
  return split(key_h), split(value_h), jnp.moveaxis(segments.reshape(batch, blocks, block), 1, 0)


def _per_head(key_segments):
  """Key segment ids `[B, block]` (every head's) or `[B, H, block]` (a head's own) as `[B, 1|H, 1, block]`."""
  return (key_segments[:, None] if key_segments.ndim == 2 else key_segments)[:, :, None, :]


def _block_logits(query_h, key_block, query_segments, key_segments):
  """`[B, H, Nq, block]` fp32 scaled logits of one key block; other segments and padding at fp32 min."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", query_h, key_block, preferred_element_type=jnp.float32)
  logits = logits * query_h.shape[-1] ** -0.5
  visible = query_segments[:, None, :, None] == _per_head(key_segments)
  return jnp.where(visible, logits, jnp.finfo(jnp.float32).min)


def online_softmax_init(query_h: jax.Array):
  """(row max `[B, H, Nq]`, row sum `[B, H, Nq]`, unnormalised output `[B, H, Nq, Dh]`) before any block."""
  batch, heads, num_queries, head_dim = query_h.shape
  return (jnp.full((batch, heads, num_queries), jnp.finfo(jnp.float32).min, jnp.float32),
          jnp.zeros((batch, heads, num_queries), jnp.float32),
          jnp.zeros((batch, heads, num_queries, head_dim), jnp.float32))


def online_softmax_step(stats, query_h, query_segments, key_block, value_block, key_segments):
  """Folds one block of keys/values (heads-major; key segment ids `[B, block]` or per head
  `[B, H, block]`, -1 for padding) into `stats`."""
  row_max, row_sum, accumulated = stats
  logits = _block_logits(query_h, key_block, query_segments, key_segments)
  new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
  # Padding keys (segment -1) never match; with every key of a row masked, logits equal the fp32
  # minimum and the row averages all real keys of its masked set, as the unblocked softmax does.
  weights = jnp.where(_per_head(key_segments) >= 0, jnp.exp(logits - new_max[..., None]), 0.0)
  rescale = jnp.exp(row_max - new_max)
  row_sum = row_sum * rescale + jnp.sum(weights, axis=-1)
  accumulated = accumulated * rescale[..., None] + jnp.einsum(
      "bhqk,bhkd->bhqd", weights.astype(value_block.dtype), value_block, preferred_element_type=jnp.float32)
  return new_max, row_sum, accumulated


def online_softmax_result(stats, dtype):
  """(output `[B, H, Nq, Dh]` in `dtype`, row log-sum-exp `[B, H, Nq]`) of the folded blocks."""
  row_max, row_sum, accumulated = stats
  return (accumulated / row_sum[..., None]).astype(dtype), row_max + jnp.log(row_sum)


def block_gradients(query_h, query_segments, d_output_h, delta, log_sum_exp, key_block, value_block,
                    key_segments):
  """(dQ contribution, dK, dV) of one key block, recomputing its probabilities from the log-sum-exp.

  `d_output_h` is fp32 heads-major, `delta` the row sums of dO * O (`[B, H, Nq]`).
  """
  logits = _block_logits(query_h, key_block, query_segments, key_segments)
  probs = jnp.where(_per_head(key_segments) >= 0, jnp.exp(logits - log_sum_exp[..., None]), 0.0)
  d_value = key_major_product(probs, d_output_h)
  d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_output_h, value_block.astype(jnp.float32))
  d_logits = probs * (d_probs - delta[..., None]) * query_h.shape[-1] ** -0.5
  d_query = jnp.einsum("bhqk,bhkd->bhqd", d_logits, key_block.astype(jnp.float32))
  d_key = key_major_product(d_logits, query_h.astype(jnp.float32))
  return d_query, d_key, d_value


def fold_keys(stats, query_h, query_segments, key_h, value_h, key_segment_ids):
  """Folds keys/values `[B, H, Nk, Dh]` into online-softmax `stats`, `_KEY_BLOCK` keys at a time.

  `key_segment_ids` `[B, Nk]` or None; the largest temporary is `[B, H, Nq, _KEY_BLOCK]`.
  """
  def step(carry, block):
    return online_softmax_step(carry, query_h, query_segments, *block), None

  return jax.lax.scan(step, stats, _key_blocks(key_h, value_h, key_segment_ids, _KEY_BLOCK))[0]


def key_gradients(query_h, query_segments, d_output_h, delta, log_sum_exp, key_h, value_h,
                  key_segment_ids):
  """(dQ contribution, dK, dV) of keys/values `[B, H, Nk, Dh]`, `_KEY_BLOCK` keys at a time.

  Recomputes each block's probabilities from the row log-sum-exp; `d_output_h` is fp32 heads-major
  and `delta` the row sums of dO * O (`[B, H, Nq]`). All three results are fp32.
  """
  batch, heads, num_keys, head_dim = key_h.shape

  def step(d_query, block):
    d_query_part, d_key, d_value = block_gradients(
        query_h, query_segments, d_output_h, delta, log_sum_exp, *block)
    return d_query + d_query_part, (d_key, d_value)

  d_query, (d_keys, d_values) = jax.lax.scan(
      step, jnp.zeros(query_h.shape, jnp.float32), _key_blocks(key_h, value_h, key_segment_ids, _KEY_BLOCK))
  merge = lambda x: jnp.moveaxis(x, 0, 2).reshape(batch, heads, -1, head_dim)[:, :, :num_keys]
  return d_query, merge(d_keys), merge(d_values)


def _chunked_forward(query, key, value, query_segment_ids, kv_segment_ids):
  query_h, key_h, value_h = heads_major(query), heads_major(key), heads_major(value)
  query_segments = dense_segment_ids(query_segment_ids, query_h.shape[0], query_h.shape[2])
  stats = fold_keys(online_softmax_init(query_h), query_h, query_segments, key_h, value_h, kv_segment_ids)
  output_h, log_sum_exp = online_softmax_result(stats, query.dtype)
  residuals = (query_h, key_h, value_h, output_h, log_sum_exp, query_segment_ids, kv_segment_ids)
  return heads_major(output_h), residuals


def _chunked_backward(residuals, d_output):
  query_h, key_h, value_h, output_h, log_sum_exp, query_segment_ids, kv_segment_ids = residuals
  d_output_h = heads_major(d_output).astype(jnp.float32)
  query_segments = dense_segment_ids(query_segment_ids, query_h.shape[0], query_h.shape[2])
  delta = jnp.einsum("bhqd,bhqd->bhq", d_output_h, output_h.astype(jnp.float32))
  d_query, d_key, d_value = key_gradients(
      query_h, query_segments, d_output_h, delta, log_sum_exp, key_h, value_h, kv_segment_ids)
  return (heads_major(d_query).astype(query_h.dtype), heads_major(d_key).astype(key_h.dtype),
          heads_major(d_value).astype(value_h.dtype), None, None)


@jax.custom_vjp
def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      query_segment_ids: jax.Array | None = None,
                      kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """The `xla` backend's attention over blocks of `_KEY_BLOCK` keys (online softmax, flash style).

  Memory is O(Nq x block) per head instead of O(Nq x Nk), forward and backward; the gradient keeps
  q, k, v, the output and the row log-sum-exp and recomputes each block's probabilities.
  """
  return _chunked_forward(query, key, value, query_segment_ids, kv_segment_ids)[0]


chunked_attention.defvjp(_chunked_forward, _chunked_backward)


def reference_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """Plain softmax attention differentiated by JAX: the yardstick the `xla` backend is tested against."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
  logits = logits * query.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value).astype(query.dtype)
