"""Tile-sparse self-attention: a clip's tokens in 3D tiles, each query tile attending a few key tiles.

Owns the tile layout of a patch grid (`TileLayout`: the permutation that puts each (t, h, w) tile of
tokens in one contiguous run, padding edge tiles to full size, and its inverse), the rules that
choose which key tiles a query tile sees (`kept_tiles`), and their token mask for kernels that take
one. The kernels (`attention.sparse_kernel` picks): `tile_attention` (XLA, any platform), on TPU `splash`
for `window` and `tile_splash` for the rules chosen per input, cuDNN under `window`'s mask.

- `window` (sliding-tile attention): the `keep_tiles` tiles nearest the query tile in the tile grid,
  each axis measured as a share of its extent; fixed by the grid, so `splash` builds its block mask
  ahead of time and skips every other block (the FLOPs drop on TPU).
- `topk` (the fine stage of video sparse attention): per example and head, tiles are pooled (mean of
  their real tokens' queries and keys) and each query tile keeps the `keep_tiles` key tiles with the
  highest pooled score. The choice depends on the input, so splash (whose block mask is built ahead of
  time) cannot run it: `tile_splash` (TPU) reads the chosen tiles as kernel operands, `tile_attention`
  gathers them.
- `window_topk`: half the kept tiles (rounded up) are the window's nearest, the rest the
  highest-scoring tiles outside it, as `topk` scores them: local detail from the window, and the far
  tiles a caption's attributes live in. Chosen per input, so it runs where `topk` does.

All keep exactly `keep_tiles` key tiles per query tile, so at one `keep` they cost the same FLOPs.
Padding tokens are never attended as keys; their own outputs are dropped when the DiT undoes the
permutation. No trainable parameters: a checkpoint trains and samples with or without sparsity.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import choices

RULES = choices.SPARSE_ATTENTION_RULES


@dataclasses.dataclass(frozen=True)
class TileLayout:
  """The tiling of one clip's patch grid `grid` (t, h, w) into tiles of `tile` tokens per axis.

  `tile` is already clipped to the grid; `keep_tiles` key tiles are attended per query tile by `rule`.
  Hashable and static: the DiT builds one per traced input shape.
  """

  grid: tuple[int, int, int]
  tile: tuple[int, int, int]
  keep_tiles: int
  rule: str

  @property
  def tile_grid(self) -> tuple[int, int, int]:
    return tuple(-(-g // t) for g, t in zip(self.grid, self.tile, strict=True))

  @property
  def num_tiles(self) -> int:
    return math.prod(self.tile_grid)

  @property
  def tile_volume(self) -> int:
    return math.prod(self.tile)

  @property
  def tokens(self) -> int:
    """Real tokens of the clip."""
    return math.prod(self.grid)

  @property
  def padded_tokens(self) -> int:
    """Tokens of the tiled sequence: every tile full, edge tiles padded."""
    return self.num_tiles * self.tile_volume

  @property
  def kept_fraction(self) -> float:
    """Share of (query tile, key tile) pairs computed: the attention FLOPs against dense."""
    return self.keep_tiles / self.num_tiles

  def order(self) -> np.ndarray:
    """`[padded_tokens]` int32: the patchify-order index of each tiled position, -1 for padding."""
    return _order(self.grid, self.tile)

  def real(self) -> np.ndarray:
    """`[padded_tokens]` bool: which tiled positions hold a token."""
    return self.order() >= 0

  def inverse(self) -> np.ndarray:
    """`[tokens]` int32: where each token (patchify order) sits in the tiled sequence."""
    inverse = np.empty(self.tokens, np.int32)
    order = self.order()
    inverse[order[order >= 0]] = np.flatnonzero(order >= 0).astype(np.int32)
    return inverse

  def positions(self) -> np.ndarray:
    """`[padded_tokens, 3]` patch-grid (t, h, w) of each tiled position; padding at (0, 0, 0)."""
    grid_positions = np.stack(np.meshgrid(*(np.arange(g) for g in self.grid), indexing="ij"),
                              axis=-1).reshape(-1, 3).astype(np.int32)
    order = self.order()
    return np.where((order >= 0)[:, None], grid_positions[np.maximum(order, 0)], 0).astype(np.int32)

  @property
  def window_tiles(self) -> int:
    """Key tiles per query tile taken from the window: all of them under `window`, none under `topk`,
    half (rounded up) under `window_topk`."""
    return {"window": self.keep_tiles, "topk": 0, "window_topk": -(-self.keep_tiles // 2)}[self.rule]

  @property
  def per_input(self) -> bool:
    """Whether the rule chooses tiles per input (so no ahead-of-time block mask can hold them)."""
    return self.rule != "window"

  def window(self) -> np.ndarray:
    """`[num_tiles, num_tiles]` bool: the window's key tiles of each query tile (`window_tiles` each)."""
    return _window(self.tile_grid, self.window_tiles)


