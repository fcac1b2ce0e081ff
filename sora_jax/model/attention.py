"""Attention backends behind one function: `attention(query, key, value, backend=...)`.

Owns the reference XLA path (fp32 softmax), the cuDNN path through jax.nn.dot_product_attention,
segment masking for packed sequences, and the error for backends that are not built yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "cudnn", "splash", "ring", "all_to_all")
_NOT_YET = ("splash", "ring", "all_to_all")


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


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, backend: str = "xla",
              query_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention of `[B, Nq, H, Dh]` queries on `[B, Nk, H, Dh]` keys/values.

  Returns `[B, Nq, H, Dh]` in the query dtype. `backend` is one of `BACKENDS`: `xla` is the portable
  reference; `cudnn` is the fused flash kernel on NVIDIA GPUs.
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(
        f"attention expects [B, N, H, Dh] query/key/value; got {query.shape}, {key.shape}, {value.shape}")
  mask = segment_mask(query_segment_ids, kv_segment_ids)
  if backend == "xla":
    return _xla_attention(query, key, value, mask)
  if backend == "cudnn":
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
  if backend in _NOT_YET:
    raise NotImplementedError(
        f"model.attention_backend={backend!r} is not implemented yet; use 'xla' (any device) or "
        f"'cudnn' (NVIDIA GPU)")
  raise ValueError(f"model.attention_backend={backend!r}; expected one of {BACKENDS}")


def _xla_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                   mask: jax.Array | None) -> jax.Array:
  scale = query.shape[-1] ** -0.5
  # Logits and softmax in fp32 whatever the compute dtype: bf16 logits lose the small differences
  # that matter over thousands of video tokens.
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value).astype(query.dtype)
