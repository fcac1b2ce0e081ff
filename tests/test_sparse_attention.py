"""Tile-sparse self-attention: the tile layout, both rules against a dense reference that applies the
same mask (values and gradients), splash's block-skipping kernel against the masked path, the DiT's
permutation, the config's refusals and the FLOPs it counts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sora_jax.configs import base

from sora_jax import config as config_lib
from sora_jax.model import attention as attention_lib
from sora_jax.model import dit, flops
from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model import xla_attention as xla_lib


def _grid_coords(grid):
  return np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)


def _tile_of_token(layout):
  """Each token's tile index (patchify order), from its coordinates alone."""
  coords = _grid_coords(layout.grid) // np.asarray(layout.tile)
  tiles_h, tiles_w = layout.tile_grid[1:]
  return (coords[:, 0] * tiles_h + coords[:, 1]) * tiles_w + coords[:, 2]


@pytest.mark.parametrize("grid,tile",
                         [((3, 5, 6), (2, 2, 4)), ((1, 8, 8), (2, 4, 4)), ((4, 3, 7), (1, 3, 2))])
def test_layout_puts_each_tile_in_one_run_and_round_trips(grid, tile):
  layout = sparse_lib.plan(grid, tile, 0.3, "window")
  order = layout.order()
  assert len(order) == layout.padded_tokens and layout.padded_tokens % layout.tile_volume == 0
  assert sorted(order[order >= 0]) == list(range(layout.tokens))  # every token once
  expected_tile = _tile_of_token(layout)
  for index, run in enumerate(order.reshape(layout.num_tiles, layout.tile_volume)):
    assert (run >= 0).any()  # no tile is all padding
    assert (expected_tile[run[run >= 0]] == index).all()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, layout.tokens, 3)), jnp.float32)
  tiled = sparse_lib.to_tiles(layout, x, fill=7.0)
  np.testing.assert_array_equal(tiled[:, ~layout.real()], 7.0)
  np.testing.assert_array_equal(sparse_lib.from_tiles(layout, tiled), x)
  np.testing.assert_array_equal(layout.positions()[layout.real()], _grid_coords(grid)[order[order >= 0]])


def test_window_keeps_the_nearest_tiles_itself_first():
  layout = sparse_lib.plan((6, 8, 8), (2, 4, 4), 0.25, "window")
  window = layout.window()
  assert layout.keep_tiles == 3 and window.sum(1).tolist() == [3] * layout.num_tiles
  assert window[np.arange(layout.num_tiles), np.arange(layout.num_tiles)].all()
  coords = _grid_coords(layout.tile_grid) / np.asarray(layout.tile_grid)
  distance = ((coords[:, None] - coords[None]) ** 2).sum(-1)
  for row, kept in zip(distance, window, strict=True):
    assert row[kept].max() <= row[~kept].min()


def test_window_topk_keeps_half_the_window_and_the_best_scoring_far_tiles():
  layout = sparse_lib.plan((6, 8, 8), (2, 4, 4), 0.5, "window_topk")
  assert (layout.keep_tiles, layout.window_tiles) == (6, 3) and layout.per_input
  assert not sparse_lib.plan((6, 8, 8), (2, 4, 4), 0.5, "window").per_input
  one = sparse_lib.plan((6, 8, 8), (2, 4, 4), 0.1, "window_topk")  # one tile kept: the query tile itself
  assert (one.keep_tiles, one.window_tiles) == (1, 1) and one.per_input
  q, k, _, _ = _qkv(layout)
  tiled_q, tiled_k = (sparse_lib.to_tiles(layout, x) for x in (q, k))
  kept = np.asarray(sparse_lib.kept_tiles(layout, tiled_q, tiled_k))  # [B, H, T, 6]
  assert kept.shape == (2, 2, layout.num_tiles, 6)
  window = np.nonzero(layout.window())[1].reshape(layout.num_tiles, 3)
  np.testing.assert_array_equal(kept[..., :3], np.broadcast_to(window, kept.shape[:2] + window.shape))
  assert all(len(set(row)) == 6 for row in kept.reshape(-1, 6))  # the far tiles are outside the window
  topk_layout = sparse_lib.plan((6, 8, 8), (2, 4, 4), 0.5, "topk")
  topk = np.asarray(sparse_lib.kept_tiles(topk_layout, tiled_q, tiled_k))
  assert not np.array_equal(np.sort(kept, -1), np.sort(topk, -1))


