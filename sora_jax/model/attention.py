"""Attention backends behind one function: `attention(query, key, value, backend=...)`.

Owns the choice of backend (`auto` resolved for the hardware and sequence) and the one dispatch to
the kernel modules: `xla_attention` (XLA, plain and key-blocked), cuDNN through
`jax.nn.dot_product_attention`, `splash` (Pallas TPU) and `context_parallel` (ring, all-to-all); and,
for tile-sparse self-attention (`sparse_attention`), the choice between the block-skipping TPU kernels
(`splash` for `window`, `tile_splash` for tiles chosen per input), `tile_attention` and the masked
dense path.
Kernel modules never import this one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax import choices
from sora_jax.model import context_parallel, splash, tile_attention, tile_splash
from sora_jax.model import sparse_attention as sparse_lib
from sora_jax.model.platform import traced_platform
from sora_jax.model.xla_attention import (
  chunked_attention,
  reference_attention,
  segment_mask,
  xla_attention,
)
from sora_jax.parallel import sharding as sharding_lib

BACKENDS = choices.ATTENTION_BACKENDS
# `auto` on CPU: the plain `xla` backend up to this many keys, `xla_chunked` above (no [Nq, Nk] scores).
_AUTO_XLA_MAX_KEYS = 4096


def resolve_backend(backend: str, query: jax.Array, key: jax.Array) -> str:
  """The backend `auto` stands for here: context parallelism (`ring`) when the rules split the sequence,
  else `splash` on TPU, `cudnn` on NVIDIA GPUs (bf16 / fp16 inputs), and on anything else `xla`, or
  `xla_chunked` once the keys are too many for a `[Nq, Nk]` score matrix."""
  if backend != "auto":
    return backend
  if sharding_lib.traced_mesh_axes("act_seq"):
    return "ring"
  platform = traced_platform()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda") and query.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla" if key.shape[1] <= _AUTO_XLA_MAX_KEYS else "xla_chunked"


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, backend: str = "xla",
              query_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              sparse: sparse_lib.TileLayout | None = None) -> jax.Array:
  """Scaled dot-product attention of `[B, Nq, H, Dh]` queries on `[B, Nk, H, Dh]` keys/values.

  Returns `[B, Nq, H, Dh]` in the query dtype. `backend` is one of `BACKENDS`: `auto` picks one for the
  hardware and sequence (`resolve_backend`); `xla` is the portable
  reference; `xla_chunked` computes the same in blocks of keys with an online softmax, so no
  `[Nq, Nk]` score matrix is ever materialised; `cudnn` is the fused flash kernel on NVIDIA GPUs;
  `splash` is JAX's Pallas TPU flash kernel (`splash`); `ring` and `all_to_all` split
  self-attention's sequence over the mesh's `context` axis (`context_parallel`).

  `sparse`: self-attention over tokens in that layout's tile order, each query tile attending only its
  kept key tiles (`_sparse_attention`).
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(
        f"attention expects [B, N, H, Dh] query/key/value; got {query.shape}, {key.shape}, {value.shape}")
  backend = resolve_backend(backend, query, key)
  if sparse is not None:
    return _sparse_attention(query, key, value, backend, sparse, query_segment_ids, kv_segment_ids)
  if backend == "xla_chunked":  # compares segment ids block by block: never builds the [Nq, Nk] mask
    return chunked_attention(query, key, value, query_segment_ids, kv_segment_ids)
  if backend in ("ring", "all_to_all"):
    return context_parallel.context_attention(query, key, value, backend=backend,
                                              query_segment_ids=query_segment_ids,
                                              kv_segment_ids=kv_segment_ids)
  if backend == "splash":
    return splash.splash_attention(query, key, value, query_segment_ids, kv_segment_ids)
  mask = segment_mask(query_segment_ids, kv_segment_ids)
  if backend == "xla":
    return xla_attention(query, key, value, mask)
  if backend == "cudnn":
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
  raise ValueError(f"model.attention_backend={backend!r}; expected one of {BACKENDS}")


def sparse_kernel(backend: str, layout: sparse_lib.TileLayout) -> str:
  """The kernel tile-sparse self-attention under `layout` runs on for a resolved `backend` (no segment
  ids): on TPU (`splash`), splash for `window`, which skips the blocks outside each window, and
  `tile_splash` for rules that choose tiles per input, whose block lists are kernel operands (where its
  tiles fit it: `tile_splash.unfit_reason`); on NVIDIA GPUs (`cudnn`), the fused kernel under
  `window`'s token mask (dense FLOPs: a per-input rule's mask would be [B, H, N, N]); elsewhere, and
  for per-input rules on GPUs, `tile_attention` (each query tile over its gathered key tiles)."""
  if backend == "splash" and not layout.per_input:
    return "splash"
  if backend == "splash" and not tile_splash.unfit_reason(layout):
    return "tile_splash"
  if backend == "cudnn" and not layout.per_input:
    return "cudnn"
  return "tile_attention"


def _sparse_attention(query, key, value, backend, layout, query_segment_ids, kv_segment_ids):
  """Tile-sparse self-attention on `sparse_kernel`'s kernel. Segment ids, which no trainer path gives a
  tiled clip, take the masked `xla` path, except on splash (which takes them as they are)."""
  if backend in context_parallel.BACKENDS:
    raise ValueError(
        f"model.sparse_attention_keep < 1 needs each sequence on one device; model.attention_backend="
        f"{backend!r} splits it over the context axis (use keep = 1 there)")
  kernel = sparse_kernel(backend, layout)
  if kernel == "splash":
    return splash.splash_attention(query, key, value, query_segment_ids, kv_segment_ids, layout=layout)
  kept = sparse_lib.kept_tiles(layout, query, key)
  segments = segment_mask(query_segment_ids, kv_segment_ids)
  if segments is not None:  # a [B, H, N, N] mask: XLA's own attention takes it as it is
    mask = sparse_lib.token_mask(layout, kept) & segments
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")
  if kernel == "tile_splash":
    return tile_splash.tile_splash_attention(layout, query, key, value, kept)
  if kernel == "cudnn":
    return jax.nn.dot_product_attention(query, key, value, mask=sparse_lib.token_mask(layout, kept),
                                        implementation="cudnn")
  return tile_attention.tile_attention(layout, query, key, value, kept)


__all__ = ["BACKENDS", "attention", "reference_attention", "resolve_backend", "segment_mask",
           "sparse_kernel"]
