"""Context-parallel attention (`ring`, `all_to_all`) on the 8 fake CPU devices: parity with the
`xla` backend (values and gradients, with packing segments), the collectives each one really uses,
and the errors for sequences or heads the context axis does not divide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.model import attention as attention_lib
from sora_jax.model import context_parallel
from sora_jax.parallel import sharding as sharding_lib

_RULES = (("act_batch", ("data", "fsdp")), ("act_seq", "context"), ("act_heads", "tensor"),
          ("act_head_dim", None))
_AXES = ("data", "fsdp", "context", "tensor")


def _mesh(shape):
  return jax.make_mesh(shape, _AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _qkv(batch=2, tokens=16, heads=4, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), jnp.float32)
               for _ in range(4))


_SEGMENTS = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16])  # two clips + padding; one clip


def _value_and_grads(backend, mesh, segments, q, k, v, weights):
  kwargs = {} if segments is None else dict(query_segment_ids=segments, kv_segment_ids=segments)

  def loss(q, k, v):
    return jnp.sum(attention_lib.attention(q, k, v, backend=backend, **kwargs) * weights)

  with sharding_lib.mesh_context(mesh, _RULES):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("backend", context_parallel.BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 4, 1), (1, 2, 2, 2), (1, 1, 8, 1)],
                         ids=["data2_context4", "fsdp2_context2_tensor2", "context8"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_matches_xla_backend_values_and_gradients(backend, shape, packed):
  q, k, v, weights = _qkv(heads=8 if backend == "all_to_all" and shape[2] == 8 else 4)
  segments = _SEGMENTS if packed else None
  mesh = _mesh(shape)
  expected_loss, expected_grads = _value_and_grads("xla", mesh, segments, q, k, v, weights)
  loss, grads = _value_and_grads(backend, mesh, segments, q, k, v, weights)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  for got, want, name in zip(grads, expected_grads, ("dq", "dk", "dv"), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_packed_segments_stay_within_their_clip():
  q, k, v, _ = _qkv()
  with sharding_lib.mesh_context(_mesh((1, 1, 4, 2)), _RULES):
    out = jax.jit(lambda q, k, v: attention_lib.attention(
        q, k, v, backend="ring", query_segment_ids=_SEGMENTS, kv_segment_ids=_SEGMENTS))(q, k, v)
  # The first clip of row 0 (tokens 0-4) attends only to itself: same as attention over it alone.
  alone = attention_lib.attention(q[:1, :5], k[:1, :5], v[:1, :5])
  np.testing.assert_allclose(out[:1, :5], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,collective,absent", [
    ("ring", "collective-permute", "all-to-all"), ("all_to_all", "all-to-all", "collective-permute")])
def test_uses_its_collective_and_keeps_the_sequence_split(backend, collective, absent):
  q, k, v, _ = _qkv(tokens=64, heads=8)
  mesh = _mesh((1, 1, 4, 2))
  with sharding_lib.mesh_context(mesh, _RULES):
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context", "tensor"))
    q, k, v = (jax.device_put(x, sharded) for x in (q, k, v))
    fn = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, backend=backend))
    hlo = fn.lower(q, k, v).compile().as_text()
    out = fn(q, k, v)
  assert collective in hlo and absent not in hlo
  # No device ever gathers the whole sequence of keys: the ring's blocks are 64 / 4 tokens long.
  if backend == "ring":
    assert "all-gather" not in hlo
  assert out.sharding.spec[1] == "context"


def test_without_a_mesh_it_is_the_xla_backend():
  q, k, v, _ = _qkv()
  for backend in context_parallel.BACKENDS:
    np.testing.assert_allclose(attention_lib.attention(q, k, v, backend=backend),
                               attention_lib.attention(q, k, v), rtol=1e-6)


def test_sequences_and_heads_the_context_axis_does_not_divide():
  q, k, v, _ = _qkv(tokens=18)
  with sharding_lib.mesh_context(_mesh((1, 1, 4, 2)), _RULES):
    with pytest.raises(ValueError, match=r"18 tokens per sequence are not divisible .* context axis \(4\)"):
      jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, backend="ring"))(q, k, v)
  q, k, v, _ = _qkv(heads=4)
  with sharding_lib.mesh_context(_mesh((1, 1, 4, 2)), _RULES):
    with pytest.raises(ValueError, match=r"splits each device's 2 heads over the 4 context devices"):
      jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, backend="all_to_all"))(q, k, v)


def test_config_validation_names_the_uneven_split(tiny_train_config):
  tiny_train_config.model.attention_backend = "ring"
  tiny_train_config.mesh.ici = (1, 1, 8, 1)  # image bucket (1, 8, 8): 4 tokens per clip
  with pytest.raises(config_lib.ConfigError, match=r"context mesh axis \(8\).*\(1, 8, 8\)': 4"):
    config_lib.validate(tiny_train_config, num_devices=8)
  tiny_train_config.mesh.ici = (1, 2, 4, 1)
  config_lib.validate(tiny_train_config, num_devices=8)
  tiny_train_config.model.attention_backend = "all_to_all"  # 2 heads over 4 context devices
  with pytest.raises(config_lib.ConfigError, match=r"num_heads=2 divisible by tensor x context = 4"):
    config_lib.validate(tiny_train_config, num_devices=8)
