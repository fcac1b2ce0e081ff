"""How large a tile table `tile_splash` can prefetch into a TPU core's scalar memory.

Compiles the kernel's training step (forward, dQ, dK/dV) for TPU topologies ahead of time with the
14B's 720p x 81 tiling ((2, 8, 8) tiles: 660 tiles, keep 0.25), forcing 1, 2 and 3 (example, head)
rows per call, and records which table sizes compile. What it found sets `tile_splash._TABLE_BYTES`.

  python experiments/tile_splash_smem.py   # writes experiments/results/tile_splash_smem.json
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model import tile_splash

OUT = os.path.join(os.path.dirname(__file__), "results", "tile_splash_smem.json")


def compiles(topology: str, layout: sparse_lib.TileLayout, rows: int) -> str:
  """"" when the kernels compile with `rows` rows per call, else the compiler's first line."""
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
  tile_splash._TABLE_BYTES = rows * 4 * tile_splash._table_ints_per_row(layout)
  shape = jax.ShapeDtypeStruct((1, layout.padded_tokens, rows, 128), jnp.bfloat16,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def loss(q, k, v):
    out = tile_splash.tile_splash_attention(layout, q, k, v, sparse_lib.kept_tiles(layout, q, k))
    return jnp.sum(out.astype(jnp.float32))

  try:
    with jax.set_mesh(mesh):
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
  except Exception as error:  # noqa: BLE001 - the compiler's error is the finding
    return str(error).splitlines()[0][:300]
  return ""


def main() -> None:
  layout = sparse_lib.plan((21, 45, 80), (2, 8, 8), 0.25, "window_topk")
  per_row = 4 * tile_splash._table_ints_per_row(layout)
  results = []
  for topology in ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"):
    for rows in (1, 2, 3):
      error = compiles(topology, layout, rows)
      results.append({"topology": topology, "rows": rows, "table_kib": rows * per_row / 1024,
                      "compiles": not error, "error": error})
      print(f"{topology}: {rows} rows, {rows * per_row / 1024:.0f} KiB: "
            f"{'compiles' if not error else error}", flush=True)
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, "w", encoding="utf-8") as f:
    json.dump({"layout": {"grid": layout.grid, "tile": layout.tile, "tiles": layout.num_tiles,
                          "keep_tiles": layout.keep_tiles}, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
