"""Gradients of the `xla` attention backend against plain softmax attention differentiated by JAX.

The backend's custom VJP recomputes the probabilities; these tests hold it to the reference's values.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.model import attention as attention_lib
from sora_jax.model import cpu_kernels, platform
from sora_jax.model import xla_attention as xla_lib


def _inputs(seed, batch=2, tokens=6, heads=3, head_dim=8, kv_tokens=None, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  kv_tokens = kv_tokens or tokens
  shapes = [(batch, tokens, heads, head_dim), (batch, kv_tokens, heads, head_dim),
            (batch, kv_tokens, heads, head_dim), (batch, tokens, heads, head_dim)]
  return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]


def _value_and_grads(attend, query, key, value, cotangent, **kwargs):
  def objective(q, k, v):
    return jnp.sum(attend(q, k, v, **kwargs).astype(jnp.float32) * cotangent.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))(query, key, value)


def _reference(q, k, v, query_segment_ids=None, kv_segment_ids=None):
  return attention_lib.reference_attention(
      q, k, v, attention_lib.segment_mask(query_segment_ids, kv_segment_ids))


@pytest.mark.parametrize("kv_tokens", [None, 4])  # self-attention; cross-attention to 4 text tokens
def test_xla_backend_gradients_match_reference(kv_tokens):
  query, key, value, cotangent = _inputs(0, kv_tokens=kv_tokens)
  ours = _value_and_grads(attention_lib.attention, query, key, value, cotangent)
  theirs = _value_and_grads(_reference, query, key, value, cotangent)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
  for grad, expected in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_xla_backend_gradients_with_segments_stay_within_clips():
  query, key, value, cotangent = _inputs(1)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
  kwargs = dict(query_segment_ids=segments, kv_segment_ids=segments)
  ours = _value_and_grads(attention_lib.attention, query, key, value, cotangent, **kwargs)
  theirs = _value_and_grads(_reference, query, key, value, cotangent, **kwargs)
  for grad, expected in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))
  # A key of clip 2 gets no gradient from the queries of clip 1 alone.
  clip_one = cotangent * (segments == 1)[..., None, None]
  _, (_, key_grad, value_grad) = _value_and_grads(attention_lib.attention, query, key, value, clip_one,
                                                  **kwargs)
  assert float(jnp.max(jnp.abs(key_grad[0, 3:5]))) == 0.0
  assert float(jnp.max(jnp.abs(value_grad[0, 3:5]))) == 0.0


@pytest.mark.parametrize("per_head", [False, True])
def test_xla_backend_one_clip_and_one_head_at_a_time_equals_the_whole_batch(monkeypatch, per_head):
  """On one CPU device the backend loops over clips (and heads of long clips): same values and gradients,
  with and without packing segments."""
  if per_head:
    monkeypatch.setattr(cpu_kernels, "SCORES_BYTES", 0)
  query, key, value, cotangent = _inputs(2, batch=3)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
  for kwargs in ({}, dict(query_segment_ids=segments, kv_segment_ids=segments)):
    assert platform.one_cpu_device()
    ours = _value_and_grads(attention_lib.attention, query, key, value, cotangent, **kwargs)
    theirs = _value_and_grads(_reference, query, key, value, cotangent, **kwargs)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
    for grad, expected in zip(ours[1], theirs[1], strict=True):
      np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_xla_backend_bfloat16_close_to_float32():
  query, key, value, cotangent = _inputs(2)
  exact = _value_and_grads(attention_lib.attention, query, key, value, cotangent)[1]
  low = [x.astype(jnp.bfloat16) for x in (query, key, value, cotangent)]
  _, grads = _value_and_grads(attention_lib.attention, *low)
  for grad, expected in zip(grads, exact, strict=True):
    assert grad.dtype == jnp.bfloat16
    error = float(jnp.max(jnp.abs(grad.astype(jnp.float32) - expected)))
    assert error <= 0.05 * float(jnp.max(jnp.abs(expected)))


def _dots_contracting_lhs_rows(hlo: str) -> list[str]:
  """The compiled `dot`s whose left operand contracts a dimension other than its last (row-major minor).

  XLA:CPU runs those on its transposed-GEMM path, 3-4x slower than the plain one for [N, N]^T @ [N, Dh].
  """
  shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
  slow = []
  for line in hlo.splitlines():
    match = re.search(r" dot\(%([\w.\-]+), [^)]*\), (?:lhs_batch_dims=\{[\d,]*\}, )?"
                      r"lhs_contracting_dims=\{(\d+)\}", line)
    if match:
      rank = len(shapes[match.group(1)].split(","))
      if int(match.group(2)) != rank - 1:
        slow.append(line.strip())
  return slow


@pytest.mark.parametrize("backend,per_head", [("xla", False), ("xla", True), ("xla_chunked", False)])
def test_cpu_backward_contracts_no_score_matrix_over_its_rows(monkeypatch, backend, per_head):
  """dV = P^T dO and dK = dS^T Q become (dO^T P)^T and (Q^T dS)^T on the CPU: every product's left
  operand contracts its last dimension (`key_major_product`), and the values stay the reference's."""
  if per_head:
    monkeypatch.setattr(cpu_kernels, "SCORES_BYTES", 0)
  monkeypatch.setattr(xla_lib, "_KEY_BLOCK", 16)
  query, key, value, cotangent = _inputs(6, batch=2, tokens=48, heads=2, head_dim=8)

  def objective(q, k, v):
    return jnp.sum(attention_lib.attention(q, k, v, backend=backend) * cotangent)

  grad = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))
  assert _dots_contracting_lhs_rows(grad.lower(query, key, value).compile().as_text()) == []
  theirs = _value_and_grads(_reference, query, key, value, cotangent)[1]
  for ours, expected in zip(grad(query, key, value), theirs, strict=True):
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_key_major_product_contracts_directly_off_the_cpu(monkeypatch):
  """Off the CPU (a TPU or GPU trace) the product is the plain contraction, with no barriers."""
  scores, operand = (jnp.ones((1, 2, 8, 8)), jnp.ones((1, 2, 8, 4)))
  monkeypatch.setattr(platform, "traced_platform", lambda: "tpu")
  # A fresh lambda per trace: jax caches traces by function.
  plain = jax.make_jaxpr(lambda s, o: xla_lib.key_major_product(s, o))(scores, operand)
  monkeypatch.setattr(platform, "traced_platform", lambda: "cpu")
  on_cpu = jax.make_jaxpr(lambda s, o: xla_lib.key_major_product(s, o))(scores, operand)
  assert "optimization_barrier" not in str(plain) and "optimization_barrier" in str(on_cpu)
  np.testing.assert_allclose(jax.jit(xla_lib.key_major_product)(scores, operand),
                             jnp.einsum("bhqk,bhqd->bhkd", scores, operand))


