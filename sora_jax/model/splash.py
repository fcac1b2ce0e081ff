"""The `splash` attention backend: JAX's Pallas TPU flash-attention kernel (splash attention).

Owns the call into `jax.experimental.pallas.ops.tpu.splash_attention`: the 1/sqrt(Dh) scale (the
kernel does not scale), padding the sequence to the kernel's blocks (padding tokens get their own
segment, so real tokens never see them), packing segments, tile-sparse masks (`sparse_attention`'s
`window` rule: the kernel skips every block outside a query tile's window), one kernel per example
(vmap), and the `jax.shard_map` that runs it on each device's batch and head shard (a Pallas call
is opaque to XLA's partitioner, which would otherwise gather the inputs). The sequence itself must
not be split: with a `context` axis use `ring` or `all_to_all`.

On TPU the kernel is compiled (`sora_jax.compile` compiles it for a TPU topology from a CPU host); on
any other platform it runs in Pallas interpret mode, which is slow but exact, so tests check it
against the `xla` backend on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model.platform import traced_platform
from sora_jax.parallel import sharding as sharding_lib

# Kernel tiles: the largest of these that divides the padded sequence; sequences pad to a multiple of
# the smallest. 512 is what MaxText runs video/LLM training with on v5p; small sequences use 128.
_BLOCKS = (512, 256, 128)
_PAD_SEGMENT = -1
# Entries of the kernel's block grid, whose metadata it holds in the core's 1 MiB scalar memory: a
# sparse mask needs about 9 bytes each (the 14B at 720p x 81 in 128-token tiles, 660 query blocks x
# 166 kept key blocks, asked 1.01 MiB on v5p and did not compile).
_MAX_GRID_ENTRIES = 80_000


def _on_tpu() -> bool:
  """Whether the mesh being traced under (else the default backend) is made of TPUs."""
  return traced_platform() == "tpu"


def _padded_length(tokens: int, layout: sparse_lib.TileLayout | None = None) -> int:
  """Sequence length the kernel runs: a multiple of 128, or of 512 for long sequences; with a tile
  layout whose tiles fill whole 128-lane blocks, a multiple of the tile (`_tile_block`).

  The kernel keeps per-block metadata in the core's scalar memory (1 MiB on v5p): 75,600 tokens (a
  720p x 81 clip) in 128-token blocks need 1.08 MiB of it and do not compile; 512-token blocks need a
  sixteenth, for at most 511 tokens (0.7%) of padding. A sparse mask keeps only the kept blocks' entries.
  """
  block = _tile_block(layout) or (_BLOCKS[0] if tokens >= 4 * _BLOCKS[0] else _BLOCKS[-1])
  return -(-tokens // block) * block


def _tile_block(layout: sparse_lib.TileLayout | None) -> int | None:
  """Kernel block of a tile layout: one tile where a tile is a whole number of 128-token lanes, so each
  block is wholly kept or skipped; two or four tiles where one-tile blocks would overflow scalar memory
  (then a block is kept if any of its tile pairs is). None where no such block of at most 1024 tokens
  exists: the usual blocks then straddle tiles, still exact, as partial blocks."""
  if layout is None or layout.tile_volume % _BLOCKS[-1]:
    return None
  for tiles in (1, 2, 4):
    if tiles * layout.tile_volume <= 2 * _BLOCKS[0] and _grid_entries(layout, tiles) <= _MAX_GRID_ENTRIES:
      return tiles * layout.tile_volume
  return None


def _grid_entries(layout: sparse_lib.TileLayout, tiles: int) -> int:
  """Entries of the kernel's shrunk block grid with blocks of `tiles` tiles: blocks x the most kept
  blocks of any row (forward) or column (dK/dV). A block is kept if any of its tile pairs is; the
  kernel's own padding (the last block's tail) is kept by every row and column."""
  blocks = -(-layout.num_tiles // tiles)
  padded = np.zeros((blocks * tiles,) * 2, bool)
  padded[:layout.num_tiles, :layout.num_tiles] = layout.window()
  padded[layout.num_tiles:, :] = padded[:, layout.num_tiles:] = True
  kept = padded.reshape(blocks, tiles, blocks, tiles).any(axis=(1, 3))
  return blocks * int(max(kept.sum(0).max(), kept.sum(1).max()))


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     query_segment_ids: jax.Array | None = None,
                     kv_segment_ids: jax.Array | None = None,
                     layout: sparse_lib.TileLayout | None = None) -> jax.Array:
  """`[B, Nq, H, Dh]` attention through the splash kernel; segment ids `[B, N]` as `attention`'s.

  `layout`: self-attention over tokens in tile order, each query tile seeing its `window` tiles.
  """
  batch, num_queries, heads, head_dim = query.shape
  num_keys = key.shape[1]
  if (query_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("segment ids must be given for both queries and keys, or for neither")
  if layout is not None and layout.per_input:  # attention.py sends these to `tile_splash`
    raise ValueError(f"splash's ahead-of-time block mask cannot follow rule {layout.rule!r}, which "
                     f"chooses tiles per input")
  padded_q, padded_k = (_padded_length(n, layout) for n in (num_queries, num_keys))

  def segments(ids, tokens, padded):
    ids = jnp.zeros((batch, tokens), jnp.int32) if ids is None else ids.astype(jnp.int32)
    return jnp.pad(ids, ((0, 0), (0, padded - tokens)), constant_values=_PAD_SEGMENT)

  pad = lambda x, padded: jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))
  # The kernel does not scale the logits; scaling q first is what the other backends compute.
  query = pad(query * jnp.asarray(head_dim ** -0.5, query.dtype), padded_q)
  key, value = pad(key, padded_k), pad(value, padded_k)
  q_ids = segments(query_segment_ids, num_queries, padded_q)
  kv_ids = segments(kv_segment_ids, num_keys, padded_k)

  run = functools.partial(_local_splash, padded_q, padded_k, not _on_tpu(), layout)
  ids_spec = sharding_lib.traced_spec(("act_batch", "act_seq"), {"act_seq": None})
  out = on_local_shards(run, (query, key, value), (q_ids, kv_ids), (ids_spec, ids_spec))
  return out[:, :num_queries]


def on_local_shards(run, tokens: tuple[jax.Array, ...], extras: tuple[jax.Array, ...] = (),
                    extra_specs: tuple[jax.sharding.PartitionSpec, ...] = ()) -> jax.Array:
  """`run(*tokens, *extras)` on each device's batch and head shard of the `[B, N, H, Dh]` `tokens` (a
  Pallas call is opaque to XLA's partitioner, which would otherwise gather its inputs); `extras` are
  split by `extra_specs`. Returns the `[B, N, H, Dh]` result. The sequence must not be split."""
  if jax.sharding.get_abstract_mesh().empty:
    return run(*tokens, *extras)
  if split := sharding_lib.traced_mesh_axes("act_seq"):
    raise ValueError(
        f"model.attention_backend='splash' needs each sequence on one device, but the rules split "
        f"'seq' over {split}; use 'ring' or 'all_to_all' for context parallelism")
  spec = sharding_lib.traced_spec(("act_batch", "act_seq", "act_heads", "act_head_dim"), {"act_seq": None})
  return jax.shard_map(run, in_specs=(spec,) * len(tokens) + tuple(extra_specs), out_specs=spec,
                       check_vma=False)(*tokens, *extras)


def _local_splash(padded_q, padded_k, interpret, layout, query, key, value, q_ids, kv_ids):
  """The kernel on this device's `[b, N, h, Dh]` shard: one call per example over its heads."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  heads = query.shape[2]
  block_q = _tile_block(layout) or next(b for b in _BLOCKS if padded_q % b == 0)
  block_kv = _tile_block(layout) or next(b for b in _BLOCKS if padded_k % b == 0)
  # Separate dQ and dK/dV kernels: the fused backward keeps a dQ partial per key block (6.1 GiB
  # against 0.47 GiB of temporaries for 12 heads x 32k tokens on v5p, docs/benchmarks.md).
  sizes = kernel_lib.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
      block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
  if layout is None:
    head_mask = mask_lib.FullMask((padded_q, padded_k))
  else:
    head_mask = _tile_mask_class(mask_lib.Mask)(layout, (padded_q, padded_k))
  mask = mask_lib.MultiHeadMask([head_mask] * heads)
  splash = kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)

  def one(q, k, v, q_seg, kv_seg):  # [N, h, Dh] -> the kernel's [h, N, Dh]
    heads_first = lambda x: jnp.swapaxes(x, 0, 1)
    out = splash(heads_first(q), heads_first(k), heads_first(v),
                 segment_ids=kernel_lib.SegmentIds(q=q_seg, kv=kv_seg))
    return heads_first(out)

  return jax.vmap(one)(query, key, value, q_ids, kv_ids).astype(query.dtype)