def test_plan_is_dense_where_keep_drops_nothing():
  assert sparse_lib.plan((4, 8, 8), (2, 8, 8), 1.0, "window") is None
  assert sparse_lib.plan((2, 8, 8), (2, 8, 8), 0.5, "window") is None  # one tile
  assert sparse_lib.plan((1, 8, 8), (2, 4, 4), 0.5, "topk").tile == (1, 4, 4)  # clipped to the grid
  with pytest.raises(ValueError, match="sparse_attention_rule='diag'"):
    sparse_lib.plan((4, 8, 8), (2, 4, 4), 0.5, "diag")


def _reference_mask(layout, query, key):
  """[B, H, N, N] over real tokens in patchify order, built without the module's mask code."""
  tile_of = _tile_of_token(layout)
  window = np.broadcast_to(layout.window(), (query.shape[0], query.shape[2]) + layout.window().shape)
  tiles = window.copy()
  if layout.rule != "window":
    def pooled(x):
      sums = np.zeros((x.shape[0], x.shape[2], layout.num_tiles, x.shape[3]))
      np.add.at(sums, (slice(None), slice(None), tile_of), np.moveaxis(np.asarray(x, np.float64), 1, 2))
      return sums / np.bincount(tile_of, minlength=layout.num_tiles)[:, None]
    scores = np.where(window, -np.inf, np.einsum("bhqd,bhkd->bhqk", pooled(query), pooled(key)))
    top = np.argsort(-scores, axis=-1)[..., :layout.keep_tiles - layout.window_tiles]
    np.put_along_axis(tiles, top, True, axis=-1)
  assert (tiles.sum(-1) == layout.keep_tiles).all()
  return jnp.asarray(tiles[:, :, tile_of][:, :, :, tile_of])


def _qkv(layout, batch=2, heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, layout.tokens, heads, head_dim)), jnp.float32)
               for _ in range(4))


def _sparse_in_token_order(layout, backend="xla"):
  def attend(q, k, v):
    tiled = [sparse_lib.to_tiles(layout, x) for x in (q, k, v)]
    return sparse_lib.from_tiles(layout, attention_lib.attention(*tiled, backend=backend, sparse=layout))
  return attend


def _value_and_grads(attend, q, k, v, w):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)


