"""The Pallas TPU kernel of tile-sparse self-attention whose key tiles are chosen per input.

Owns `tile_splash_attention`, what `topk` and `window_topk` (`sparse_attention`) run on TPU. splash's
block mask is built ahead of time from a static pattern, so it can only skip `window`'s blocks; here the
kept tile indices, computed on the device each step, are the kernel's scalar-prefetch operands and its
block index maps read them at run time:

- forward and dQ: grid (row, query tile, kept slot); each step fetches the slot's key tile, so a query
  tile computes only its `keep_tiles` key tiles (an online softmax over them);
- dK and dV: grid (row, step) over a list of (key tile, query tile) pairs sorted by key tile, built from
  the same indices (`_dkv_steps`): consecutive steps of one key tile accumulate into one output block,
  a key tile no query tile keeps gets one step that writes zeros, and the list is padded to its static
  length with steps that repeat the last block (no fetch, no compute).

A "row" is one (example, head): q, k and v go in as `[B*H, N, Dh]`. The scalar tables of a call must
fit the core's scalar memory (1 MiB from v4 to v6e, shared with the kernel's own state), so rows run
in groups (`_rows_per_call`), one call per group. A block is one tile, so a tile must hold a whole
number of 128-token lanes; a layout that does not fit (`unfit_reason`) runs on `tile_attention`.
FLOPs are keep x dense, as on `tile_attention`, with no gathered copies of K and V. Padding keys (edge
tiles) are masked, and their gradients zeroed after the dK/dV kernel; padding queries' outputs are
dropped by the caller's permutation back to token order. On any platform but TPU the kernels run in
Pallas interpret mode (slow, exact): tests check them against `tile_attention` on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model import splash
from sora_jax.model.platform import traced_platform
from sora_jax.parallel import sharding as sharding_lib

NUM_LANES = 128
NUM_SUBLANES = 8
# A large finite negative (splash's): exp of it underflows to 0 and never makes inf - inf.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Scalar memory for one call's tile table. The core has 1 MiB (v4, v5e, v5p, v6e): compiled for each,
# a 856 KiB table fits beside the kernel's own scalars and a 1,284 KiB one does not
# (experiments/tile_splash_smem.py). Two rows of the
# 14B's 128-token tiles at keep 0.25 (428 KiB each) fit, so a megacore's two cores both get a row.
_TABLE_BYTES = 896 * 1024
# Forward and dQ: rows and query tiles are independent (a megacore splits them between its cores); the
# kept slots accumulate in order. dK/dV: its steps accumulate in order, so only rows split.
_ROW_AND_QUERY_TILES = ("parallel", "parallel", "arbitrary")
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
# A dK/dV step packs (key tile, query tile, flags) in one int32.
_FIRST, _LAST, _COMPUTE = 1, 2, 4
_Q_SHIFT, _KV_SHIFT, _TILE_BITS = 3, 16, 13


def unfit_reason(layout: sparse_lib.TileLayout) -> str:
  """Why `layout` cannot run on this kernel ("" when it can): `attention.sparse_kernel` then runs it on
  `tile_attention` (a one-frame clip shrinks a (2, 8, 8) tile to 64 tokens, for one)."""
  if layout.tile_volume % NUM_LANES:
    return (f"model.sparse_attention_tile={layout.tile} holds {layout.tile_volume} tokens per tile; the "
            f"TPU kernel of rule {layout.rule!r} needs a multiple of {NUM_LANES} (one kernel block per tile)")
  if layout.num_tiles >= 1 << _TILE_BITS:
    return (f"model.sparse_attention_tile={layout.tile} makes {layout.num_tiles} tiles; the TPU kernel of "
            f"rule {layout.rule!r} indexes at most {(1 << _TILE_BITS) - 1}")
  if 4 * _table_ints_per_row(layout) > _TABLE_BYTES:
    return (f"{layout.num_tiles} tiles keeping {layout.keep_tiles} each need "
            f"{4 * _table_ints_per_row(layout) // 1024} KiB of tile table per (example, head); the TPU "
            f"kernel's scalar memory holds {_TABLE_BYTES // 1024} KiB (larger tiles or a smaller keep fit)")
  return ""


def check_layout(layout: sparse_lib.TileLayout) -> None:
  """One line naming the tile when `layout` cannot run on this kernel."""
  if reason := unfit_reason(layout):
    raise ValueError(reason)


def _tiled(x: jax.Array, num: int) -> jax.Array:
  """`[rows, 128]` lane-replicated statistics widened (or cut) to `num` lanes."""
  if num <= NUM_LANES:
    return x[:, :num]
  return jnp.tile(x, (1, -(-num // NUM_LANES)))[:, :num]


def _forward_kernel(kept_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, m_scratch, l_scratch,
                    acc_scratch, *, keep):
  slot = pl.program_id(2)

  @pl.when(slot == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  v = v_ref[...]
  scores = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
  scores = scores + bias_ref[:1, :]
  m_prev, l_prev = m_scratch[...], l_scratch[...]
  m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1)[:, None])
  probs = jnp.exp(scores - _tiled(m_next, scores.shape[1]))
  alpha = jnp.exp(m_prev - m_next)
  l_scratch[...] = alpha * l_prev + jnp.sum(probs, axis=1)[:, None]
  m_scratch[...] = m_next
  acc_scratch[...] = _tiled(alpha, v.shape[1]) * acc_scratch[...] + jax.lax.dot_general(
      probs.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)

  @pl.when(slot == keep - 1)
  def _store():
    total = l_scratch[...]
    o_ref[...] = (acc_scratch[...] / _tiled(total, acc_scratch.shape[1])).astype(o_ref.dtype)
    # Lanes-replicated column -> one row: the log-sum-exp leaves as [rows, 1, N], not 128 copies.
    lse_ref[...] = (m_scratch[...] + jnp.log(total)).T[:1, :]


def _dq_kernel(kept_ref, q_ref, k_ref, v_ref, bias_ref, lse_ref, di_ref, do_ref, dq_ref, dq_scratch, *,
               keep):
  slot = pl.program_id(2)

  @pl.when(slot == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  k, v = k_ref[...], v_ref[...]
  scores = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) + bias_ref[:1, :]
  probs = jnp.exp(scores - jnp.expand_dims(lse_ref[0], -1))
  d_probs = jax.lax.dot_general(do_ref[...], v, _NT, preferred_element_type=jnp.float32)
  d_scores = (d_probs - jnp.expand_dims(di_ref[0], -1)) * probs
  dq_scratch[...] += jax.lax.dot_general(d_scores.astype(k.dtype), k, _NN,
                                         preferred_element_type=jnp.float32)

  @pl.when(slot == keep - 1)
  def _store():
    dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(steps_ref, q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dk_ref, dv_ref, dk_scratch,
                dv_scratch, *, num_steps):
  step = steps_ref[pl.program_id(0) * num_steps + pl.program_id(1)]

  @pl.when((step & _FIRST) != 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  @pl.when((step & _COMPUTE) != 0)
  def _accumulate():
    # Transposed ([key, query]) so every product is a plain or `a @ b.T` matmul.
    q, do = q_ref[...], do_ref[...]
    scores_t = jax.lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32)
    probs_t = jnp.exp(scores_t - lse_ref[:1, :])
    dv_scratch[...] += jax.lax.dot_general(probs_t.astype(do.dtype), do, _NN,
                                           preferred_element_type=jnp.float32)
    d_probs_t = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    d_scores_t = (d_probs_t - di_ref[:1, :]) * probs_t
    dk_scratch[...] += jax.lax.dot_general(d_scores_t.astype(q.dtype), q, _NN,
                                           preferred_element_type=jnp.float32)

  @pl.when((step & _LAST) != 0)
  def _store():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _dkv_steps(kept: jax.Array, num_tiles: int) -> jax.Array:
  """`[R, T, k]` kept key tiles -> `[R, T*k + T]` packed dK/dV steps, sorted by key tile (see module)."""
  rows, _, keep = kept.shape
  pairs = num_tiles * keep
  key_tiles = kept.reshape(rows, pairs)
  query_tiles = jnp.broadcast_to(jnp.repeat(jnp.arange(num_tiles, dtype=jnp.int32), keep), (rows, pairs))
  counts = jnp.sum(key_tiles[..., None] == jnp.arange(num_tiles), axis=1)  # [R, T]
  tiles = jnp.broadcast_to(jnp.arange(num_tiles, dtype=jnp.int32), (rows, num_tiles))
  # One extra entry per tile: a step of its own for a tile nobody keeps, else sorted past the end.
  order_key = jnp.concatenate([2 * key_tiles + 1, jnp.where(counts == 0, 2 * tiles, 2 * num_tiles + 1)], 1)
  order = jnp.argsort(order_key, axis=1, stable=True)
  take = lambda a: jnp.take_along_axis(a, order, axis=1)
  key_of = take(jnp.concatenate([key_tiles, tiles], 1))
  query_of = take(jnp.concatenate([query_tiles, jnp.zeros_like(tiles)], 1))
  computes = take(jnp.concatenate([jnp.ones_like(key_tiles, bool), jnp.zeros_like(tiles, bool)], 1))
  real = pairs + jnp.sum(counts == 0, axis=1, keepdims=True)
  padding = jnp.arange(pairs + num_tiles)[None] >= real
  last_real = lambda a: jnp.where(padding, jnp.take_along_axis(a, real - 1, axis=1), a)
  key_of, query_of = last_real(key_of), last_real(query_of)  # padding repeats the last block
  # A tile nobody keeps reads no query: its step names the query tile before it, so nothing is fetched.
  latest = jax.lax.cummax(jnp.where(computes, jnp.arange(pairs + num_tiles), 0), axis=1)
  query_of = jnp.where(computes, query_of, jnp.take_along_axis(query_of, latest, axis=1))
  changes = key_of[:, 1:] != key_of[:, :-1]
  edge = jnp.ones((rows, 1), bool)
  first = jnp.concatenate([edge, changes], 1) & ~padding
  last = jnp.concatenate([changes, edge], 1)
  flags = (first * _FIRST) | (last * _LAST) | (computes * _COMPUTE)  # padding entries never compute
  return (key_of << _KV_SHIFT) | (query_of << _Q_SHIFT) | flags.astype(jnp.int32)


def _rows_per_call(rows: int, table_ints_per_row: int) -> int:
  """The most rows (a divisor of `rows`) whose scalar tables fit `_TABLE_BYTES`, at least 1."""
  fitting = max(1, _TABLE_BYTES // (4 * table_ints_per_row))
  return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= fitting)


def _key_bias(layout: sparse_lib.TileLayout) -> jax.Array:
  """`[T, 8, V]` f32: 0 for a real key, the mask value for a tile's padding (sublane-replicated)."""
  real = layout.real().reshape(layout.num_tiles, 1, layout.tile_volume)
  bias = np.where(real, 0.0, _MASK_VALUE).astype(np.float32)
  return jnp.asarray(np.broadcast_to(bias, (layout.num_tiles, NUM_SUBLANES, layout.tile_volume)))


