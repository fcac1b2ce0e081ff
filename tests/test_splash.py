"""The `splash` backend (Pallas TPU kernel, interpret mode on CPU) against the `xla` backend: values
and gradients with unaligned lengths and packing segments, on a sharded mesh, in the DiT, and the
error for a sequence split over `context`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.model import attention as attention_lib
from sora_jax.model import splash
from sora_jax.parallel import sharding as sharding_lib

_RULES = (("act_batch", ("data", "fsdp")), ("act_seq", "context"), ("act_heads", "tensor"),
          ("act_head_dim", None))


def _qkvw(batch=2, tokens=40, heads=2, head_dim=16):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), jnp.float32)
               for _ in range(4))


def _loss_and_grads(backend, segments, q, k, v, w):
  kwargs = {} if segments is None else dict(query_segment_ids=segments, kv_segment_ids=segments)
  loss = lambda q, k, v: jnp.sum(attention_lib.attention(q, k, v, backend=backend, **kwargs) * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_close(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b, name in zip(got[1], want[1], ("dq", "dk", "dv"), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


# 40 tokens: padded to the kernel's 128-token blocks; two clips and padding in row 0.
@pytest.mark.parametrize("segments", [None, jnp.asarray([[1] * 15 + [2] * 20 + [0] * 5, [3] * 40])],
                         ids=["plain", "packed"])
def test_matches_xla_backend(segments):
  q, k, v, w = _qkvw()
  _assert_close(_loss_and_grads("splash", segments, q, k, v, w),
                _loss_and_grads("xla", segments, q, k, v, w))


def test_on_a_sharded_mesh():
  q, k, v, w = _qkvw(batch=4, heads=4)
  mesh = jax.make_mesh((2, 2, 1, 2), ("data", "fsdp", "context", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  with sharding_lib.mesh_context(mesh, _RULES):
    got = _loss_and_grads("splash", None, q, k, v, w)
  _assert_close(got, _loss_and_grads("xla", None, q, k, v, w))


def test_a_sequence_split_over_context_is_an_error():
  q, k, v, _ = _qkvw()
  mesh = jax.make_mesh((1, 1, 2, 4), ("data", "fsdp", "context", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  with sharding_lib.mesh_context(mesh, _RULES), pytest.raises(ValueError, match="use 'ring' or 'all_to_all'"):
    jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, backend="splash"))(q, k, v)


def test_long_sequences_run_in_512_token_blocks():
  # 75,600 tokens (720p x 81 frames) in 128-token blocks overflow the TPU core's scalar memory.
  assert splash._padded_length(75_600) == 75_776 and splash._padded_length(75_600) % 512 == 0
  assert splash._padded_length(300) == 384  # short sequences keep 128-token padding
  assert splash._padded_length(2048) == 2048
