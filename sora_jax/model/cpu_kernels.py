"""The DiT's kernels in the forms XLA:CPU runs fastest, for runs traced on one CPU device.

Each replaces a product whose autodiff form XLA:CPU sends through transposing copies or its slow
transposed-GEMM path (experiments/cpu_step.md and bench/cpu_attention.py measure both forms); values
and gradients equal the plain forms', which every other platform runs. Callers choose through
`platform` (one CPU device, or tracing for the CPU); the TPU kernel is `splash`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# On one CPU device the `xla` backend loops over heads when a clip's fp32 scores exceed this.
SCORES_BYTES = 16 * 2**20


def flattened_product(inputs: jax.Array, kernel: jax.Array, in_axes: int) -> jax.Array:
  """`inputs [..., *in] . kernel [*in, *out]` on flattened `[..., fan_in] @ [fan_in, fan_out]` operands,
  the kernel's gradient one `[M, K]^T @ [M, F]` over all rows (autodiff would contract the batch and
  token axes together)."""
  lead, fan_in = inputs.shape[:inputs.ndim - in_axes], math.prod(kernel.shape[:in_axes])
  flat = _rows_product(inputs.reshape(lead + (fan_in,)), kernel.reshape(fan_in, -1))
  return flat.reshape(lead + kernel.shape[in_axes:])


@jax.custom_vjp
def _rows_product(rows: jax.Array, kernel: jax.Array) -> jax.Array:
  """`rows [..., K] @ kernel [K, F]`, the kernel's gradient one `[M, K]^T @ [M, F]` over all rows."""
  return jnp.dot(rows, kernel)


def _rows_product_fwd(rows, kernel):
  return jnp.dot(rows, kernel), (rows, kernel)


def _rows_product_bwd(residuals, grad):
  rows, kernel = residuals
  flat = lambda x: x.reshape(-1, x.shape[-1])
  kernel_grad = jnp.einsum("mk,mf->kf", flat(rows), flat(grad))
  return jnp.dot(grad, kernel.T).astype(rows.dtype), kernel_grad.astype(kernel.dtype)


_rows_product.defvjp(_rows_product_fwd, _rows_product_bwd)


def key_major_product(scores: jax.Array, operand: jax.Array) -> jax.Array:
  """`einsum("bhqk,bhqd->bhkd", scores, operand)` in fp32 as (operand^T scores)^T.

  The product contracts the rows of both operands, which XLA:CPU hands to its transposed-GEMM path;
  here the small [Dh, N] operand and result are transposed instead, with barriers that keep XLA from
  folding the transposes back into the product.
  """
  operand_t = jax.lax.optimization_barrier(jnp.swapaxes(operand, -1, -2))  # [B, H, Dh, Nq]
  product = jnp.einsum("bhdq,bhqk->bhdk", operand_t, scores, preferred_element_type=jnp.float32)
  return jnp.swapaxes(jax.lax.optimization_barrier(product), -1, -2)


def per_clip_attention(attend: Callable, query: jax.Array, key: jax.Array, value: jax.Array,
                       mask: jax.Array | None) -> jax.Array:
  """`attend` over [B, N, H, Dh] one clip at a time (and one head at a time for long clips): the scores
  stay in cache between the products and the softmax instead of streaming a whole batch's through
  memory."""
  if query.shape[0] == 1:
    return _one_clip(attend, query, key, value, mask)
  if mask is None:
    return jax.lax.map(lambda qkv: _one_clip(attend, *(x[None] for x in qkv), None)[0], (query, key, value))
  return jax.lax.map(lambda qkvm: _one_clip(attend, *(x[None] for x in qkvm))[0], (query, key, value, mask))


def _one_clip(attend: Callable, query: jax.Array, key: jax.Array, value: jax.Array,
              mask: jax.Array | None) -> jax.Array:
  """[1, N, H, Dh] attention, one head at a time when the clip's fp32 scores outgrow the cache."""
  heads = query.shape[2]
  if heads == 1 or heads * query.shape[1] * key.shape[1] * 4 <= SCORES_BYTES:
    return attend(query, key, value, mask)
  per_head = lambda x: jnp.moveaxis(x, 2, 0)[:, :, :, None]  # [H, 1, N, 1, Dh]
  out = jax.lax.map(lambda qkv: attend(*qkv, mask),
                    (per_head(query), per_head(key), per_head(value)))
  return jnp.moveaxis(out[:, :, :, 0], 0, 2)