def _assert_close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got[0], want[0], rtol=rtol)
  for a, b, name in zip(got[1], want[1], ("dq", "dk", "dv"), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("rule", sparse_lib.RULES)
def test_sparse_equals_dense_attention_under_the_same_mask(rule):
  layout = sparse_lib.plan((3, 6, 6), (1, 3, 2), 0.3, rule)
  q, k, v, w = _qkv(layout)
  mask = _reference_mask(layout, q, k)
  reference = lambda q, k, v: xla_lib.reference_attention(q, k, v, mask)
  _assert_close(_value_and_grads(_sparse_in_token_order(layout), q, k, v, w),
                _value_and_grads(reference, q, k, v, w))
  dense = xla_lib.reference_attention(q, k, v)
  assert not np.allclose(_sparse_in_token_order(layout)(q, k, v), dense, atol=1e-3)  # it does skip


def test_segment_ids_take_the_masked_path_with_the_same_result():
  layout = sparse_lib.plan((3, 6, 6), (1, 3, 2), 0.3, "topk")
  q, k, v, _ = _qkv(layout)
  tiled = [sparse_lib.to_tiles(layout, x) for x in (q, k, v)]
  ones = jnp.ones((2, layout.padded_tokens), jnp.int32)
  masked = attention_lib.attention(*tiled, sparse=layout, query_segment_ids=ones, kv_segment_ids=ones)
  gathered = attention_lib.attention(*tiled, sparse=layout)
  real = layout.real()
  np.testing.assert_allclose(masked[:, real], gathered[:, real], rtol=1e-5, atol=1e-6)


def test_keeping_every_tile_equals_dense_attention():
  layout = sparse_lib.plan((3, 6, 6), (2, 4, 4), 0.5, "window")
  every = sparse_lib.TileLayout(layout.grid, layout.tile, layout.num_tiles, "window")  # padded, all kept
  q, k, v, w = _qkv(every)
  _assert_close(_value_and_grads(_sparse_in_token_order(every), q, k, v, w),
                _value_and_grads(xla_lib.reference_attention, q, k, v, w))


@pytest.mark.parametrize("grid,tile", [((4, 8, 16), (1, 8, 16)), ((4, 8, 8), (2, 4, 4))],
                         ids=["tile-blocks", "partial-blocks"])
def test_splash_skips_the_same_blocks_the_mask_drops(grid, tile):
  # 128-token tiles run one kernel block per tile; 32-token tiles straddle 128-token blocks.
  layout = sparse_lib.plan(grid, tile, 0.5, "window")
  q, k, v, w = _qkv(layout, batch=1, heads=2, head_dim=16)
  _assert_close(_value_and_grads(_sparse_in_token_order(layout, "splash"), q, k, v, w),
                _value_and_grads(_sparse_in_token_order(layout, "xla"), q, k, v, w))


def _model_config(**overrides):
  model = base.get_config().model
  model.update(dim=48, num_heads=4, ffn_dim=96, num_layers=2, in_channels=4, out_channels=4,
               text_dim=24, freq_dim=32, rope_max_seq_len=16, compute_dtype="float32",
               sparse_attention_tile=(1, 2, 2))
  model.update(**overrides)
  return model


def _dit_inputs(model, latent=(3, 8, 12), batch=2):
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((batch, *latent, model.in_channels)), jnp.float32)
  tokens = np.prod(latent) // np.prod(model.patch_size)
  timesteps = jnp.asarray(rng.uniform(0, 1000, (batch, tokens)), jnp.float32)  # per token
  text = jnp.asarray(rng.standard_normal((batch, 5, model.text_dim)), jnp.float32)
  return latents, timesteps, text


@pytest.mark.parametrize("options",
                         [dict(), dict(abs_pos_embedding=True, prediction="x0", scan_layers=False)],
                         ids=["velocity", "abs-pos-x0-unscanned"])
def test_dit_permutation_is_undone_exactly(monkeypatch, options):
  # Keeping every tile, the tiled DiT (padding tokens included) must compute the dense model.
  dense_model, sparse_model = _model_config(**options), _model_config(sparse_attention_keep=0.5, **options)
  latents, timesteps, text = _dit_inputs(dense_model)
  params = dit.init_params(dense_model, jax.random.key(0), (1, 2, 2, 4), 5)
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # no zero-initialised head
  dense = dit.DiT(dense_model).apply({"params": params}, latents, timesteps, text)
  real_plan = sparse_lib.plan
  every = lambda grid, tile, keep, rule: sparse_lib.TileLayout(tuple(grid), (2, 3, 4), 8, rule)
  monkeypatch.setattr(sparse_lib, "plan", every)  # grid (3, 4, 6) in 2 x 3 x 4 tiles: padded, all 8 kept
  tiled = dit.DiT(sparse_model).apply({"params": params}, latents, timesteps, text)
  np.testing.assert_allclose(tiled, dense, rtol=1e-5, atol=1e-5)
  monkeypatch.setattr(sparse_lib, "plan", real_plan)
  sparse = dit.DiT(sparse_model).apply({"params": params}, latents, timesteps, text)
  assert sparse.shape == dense.shape and np.isfinite(np.asarray(sparse)).all()
  assert not np.allclose(sparse, dense, atol=1e-4)


