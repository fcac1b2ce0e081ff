"""`tile_splash`, the TPU kernel of per-input tile-sparse attention (Pallas interpret mode on CPU): values
and gradients against `tile_attention` through the `splash` backend (padded edge tiles, key tiles no query
keeps), calls in row groups, on a sharded mesh, its dK/dV step list, the layouts it leaves to
`tile_attention`, the DiT's loss and gradients on it, and its compile for a TPU topology."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.model import attention as attention_lib
from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model import tile_attention, tile_splash
from sora_jax.parallel import sharding as sharding_lib

# 2 x 4 x 40 patches in 1 x 4 x 32 tiles: 4 tiles of 128 tokens, the two w-edge tiles half padding.
_GRID, _TILE = (2, 4, 40), (1, 4, 32)
_RULES = (("act_batch", ("data", "fsdp")), ("act_seq", "context"), ("act_heads", "tensor"),
          ("act_head_dim", None))


def _tiled_qkvw(layout, batch=2, heads=2, head_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(sparse_lib.to_tiles(layout, jnp.asarray(
      rng.standard_normal((batch, layout.tokens, heads, head_dim)), jnp.float32)) for _ in range(4))


def _value_and_grads(attend, layout, q, k, v, w):
  real = jnp.asarray(layout.real())[None, :, None, None]  # what the DiT keeps of the tiled output
  loss = lambda q, k, v: jnp.sum(jnp.where(real, attend(q, k, v), 0.0) * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_close(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b, name in zip(got[1], want[1], ("dq", "dk", "dv"), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("rule", ["topk", "window_topk"])
def test_splash_backend_runs_per_input_rules_as_tile_attention_does(rule):
  layout = sparse_lib.plan(_GRID, _TILE, 0.5, rule)
  q, k, v, w = _tiled_qkvw(layout)
  attend = lambda backend: lambda q, k, v: attention_lib.attention(q, k, v, backend=backend, sparse=layout)
  _assert_close(_value_and_grads(attend("splash"), layout, q, k, v, w),
                _value_and_grads(attend("xla"), layout, q, k, v, w))


def test_tiles_nobody_keeps_and_row_groups(monkeypatch):
  # Every query tile keeps tiles 1 and 3 only (0 and 2 get no gradient), heads differing in order.
  layout = sparse_lib.TileLayout(_GRID, _TILE, 2, "topk")
  kept = jnp.asarray([[[1, 3]] * 4, [[3, 1]] * 4], jnp.int32)[None]  # [1, H, T, k]
  q, k, v, w = _tiled_qkvw(layout)
  kernel = lambda q, k, v: tile_splash.tile_splash_attention(layout, q, k, v, kept)
  want = _value_and_grads(lambda q, k, v: tile_attention.tile_attention(layout, q, k, v, kept),
                          layout, q, k, v, w)
  got = _value_and_grads(kernel, layout, q, k, v, w)
  _assert_close(got, want)
  for grad in got[1][1:]:  # dK, dV of the unkept tiles are written, as zeros
    tiles = np.asarray(grad).reshape(2, layout.num_tiles, layout.tile_volume, -1)
    assert not tiles[:, [0, 2]].any() and tiles[:, [1, 3]].any()
  # Tables too large for one call: one row (example, head) per call, in a loop.
  monkeypatch.setattr(tile_splash, "_TABLE_BYTES", 4 * tile_splash._table_ints_per_row(layout))
  assert tile_splash._rows_per_call(4, tile_splash._table_ints_per_row(layout)) == 1
  _assert_close(_value_and_grads(kernel, layout, q, k, v, w), want)


def test_on_a_sharded_mesh():
  layout = sparse_lib.plan(_GRID, _TILE, 0.5, "window_topk")
  q, k, v, w = _tiled_qkvw(layout, batch=4, heads=4)
  attend = lambda backend: lambda q, k, v: attention_lib.attention(q, k, v, backend=backend, sparse=layout)
  mesh = jax.make_mesh((2, 2, 1, 2), ("data", "fsdp", "context", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  with sharding_lib.mesh_context(mesh, _RULES):
    got = _value_and_grads(attend("splash"), layout, q, k, v, w)
  _assert_close(got, _value_and_grads(attend("xla"), layout, q, k, v, w))


def test_dkv_steps_visit_each_kept_pair_once_grouped_by_key_tile():
  rng = np.random.default_rng(1)
  num_tiles, keep = 7, 3
  kept = np.stack([np.stack([rng.choice(num_tiles, keep, replace=False) for _ in range(num_tiles)])
                   for _ in range(5)]).astype(np.int32)
  kept[0] = np.arange(keep)  # row 0: tiles 3..6 kept by nobody
  steps = np.asarray(tile_splash._dkv_steps(jnp.asarray(kept), num_tiles))
  assert steps.shape == (5, num_tiles * (keep + 1))
  key_of, query_of = steps >> tile_splash._KV_SHIFT, (steps >> tile_splash._Q_SHIFT) & 8191
  first, last = steps & tile_splash._FIRST > 0, steps & tile_splash._LAST > 0
  compute = steps & tile_splash._COMPUTE > 0
  for row in range(5):
    pairs = sorted(zip(key_of[row][compute[row]].tolist(), query_of[row][compute[row]].tolist(), strict=True))
    want = sorted((int(key), query) for query in range(num_tiles) for key in kept[row, query])
    assert pairs == want  # every (key tile, query tile) pair once
    assert (np.diff(key_of[row]) >= 0).all()  # grouped by key tile
    # Each key tile is started once and written once (after its last step), kept or not.
    assert sorted(key_of[row][first[row]].tolist()) == list(range(num_tiles))
    assert sorted(key_of[row][last[row]].tolist()) == list(range(num_tiles))
    assert first[row][0] and last[row][-1]
  assert not compute[0][key_of[0] >= keep].any()
  # A step that computes nothing names the query tile before it: no fetch.
  idle = ~compute[:, 1:]
  assert (query_of[:, 1:][idle] == query_of[:, :-1][idle]).all()


def test_tiles_the_kernel_cannot_hold_run_on_tile_attention(monkeypatch):
  # A one-frame clip shrinks (2, 8, 8) tiles to 64 tokens: off the kernel's 128-token lanes.
  image = sparse_lib.plan((1, 16, 32), (2, 8, 8), 0.5, "window_topk")
  assert "holds 64 tokens per tile" in tile_splash.unfit_reason(image)
  assert attention_lib.sparse_kernel("splash", image) == "tile_attention"
  q, k, v, _ = _tiled_qkvw(image, batch=1)
  np.testing.assert_allclose(attention_lib.attention(q, k, v, backend="splash", sparse=image),
                             attention_lib.attention(q, k, v, backend="xla", sparse=image), rtol=1e-6)
  with pytest.raises(ValueError, match=r"sparse_attention_tile=\(1, 8, 8\) holds 64 tokens per tile"):
    tile_splash.check_layout(image)
  # One (example, head)'s tile table over the scalar memory's budget.
  layout = sparse_lib.plan(_GRID, _TILE, 0.5, "topk")
  assert attention_lib.sparse_kernel("splash", layout) == "tile_splash"
  monkeypatch.setattr(tile_splash, "_TABLE_BYTES", 4 * tile_splash._table_ints_per_row(layout) - 4)
  assert "KiB of tile table per (example, head)" in tile_splash.unfit_reason(layout)
  assert attention_lib.sparse_kernel("splash", layout) == "tile_attention"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (setup.py extra 'tpu')")
def test_compiles_for_a_tpu_topology():
  # Mosaic lowers the three kernels (the AOT compile of a TPU program), not interpret mode.
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
  layout = sparse_lib.plan((6, 8, 48), (2, 8, 16), 0.25, "window_topk")  # 256-token tiles
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
  shape = jax.ShapeDtypeStruct((2, layout.padded_tokens, 4, 128), jnp.bfloat16,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def loss(q, k, v):
    out = attention_lib.attention(q, k, v, backend="splash", sparse=layout)
    return jnp.sum(out.astype(jnp.float32))

  with jax.set_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape)
    lowered.compile()
  text = lowered.as_text()
  assert all(f"tile_splash_{kernel}" in text for kernel in ("fwd", "dq", "dkv"))


def test_the_dit_trains_the_same_on_tile_splash_as_on_tile_attention():
  from sora_jax.configs import base

  from sora_jax.model import dit

  def model(backend):
    config = base.get_config().model
    config.update(dim=32, num_heads=2, ffn_dim=64, num_layers=2, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, rope_max_seq_len=64, compute_dtype="float32",
                  attention_backend=backend, sparse_attention_keep=0.5, sparse_attention_rule="window_topk",
                  sparse_attention_tile=(1, 8, 16))
    return config

  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((2, 2, 16, 48, 4)), jnp.float32)  # grid (2, 8, 24): padded tiles
  timesteps = jnp.asarray([100.0, 700.0], jnp.float32)
  text = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  params = dit.init_params(model("xla"), jax.random.key(0), (2, 16, 48, 4), 5)
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # no zero-initialised head

  def loss_and_grads(backend):
    loss = lambda p: jnp.mean(dit.DiT(model(backend)).apply({"params": p}, latents, timesteps, text) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (want, want_grads), (got, got_grads) = loss_and_grads("xla"), loss_and_grads("splash")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