@functools.cache
def _tile_mask_class(base: type) -> type:
  """The splash `Mask` of a tile layout's `window` rule (built on first use: the kernel's modules load
  only when splash runs)."""

  class TileWindowMask(base):
    """Token-level mask of tiled self-attention: query tile i sees the real tokens of its window tiles.

    Positions past the layout (the kernel's own padding) read True: their segment id keeps them apart.
    """

    def __init__(self, layout: sparse_lib.TileLayout, shape: tuple[int, int]):
      self.layout, self._shape = layout, shape
      # Tile pairs, with the kernel's own padding as one more tile that every query sees.
      self._window = np.pad(layout.window(), ((0, 1), (0, 1)), constant_values=True)
      self._real = np.pad(layout.real(), (0, shape[1] - layout.padded_tokens), constant_values=True)

    @property
    def shape(self) -> tuple[int, int]:
      return self._shape

    def __getitem__(self, idx) -> np.ndarray:
      rows, cols = (np.arange(self._shape[axis])[part] for axis, part in enumerate(idx))
      layout, window, real = self.layout, self._window, self._real
      q_tiles = np.minimum(rows // layout.tile_volume, layout.num_tiles)
      k_tiles = np.minimum(cols // layout.tile_volume, layout.num_tiles)
      if q_tiles[0] == q_tiles[-1] and k_tiles[0] == k_tiles[-1]:
        # The kernel asks block by block; a block inside one tile pair is one bit and the keys' padding
        # (a broadcast view: full-size masks of 75k-token clips would take minutes to build).
        keys = real[cols] if window[q_tiles[0], k_tiles[0]] else np.zeros(len(cols), bool)
        return np.broadcast_to(keys[None, :], (len(rows), len(cols)))
      return window[q_tiles[:, None], k_tiles[None, :]] & real[cols][None, :]

    def __eq__(self, other: object) -> bool:
      return isinstance(other, TileWindowMask) and (self.layout, self._shape) == (other.layout, other._shape)

    def __hash__(self) -> int:
      return hash((TileWindowMask, self.layout, self._shape))

  return TileWindowMask