def test_config_refuses_what_tiling_cannot_do():
  def check(match, **groups):
    config = base.get_config()
    config.model.sparse_attention_keep = 0.5
    for group, fields in groups.items():
      config[group].update(fields)
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(config)

  check(r"sparse_attention_keep=1.5", model=dict(sparse_attention_keep=1.5))
  check(r"sparse_attention_keep=0.0", model=dict(sparse_attention_keep=0.0))
  check(r"sparse_attention_tile=\(2, 8\)", model=dict(sparse_attention_tile=(2, 8)))
  check(r"sparse_attention_rule='diag'", model=dict(sparse_attention_rule="diag"))
  check(r"packed rows \(data.packing\)", data=dict(packing=True))
  check(r"attention_backend='ring' splits it", model=dict(attention_backend="ring"))


def test_flops_count_the_kept_tiles():
  config = base.get_config()
  model = config.model
  wan_14b = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, patch_size=(1, 2, 2))
  model.update(**wan_14b)
  latent = (21, 90, 160, 16)  # 720p x 81 frames
  dense = flops.train_flops_per_example(model, latent, 512)
  model.update(sparse_attention_keep=0.25)
  sparse_parts = flops.flops_breakdown(model, latent, 512)
  layout = sparse_lib.model_plan(model, (21, 45, 80))
  assert sparse_parts["sparse_kept"] == pytest.approx(layout.kept_fraction)
  sparse = flops.train_flops_per_example(model, latent, 512)
  assert sparse <= 0.55 * dense
  # What the chips compute also runs on the padded tiles: every block's matmuls on the padded sequence
  # (21 x 45 x 80 in (2, 8, 8) tiles: 11 x 6 x 10 tiles), the kept pairs of it in self-attention.
  padded = flops.flops_breakdown(model, latent, 512, hardware=True)
  assert layout.padded_tokens == 11 * 6 * 10 * 128
  share = layout.padded_tokens / layout.tokens
  matmuls = lambda parts: parts["blocks"] - parts["attention"]  # text k/v projections do not grow
  assert share * 0.99 * matmuls(sparse_parts) < matmuls(padded) < share * matmuls(sparse_parts)
  assert padded["attention"] > share * sparse_parts["attention"]
  assert padded["embed"] == sparse_parts["embed"] and padded["head"] == sparse_parts["head"]
  assert sparse < flops.train_flops_per_example(model, latent, 512, hardware=True) < 1.2 * sparse
  model.update(sparse_attention_keep=1.0)
  assert flops.flops_breakdown(model, latent, 512, hardware=True) == flops.flops_breakdown(model, latent, 512)
  assert flops.flops_breakdown(model, latent, 512)["sparse_kept"] == 1.0


def test_model_configs_without_the_fields_stay_dense():
  model = ml_collections.ConfigDict({"patch_size": (1, 2, 2)})
  assert sparse_lib.model_plan(model, (4, 8, 8)) is None


def test_splash_blocks_follow_tiles_within_scalar_memory():
  from sora_jax.model import splash

  grid = (21, 45, 80)  # 720p x 81 frames under 1x2x2 patches
  block = lambda tile, keep: splash._tile_block(sparse_lib.plan(grid, tile, keep, "window"))
  # One tile per block would be 660 x 165 grid entries, over scalar memory (the v5p compile fails).
  assert block((2, 8, 8), 0.25) == 256
  assert block((2, 8, 8), 0.5) == 512
  assert block((2, 16, 16), 0.25) == 512
  assert block((2, 8, 8), 0.1) == 128
  assert block((2, 4, 4), 0.25) is None  # 32-token tiles: the usual blocks, partial where they straddle
  layout = sparse_lib.plan(grid, (2, 8, 8), 0.25, "window")
  assert splash._padded_length(layout.padded_tokens, layout) % 256 == 0
