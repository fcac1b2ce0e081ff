"""3D rotary position embedding of Wan2.1: head_dim split into (t, h, w) parts, interleaved pairs.

Owns the frequency tables (float64 on the host, as diffusers builds them), the lookup of per-token
(cos, sin) from patch-grid positions, and `apply_rope` on `[B, N, H, Dh]` queries and keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.patches import rope_split


@functools.lru_cache(maxsize=16)
def _angle_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[np.ndarray, ...]:
  """Per axis (t, h, w): angles `[max_seq_len, part // 2]` in float64, position p times θ^(-2i/part)."""
  tables = []
  for part in rope_split(head_dim):
    inv_freq = 1.0 / theta ** (np.arange(0, part, 2, dtype=np.float64) / part)
    tables.append(np.outer(np.arange(max_seq_len, dtype=np.float64), inv_freq))
  return tuple(tables)


@functools.lru_cache(maxsize=16)
def _cos_sin_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin `[3, max_seq_len, head_dim // 2]`: each axis's pairs in its slot, zero elsewhere."""
  cos = np.zeros((3, max_seq_len, head_dim // 2), np.float32)
  sin = np.zeros((3, max_seq_len, head_dim // 2), np.float32)
  start = 0
  for axis, angles in enumerate(_angle_tables(head_dim, max_seq_len, theta)):
    stop = start + angles.shape[1]
    cos[axis, :, start:stop] = np.cos(angles)
    sin[axis, :, start:stop] = np.sin(angles)
    start = stop
  return cos, sin


def frequencies(positions, head_dim: int, max_seq_len: int, theta: float):
  """(cos, sin) `[..., N, head_dim // 2]` fp32 for positions `[..., N, 3]`.

  Numpy positions (the static patch grid) give numpy constants; traced positions (packing) are looked
  up in the host-built table, so both paths give the same bits. Positions must be < `max_seq_len`.
  """
  if isinstance(positions, np.ndarray):
    if positions.size and (positions.min() < 0 or positions.max() >= max_seq_len):
      raise ValueError(
          f"RoPE positions span [{positions.min()}, {positions.max()}]; expected [0, {max_seq_len}) "
          f"(model.rope_max_seq_len)")
    cos, sin = [], []
    for axis, angles in enumerate(_angle_tables(head_dim, max_seq_len, theta)):
      cos.append(np.cos(angles[positions[..., axis]]))
      sin.append(np.sin(angles[positions[..., axis]]))
    return (np.concatenate(cos, axis=-1).astype(np.float32),
            np.concatenate(sin, axis=-1).astype(np.float32))
  cos_table, sin_table = _cos_sin_tables(head_dim, max_seq_len, theta)
  positions = jnp.asarray(positions, jnp.int32)
  # Each axis's table is zero outside its slot of channels, so the three lookups just add up.
  cos = sum(jnp.take(cos_table[axis], positions[..., axis], axis=0, mode="clip") for axis in range(3))
  sin = sum(jnp.take(sin_table[axis], positions[..., axis], axis=0, mode="clip") for axis in range(3))
  return cos, sin


def apply_rope(inputs: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs (0,1), (2,3), ... of `[B, N, H, Dh]` by per-token angles.

  `cos`/`sin` are `[N, Dh/2]` or `[B, N, Dh/2]`; the rotation runs in fp32 and returns inputs' dtype.
  """
  batch, tokens, heads, head_dim = inputs.shape
  pairs = inputs.astype(jnp.float32).reshape(batch, tokens, heads, head_dim // 2, 2)
  cos = jnp.asarray(cos, jnp.float32)
  sin = jnp.asarray(sin, jnp.float32)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  real, imag = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return rotated.reshape(inputs.shape).astype(inputs.dtype)