# ---------------------------------------------------------------- xla_chunked: blocks of keys


@pytest.mark.parametrize("kv_tokens", [None, 4])
def test_chunked_backend_matches_reference_across_blocks(monkeypatch, kv_tokens):
  # 5-key blocks over 23 (or 4) keys: several blocks, a padded last block, a single short block.
  monkeypatch.setattr(xla_lib, "_KEY_BLOCK", 5)
  query, key, value, cotangent = _inputs(3, tokens=23, kv_tokens=kv_tokens)
  ours = _value_and_grads(attention_lib.attention, query, key, value, cotangent, backend="xla_chunked")
  theirs = _value_and_grads(_reference, query, key, value, cotangent)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
  for grad, expected in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_chunked_backend_with_packing_segments(monkeypatch):
  monkeypatch.setattr(xla_lib, "_KEY_BLOCK", 4)
  query, key, value, cotangent = _inputs(4, tokens=13)
  # Clip 1 ends inside the first block; clip 2 spans blocks; padding (0) at the end; a whole block
  # (keys 4-7) holds nothing of clip 1, so clip 1's rows see that block fully masked.
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 0, 0, 0], [1] * 6 + [2] * 7])
  kwargs = dict(query_segment_ids=segments, kv_segment_ids=segments)
  out_ours = attention_lib.attention(query, key, value, backend="xla_chunked", **kwargs)
  out_theirs = _reference(query, key, value, **kwargs)
  np.testing.assert_allclose(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
  ours = _value_and_grads(attention_lib.attention, query, key, value, cotangent, backend="xla_chunked",
                          **kwargs)
  theirs = _value_and_grads(_reference, query, key, value, cotangent, **kwargs)
  for grad, expected in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_chunked_backend_never_builds_the_score_matrix():
  # 4096 tokens: an [N, N] fp32 temporary per head would be 64 MiB; blocks of 512 keys need 8 MiB.
  query, key, value, _ = _inputs(5, batch=1, tokens=4096, heads=1, head_dim=8)
  def loss(q, k, v):
    return jnp.sum(attention_lib.attention(q, k, v, backend="xla_chunked"))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(query, key, value).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 32 * 2**20, temp


def test_auto_backend_follows_the_hardware_and_the_sequence(monkeypatch):
  from sora_jax import tpu_fit

  q = jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.bfloat16)
  assert attention_lib.resolve_backend("xla_chunked", q, q) == "xla_chunked"  # explicit names stay
  assert attention_lib.resolve_backend("auto", q, q) == "xla"  # the CPU, few keys
  monkeypatch.setattr(attention_lib, "_AUTO_XLA_MAX_KEYS", 32)
  assert attention_lib.resolve_backend("auto", q, q) == "xla_chunked"  # the CPU, many keys
  _, devices, _ = tpu_fit.topology_devices("v5e-4")
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(4), ("fsdp",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert attention_lib.resolve_backend("auto", q, q) == "splash"  # tracing for a TPU topology