def _grouped(call, rows_per_call: int, *arrays):
  """`call` on groups of `rows_per_call` rows of each array (leading axis), results re-joined."""
  rows = arrays[0].shape[0]
  if rows_per_call == rows:
    return call(*arrays)
  split = lambda a: a.reshape(rows // rows_per_call, rows_per_call, *a.shape[1:])
  out = jax.lax.map(lambda group: call(*group), tuple(split(a) for a in arrays))
  return jax.tree_util.tree_map(lambda a: a.reshape(rows, *a.shape[2:]), out)


def _cost(layout, q, products: int) -> pl.CostEstimate:
  """What a call computes (`products` [tile, tile] x [tile, Dh] matmuls and one exp per kept tile pair),
  so XLA's cost analysis counts the kernel instead of taking it as free."""
  rows, _, head_dim = q.shape
  pairs = rows * layout.num_tiles * layout.keep_tiles
  block = layout.tile_volume * head_dim * q.dtype.itemsize
  return pl.CostEstimate(flops=2 * products * pairs * layout.tile_volume ** 2 * head_dim,
                         transcendentals=pairs * layout.tile_volume ** 2,
                         bytes_accessed=pairs * 3 * block + rows * layout.padded_tokens * head_dim * 4)


@dataclasses.dataclass(frozen=True)
class _KeptSpecs:
  """Block specs of the grid (row, query tile, kept slot) the forward and dQ kernels share."""

  query: pl.BlockSpec  # [rows, N, Dh] blocks of the query tile (q, output, dO, dQ)
  kept: pl.BlockSpec  # [rows, N, Dh] blocks of the slot's kept key tile (k, v)
  bias: pl.BlockSpec  # [T, 8, V] key bias of the kept tile
  row: pl.BlockSpec  # [rows, 1, N] per-query statistics of the query tile (lse, di)


def _kept_specs(layout: sparse_lib.TileLayout, head_dim: int) -> _KeptSpecs:
  volume, keep, tiles = layout.tile_volume, layout.keep_tiles, layout.num_tiles
  tile = lambda r, t, s, kept_ref: kept_ref[(r * tiles + t) * keep + s]  # the slot's key tile
  return _KeptSpecs(
      query=pl.BlockSpec((None, volume, head_dim), lambda r, t, s, ref: (r, t, 0)),
      kept=pl.BlockSpec((None, volume, head_dim), lambda r, t, s, ref: (r, tile(r, t, s, ref), 0)),
      bias=pl.BlockSpec((None, NUM_SUBLANES, volume), lambda r, t, s, ref: (tile(r, t, s, ref), 0, 0)),
      row=pl.BlockSpec((None, 1, volume), lambda r, t, s, ref: (r, 0, t)))


def _forward_call(layout, interpret, kept, q, k, v):
  rows, tokens, head_dim = q.shape
  volume, keep = layout.tile_volume, layout.keep_tiles
  specs = _kept_specs(layout, head_dim)
  return pl.pallas_call(
      functools.partial(_forward_kernel, keep=keep),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(rows, layout.num_tiles, keep),
          in_specs=[specs.query, specs.kept, specs.kept, specs.bias],
          out_specs=[specs.query, specs.row],
          scratch_shapes=[pltpu.VMEM((volume, NUM_LANES), jnp.float32),
                          pltpu.VMEM((volume, NUM_LANES), jnp.float32),
                          pltpu.VMEM((volume, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((rows, 1, tokens), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_ROW_AND_QUERY_TILES),
      interpret=interpret, name="tile_splash_fwd", cost_estimate=_cost(layout, q, products=2),
  )(kept.reshape(-1), q, k, v, _key_bias(layout))


def _dq_call(layout, interpret, kept, q, k, v, lse, di, d_out):
  rows, _, head_dim = q.shape
  volume, keep = layout.tile_volume, layout.keep_tiles
  specs = _kept_specs(layout, head_dim)
  return pl.pallas_call(
      functools.partial(_dq_kernel, keep=keep),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(rows, layout.num_tiles, keep),
          in_specs=[specs.query, specs.kept, specs.kept, specs.bias, specs.row, specs.row, specs.query],
          out_specs=specs.query,
          scratch_shapes=[pltpu.VMEM((volume, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=_ROW_AND_QUERY_TILES),
      interpret=interpret, name="tile_splash_dq", cost_estimate=_cost(layout, q, products=3),
  )(kept.reshape(-1), q, k, v, _key_bias(layout), lse[:, None], di[:, None], d_out)


def _dkv_call(layout, interpret, kept, q, k, v, lse, di, d_out):
  rows, _, head_dim = q.shape
  volume = layout.tile_volume
  num_steps = _table_ints_per_row(layout)
  steps = _dkv_steps(kept, layout.num_tiles)
  at = lambda r, s, steps_ref: steps_ref[r * num_steps + s]
  query_tile = lambda r, s, steps_ref: (at(r, s, steps_ref) >> _Q_SHIFT) & ((1 << _TILE_BITS) - 1)
  query_map = lambda r, s, steps_ref: (r, query_tile(r, s, steps_ref), 0)
  key_map = lambda r, s, steps_ref: (r, at(r, s, steps_ref) >> _KV_SHIFT, 0)
  row_map = lambda r, s, steps_ref: (r, 0, query_tile(r, s, steps_ref))
  spec = lambda index_map: pl.BlockSpec((None, volume, head_dim), index_map)
  row_spec = pl.BlockSpec((None, 1, volume), row_map)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, num_steps=num_steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(rows, num_steps),
          in_specs=[spec(query_map), spec(key_map), spec(key_map), row_spec, row_spec, spec(query_map)],
          out_specs=[spec(key_map), spec(key_map)],
          scratch_shapes=[pltpu.VMEM((volume, head_dim), jnp.float32),
                          pltpu.VMEM((volume, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret, name="tile_splash_dkv", cost_estimate=_cost(layout, q, products=4),
  )(steps.reshape(-1), q, k, v, lse[:, None], di[:, None], d_out)


def _table_ints_per_row(layout: sparse_lib.TileLayout) -> int:
  """Ints of one row's largest scalar table: its dK/dV steps (the forward's kept list has `T*k`)."""
  return layout.num_tiles * (layout.keep_tiles + 1)


def _attend(layout, interpret, kept, q, k, v):
  rows = _rows_per_call(q.shape[0], _table_ints_per_row(layout))
  out, lse = _grouped(functools.partial(_forward_call, layout, interpret), rows, kept, q, k, v)
  return out, lse[:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rows_attention(layout, interpret, kept, q, k, v):
  return _attend(layout, interpret, kept, q, k, v)[0]


def _rows_forward(layout, interpret, kept, q, k, v):
  out, lse = _attend(layout, interpret, kept, q, k, v)
  return out, (kept, q, k, v, out, lse)


def _rows_backward(layout, interpret, residuals, d_out):
  kept, q, k, v, out, lse = residuals
  di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  rows = _rows_per_call(q.shape[0], _table_ints_per_row(layout))
  args = (kept, q, k, v, lse, di, d_out.astype(q.dtype))
  dq = _grouped(functools.partial(_dq_call, layout, interpret), rows, *args)
  dk, dv = _grouped(functools.partial(_dkv_call, layout, interpret), rows, *args)
  # The dK/dV kernel leaves padding keys' rows unmasked (their values feed no real output); a select,
  # not a product, so whatever they hold never reaches the projections' weight gradients.
  real = jnp.asarray(layout.real())[None, :, None]
  return None, dq, jnp.where(real, dk, 0).astype(k.dtype), jnp.where(real, dv, 0).astype(v.dtype)


_rows_attention.defvjp(_rows_forward, _rows_backward)


def tile_splash_attention(layout: sparse_lib.TileLayout, query: jax.Array, key: jax.Array,
                          value: jax.Array, kept: jax.Array) -> jax.Array:
  """Self-attention of `[B, N, H, Dh]` tokens in `layout`'s tile order, each query tile over the key
  tiles `kept` `[B|1, H|1, T, k]` names (as `tile_attention`), on each device's batch and head shard.
  Returns `[B, N, H, Dh]`."""
  check_layout(layout)
  batch, _, heads, head_dim = query.shape
  kept = jnp.broadcast_to(kept, (batch, heads, layout.num_tiles, layout.keep_tiles)).astype(jnp.int32)
  # The kernel does not scale the logits; scaling q first is what the other backends compute.
  scaled = query * jnp.asarray(head_dim ** -0.5, query.dtype)
  run = functools.partial(_local, layout, traced_platform() != "tpu")
  kept_spec = jax.sharding.PartitionSpec(*sharding_lib.traced_spec(("act_batch", "act_heads")), None, None)
  return splash.on_local_shards(run, (scaled, key, value), (kept,), (kept_spec,))


def _local(layout, interpret, query, key, value, kept):
  """The kernels on this device's `[b, N, h, Dh]` shard, its (example, head) pairs as rows."""
  batch, tokens, heads, head_dim = query.shape
  rows = lambda x: jnp.swapaxes(x, 1, 2).reshape(batch * heads, tokens, head_dim)
  out = _rows_attention(layout, interpret, kept.reshape(batch * heads, *kept.shape[2:]),
                        rows(query), rows(key), rows(value))
  return jnp.swapaxes(out.reshape(batch, heads, tokens, head_dim), 1, 2)


__all__ = ["check_layout", "tile_splash_attention"]
