"""Context parallelism: self-attention over a clip's tokens sharded along the `context` mesh axis.

Owns the two backends that keep a long sequence split across devices (`model.attention_backend`):

- `ring`: each device keeps its shard of queries; the key/value shards travel round the ring of
  `context` devices (one `ppermute` per step, sent while the current block is computed) and are
  folded in with an online softmax, flash style. The backward pass recomputes each block's
  probabilities from the saved row log-sum-exp and sends the dK/dV accumulators round the ring with
  their keys, so no device ever holds more than one remote shard: memory stays O(N / C) per device.
  Each shard is folded in blocks of keys as the `xla_chunked` backend does, so no `[N/C, N/C]`
  score block exists either.
- `all_to_all` (DeepSpeed-Ulysses): an all-to-all trades the sequence shard for a shard of heads,
  each device attends over the whole sequence with H / C heads (key-blocked, as `xla_chunked`), and a
  second all-to-all trades back. Two collectives per attention regardless of C, but the local heads
  must divide by C.

Both run inside `jax.shard_map` over the mesh that `parallel.sharding.mesh_context` sets while the
step is traced, with batch and heads sharded as the logical-axis rules say. Without a mesh, or with a
`context` axis of size 1, they compute the `xla` backend's attention on the local arrays.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sora_jax import choices
from sora_jax.model import xla_attention as xla_lib
from sora_jax.parallel import sharding as sharding_lib

CONTEXT_AXIS = "context"
BACKENDS = choices.CONTEXT_PARALLEL_BACKENDS


def context_size() -> int:
  """Devices along the `context` axis of the mesh being traced under (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[CONTEXT_AXIS]


def context_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, backend: str,
                      query_segment_ids: jax.Array | None = None,
                      kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Self-attention `[B, N, H, Dh]` with the sequence split over `context` (`backend` ring | all_to_all)."""
  if backend not in BACKENDS:
    raise ValueError(f"context attention backend {backend!r}; expected one of {BACKENDS}")
  size = context_size()
  batch, num_tokens = query.shape[:2]
  if key.shape[1] != num_tokens:
    raise ValueError(
        f"model.attention_backend={backend!r} splits self-attention over the sequence; got {num_tokens} "
        f"queries but {key.shape[1]} keys (cross-attention runs on the 'xla' backend)")
  if size == 1:
    return xla_lib.xla_attention(query, key, value, xla_lib.segment_mask(query_segment_ids, kv_segment_ids))
  if num_tokens % size:
    raise ValueError(
        f"model.attention_backend={backend!r}: {num_tokens} tokens per sequence are not divisible by the "
        f"mesh's context axis ({size}); pick buckets / packing length whose token count it divides")
  pinned = {"act_seq": CONTEXT_AXIS}
  spec = sharding_lib.traced_spec(("act_batch", "act_seq", "act_heads", "act_head_dim"), pinned)
  heads_per_device = query.shape[2] // math.prod(
      jax.sharding.get_abstract_mesh().shape[name] for name in sharding_lib.axis_names(spec[2]))
  if backend == "all_to_all" and heads_per_device % size:
    raise ValueError(
        f"model.attention_backend='all_to_all' splits each device's {heads_per_device} heads over the "
        f"{size} context devices; they do not divide (use 'ring', or heads divisible by tensor x context)")
  segment_spec = sharding_lib.traced_spec(("act_batch", "act_seq"), pinned)
  query_segments = xla_lib.dense_segment_ids(query_segment_ids, batch, num_tokens)
  kv_segments = xla_lib.dense_segment_ids(kv_segment_ids, batch, num_tokens)
  if backend == "ring":
    local = functools.partial(_ring_attention, size)
  else:
    local = functools.partial(_ulysses_attention, query_segment_ids is not None or kv_segment_ids is not None)
  return jax.shard_map(
      local, in_specs=(spec, spec, spec, segment_spec, segment_spec), out_specs=spec,
      check_vma=False)(query, key, value, query_segments, kv_segments)


# ------------------------------------------------------------------------------------------- ring


def _ring_permute(tree, size: int):
  """Sends every array of `tree` to the next device along `context` (the last to the first)."""
  pairs = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, CONTEXT_AXIS, pairs), tree)


def _ring_forward(size, query, key, value, query_segments, kv_segments):
  query_h, key_h, value_h = (xla_lib.heads_major(x) for x in (query, key, value))

  def body(_, carry):
    stats, block = carry
    incoming = _ring_permute(block, size)  # in flight while this block is folded in
    return xla_lib.fold_keys(stats, query_h, query_segments, *block), incoming

  stats, last = jax.lax.fori_loop(
      0, size - 1, body, (xla_lib.online_softmax_init(query_h), (key_h, value_h, kv_segments)))
  stats = xla_lib.fold_keys(stats, query_h, query_segments, *last)
  output_h, log_sum_exp = xla_lib.online_softmax_result(stats, query.dtype)
  residuals = (query_h, key_h, value_h, output_h, log_sum_exp, query_segments, kv_segments)
  return xla_lib.heads_major(output_h), residuals


def _ring_backward(size, residuals, d_output):
  query_h, key_h, value_h, output_h, log_sum_exp, query_segments, kv_segments = residuals
  d_output_h = xla_lib.heads_major(d_output).astype(jnp.float32)
  delta = jnp.einsum("bhqd,bhqd->bhq", d_output_h, output_h.astype(jnp.float32))

  def fold(d_query, block, d_key, d_value):
    part_q, part_k, part_v = xla_lib.key_gradients(
        query_h, query_segments, d_output_h, delta, log_sum_exp, *block)
    return d_query + part_q, d_key + part_k, d_value + part_v

  def body(_, carry):
    d_query, block, d_key, d_value = carry
    d_query, d_key, d_value = fold(d_query, block, d_key, d_value)
    # Each shard's dK/dV accumulators travel with it and are home after `size` hops.
    block, (d_key, d_value) = _ring_permute((block, (d_key, d_value)), size)
    return d_query, block, d_key, d_value

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  carry = (zeros(query_h), (key_h, value_h, kv_segments), zeros(key_h), zeros(value_h))
  d_query, block, d_key, d_value = jax.lax.fori_loop(0, size - 1, body, carry)
  d_query, d_key, d_value = fold(d_query, block, d_key, d_value)
  d_key, d_value = _ring_permute((d_key, d_value), size)
  back = lambda x, like: xla_lib.heads_major(x).astype(like.dtype)
  return back(d_query, query_h), back(d_key, key_h), back(d_value, value_h), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(size, query, key, value, query_segments, kv_segments):
  return _ring_forward(size, query, key, value, query_segments, kv_segments)[0]


_ring_attention.defvjp(_ring_forward, _ring_backward)


# ------------------------------------------------------------------------------------ all-to-all


def _ulysses_attention(masked, query, key, value, query_segments, kv_segments):
  # [B, N/C, H, Dh] -> [B, N, H/C, Dh]: device i gets head group i of every sequence shard, in order.
  to_heads = lambda x: jax.lax.all_to_all(x, CONTEXT_AXIS, split_axis=2, concat_axis=1, tiled=True)
  gather = lambda x: jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)
  segments = {}
  if masked:
    segments = dict(query_segment_ids=gather(query_segments), kv_segment_ids=gather(kv_segments))
  # Key-blocked: each device now holds the whole sequence, whose [N, N] scores must not exist.
  attended = xla_lib.chunked_attention(to_heads(query), to_heads(key), to_heads(value), **segments)
  return jax.lax.all_to_all(attended, CONTEXT_AXIS, split_axis=1, concat_axis=2, tiled=True)