def plan(grid, tile, keep: float, rule: str) -> TileLayout | None:
  """The layout of a clip with patch grid `grid` under `model.sparse_attention_*`, or None where the
  attention stays dense (keep = 1, or too few tiles for `keep` to drop one)."""
  if keep >= 1.0:
    return None
  if rule not in RULES:
    raise ValueError(f"model.sparse_attention_rule={rule!r}; expected one of {RULES}")
  grid = tuple(int(g) for g in grid)
  tile = tuple(min(int(t), g) for t, g in zip(tile, grid, strict=True))
  num_tiles = math.prod(-(-g // t) for g, t in zip(grid, tile, strict=True))
  keep_tiles = max(1, round(keep * num_tiles))
  if keep_tiles >= num_tiles:
    return None
  return TileLayout(grid, tile, keep_tiles, rule)


def model_plan(model, grid) -> TileLayout | None:
  """`plan` for the model config group `model` (its `sparse_attention_*` fields; a model config built
  outside configs/base.py without them is dense)."""
  keep = model.get("sparse_attention_keep", 1.0)
  if keep >= 1.0:
    return None
  return plan(grid, model.sparse_attention_tile, keep, model.sparse_attention_rule)


@functools.lru_cache(maxsize=64)
def _order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> np.ndarray:
  tile_grid = tuple(-(-g // t) for g, t in zip(grid, tile, strict=True))
  padded = tuple(n * t for n, t in zip(tile_grid, tile, strict=True))
  index = np.full(padded, -1, np.int32)
  index[:grid[0], :grid[1], :grid[2]] = np.arange(math.prod(grid), dtype=np.int32).reshape(grid)
  # [nt, tt, nh, th, nw, tw] -> [nt, nh, nw, tt, th, tw]: tiles row-major, tokens row-major inside.
  index = index.reshape(tile_grid[0], tile[0], tile_grid[1], tile[1], tile_grid[2], tile[2])
  order = index.transpose(0, 2, 4, 1, 3, 5).reshape(-1)
  order.setflags(write=False)
  return order


@functools.lru_cache(maxsize=64)
def _window(tile_grid: tuple[int, int, int], keep_tiles: int) -> np.ndarray:
  coords = np.stack(np.meshgrid(*(np.arange(n) for n in tile_grid), indexing="ij"), -1).reshape(-1, 3)
  # Each axis as a share of its extent, so the window spans the same fraction of time, height and width.
  scaled = coords / np.asarray(tile_grid, np.float64)
  distance = ((scaled[:, None, :] - scaled[None, :, :]) ** 2).sum(-1)
  # Nearest first, ties to the lower tile index: a stable sort keeps index order among equals.
  nearest = np.argsort(distance, axis=1, kind="stable")[:, :keep_tiles]
  window = np.zeros((len(coords), len(coords)), bool)
  np.put_along_axis(window, nearest, True, axis=1)
  window.setflags(write=False)
  return window


def to_tiles(layout: TileLayout, array: jax.Array, fill=0) -> jax.Array:
  """`[B, N, ...]` in patchify order -> `[B, padded_tokens, ...]` in tile order, padding set to `fill`."""
  order = layout.order()
  tiled = jnp.take(array, np.maximum(order, 0), axis=1)
  real = layout.real().reshape((1, -1) + (1,) * (array.ndim - 2))
  return jnp.where(real, tiled, jnp.asarray(fill, array.dtype))


def from_tiles(layout: TileLayout, array: jax.Array) -> jax.Array:
  """`[B, padded_tokens, ...]` in tile order -> `[B, N, ...]` in patchify order (padding dropped)."""
  return jnp.take(array, layout.inverse(), axis=1)


def kept_tiles(layout: TileLayout, query: jax.Array, key: jax.Array) -> jax.Array:
  """`[B|1, H|1, T, k]` int32: the key tiles each query tile attends, for tiled `[B, N, H, Dh]` q and k."""
  rows = None
  if layout.window_tiles:
    window = layout.window()
    rows = jnp.asarray(np.nonzero(window)[1].reshape(layout.num_tiles, layout.window_tiles), jnp.int32)
    if not layout.per_input:
      return rows[None, None]
  pooled_q, pooled_k = _pooled(layout, query), _pooled(layout, key)  # [B, H, T, Dh] fp32
  scores = jax.lax.stop_gradient(jnp.einsum("bhqd,bhkd->bhqk", pooled_q, pooled_k))
  if rows is None:
    return jax.lax.top_k(scores, layout.keep_tiles)[1].astype(jnp.int32)
  # The window's tiles are already kept: the scores choose among the others only.
  scores = jnp.where(jnp.asarray(window), -jnp.inf, scores)
  chosen = jax.lax.top_k(scores, layout.keep_tiles - layout.window_tiles)[1].astype(jnp.int32)
  return jnp.concatenate([jnp.broadcast_to(rows, chosen.shape[:2] + rows.shape), chosen], axis=-1)


def _pooled(layout: TileLayout, tokens: jax.Array) -> jax.Array:
  """`[B, H, T, Dh]` fp32 mean of each tile's real tokens of tiled `[B, N, H, Dh]`."""
  batch, _, heads, head_dim = tokens.shape
  real = jnp.asarray(layout.real(), jnp.float32).reshape(layout.num_tiles, layout.tile_volume)
  tiles = tokens.astype(jnp.float32).reshape(batch, layout.num_tiles, layout.tile_volume, heads, head_dim)
  sums = jnp.einsum("btvhd,tv->bhtd", tiles, real)
  return sums / real.sum(-1)[None, None, :, None]


def token_mask(layout: TileLayout, kept: jax.Array) -> jax.Array:
  """`[B|1, H|1, N, N]` bool over the tiled sequence from `kept_tiles`: a query sees the real tokens of
  its kept tiles (the masked form, for kernels that take a mask)."""
  volume = layout.tile_volume
  tiles = jnp.any(kept[..., None] == jnp.arange(layout.num_tiles), axis=-2)  # [.., T, T]
  mask = jnp.repeat(jnp.repeat(tiles, volume, axis=-2), volume, axis=-1)
  return mask & jnp.asarray(layout.real())[None, None, None, :]


__all__ = ["RULES", "TileLayout", "from_tiles", "kept_tiles", "model_plan", "plan", "to_tiles",
           "token_mask"]
