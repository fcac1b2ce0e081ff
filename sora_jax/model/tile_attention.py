"""The XLA kernel of tile-sparse self-attention: each query tile over its kept key tiles only.

Owns `tile_attention`: tokens in a `sparse_attention.TileLayout`'s tile order, `[B, H, T, k]` kept
key-tile indices per query tile (a rule's choice), and an online softmax over the k kept tiles, one
gathered tile of keys and values per step, so it computes keep x the dense FLOPs and holds one
`[tile, tile]` score block per query tile at a time. Its gradient keeps q, k, v, the output and the
row log-sum-exp and recomputes each step's probabilities (the block steps of `xla_attention`); dK and
dV are scattered back to the tiles they came from. Any platform; on TPU `splash` and `tile_splash` are
the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model import xla_attention as xla_lib


def _tiles(layout: sparse_lib.TileLayout, tokens: jax.Array) -> jax.Array:
  """`[B, N, H, Dh]` in tile order -> `[B, H, T, V, Dh]` (T tiles of V tokens)."""
  batch, _, heads, head_dim = tokens.shape
  return xla_lib.heads_major(tokens).reshape(batch, heads, layout.num_tiles, layout.tile_volume, head_dim)


def _fold(tiled: jax.Array) -> jax.Array:
  """`[B, H, T, V, ...]` -> `[B*T, H, V, ...]`: query tiles as the batch of the online-softmax steps."""
  moved = jnp.moveaxis(tiled, 2, 1)
  return moved.reshape(moved.shape[0] * moved.shape[1], *moved.shape[2:])


def _unfold(folded: jax.Array, batch: int) -> jax.Array:
  """Inverse of `_fold`."""
  return jnp.moveaxis(folded.reshape(batch, -1, *folded.shape[1:]), 1, 2)


def _gather(tiled: jax.Array, index: jax.Array) -> jax.Array:
  """Tile `index[b, h, t]` of `[B, H, T, V, ...]` for every query tile t: `[B, H, T, V, ...]`."""
  index = index.reshape(index.shape + (1,) * (tiled.ndim - 3))
  return jnp.take_along_axis(tiled, index, axis=2)


def _key_segments(layout: sparse_lib.TileLayout) -> jax.Array:
  """`[1, 1, T, V]` int32: 0 for a real key, -1 for a tile's padding (never attended)."""
  real = jnp.asarray(layout.real()).reshape(1, 1, layout.num_tiles, layout.tile_volume)
  return jnp.where(real, 0, -1).astype(jnp.int32)


def _slot(layout, kept, keys, values, slot):
  """Keys, values `[B*T, H, V, Dh]` and key segments `[B*T, H, V]` of the `slot`-th kept tile."""
  index = kept[..., slot]
  segments = _gather(jnp.broadcast_to(_key_segments(layout), index.shape + (layout.tile_volume,)), index)
  return _fold(_gather(keys, index)), _fold(_gather(values, index)), _fold(segments)


def _forward(layout, query, key, value, kept):
  batch, _, heads, _ = query.shape
  kept = jnp.broadcast_to(kept, (batch, heads, layout.num_tiles, layout.keep_tiles)).astype(jnp.int32)
  query_t, keys, values = _fold(_tiles(layout, query)), _tiles(layout, key), _tiles(layout, value)
  query_segments = jnp.zeros(query_t.shape[:1] + query_t.shape[2:3], jnp.int32)

  def step(stats, slot):
    key_t, value_t, key_segments = _slot(layout, kept, keys, values, slot)
    return xla_lib.online_softmax_step(stats, query_t, query_segments, key_t, value_t, key_segments), None

  stats = jax.lax.scan(step, xla_lib.online_softmax_init(query_t), jnp.arange(layout.keep_tiles))[0]
  output_t, log_sum_exp = xla_lib.online_softmax_result(stats, query.dtype)
  output = xla_lib.heads_major(_unfold(output_t, batch).reshape(query.shape[0], heads, -1, query.shape[-1]))
  return output, (query_t, keys, values, kept, output_t, log_sum_exp)


def _backward(layout, residuals, d_output):
  query_t, keys, values, kept, output_t, log_sum_exp = residuals
  batch = keys.shape[0]
  d_output_t = _fold(_tiles(layout, d_output)).astype(jnp.float32)
  query_segments = jnp.zeros(query_t.shape[:1] + query_t.shape[2:3], jnp.int32)
  delta = jnp.einsum("bhqd,bhqd->bhq", d_output_t, output_t.astype(jnp.float32))
  heads = jnp.arange(keys.shape[1])[None, :, None]
  examples = jnp.arange(batch)[:, None, None]

  def step(carry, slot):
    d_query, d_keys, d_values = carry
    key_t, value_t, key_segments = _slot(layout, kept, keys, values, slot)
    d_query_part, d_key, d_value = xla_lib.block_gradients(
        query_t, query_segments, d_output_t, delta, log_sum_exp, key_t, value_t, key_segments)
    to_tiles = (examples, heads, kept[..., slot])  # where this slot's keys came from
    return (d_query + d_query_part, d_keys.at[to_tiles].add(_unfold(d_key, batch)),
            d_values.at[to_tiles].add(_unfold(d_value, batch))), None

  zeros = jnp.zeros(keys.shape, jnp.float32)
  d_query_t, d_keys, d_values = jax.lax.scan(
      step, (jnp.zeros(query_t.shape, jnp.float32), zeros, zeros), jnp.arange(layout.keep_tiles))[0]
  untile = lambda tiled, like: xla_lib.heads_major(
      tiled.reshape(batch, tiled.shape[1], -1, tiled.shape[-1])).astype(like.dtype)
  d_query = untile(_unfold(d_query_t, batch), query_t)
  return d_query, untile(d_keys, keys), untile(d_values, values), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tile_attention(layout: sparse_lib.TileLayout, query: jax.Array, key: jax.Array, value: jax.Array,
                   kept: jax.Array) -> jax.Array:
  """Self-attention of `[B, N, H, Dh]` tokens in `layout`'s tile order, each query tile over the key
  tiles `kept` `[B|1, H|1, T, k]` names; padding keys never attended. Returns `[B, N, H, Dh]`."""
  return _forward(layout, query, key, value, kept)[0]


tile_attention.defvjp(_forward, _backward)
