"""model/layers.py: `scale_features` equals the plain broadcast product in value and gradients, and
`project` (DenseGeneral's product) equals one `dot_general`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.model import layers, platform

CASES = {
    "norm weight over batch and tokens": ((2, 16, 8), (8,)),
    "a clip's modulation over its tokens": ((2, 16, 8), (2, 1, 8)),
    "q/k norm weight over heads": ((2, 16, 4, 8), (4, 8)),
    "one clip, batch axis of size 1": ((1, 16, 8), (1, 1, 8)),
    "per-token modulation, nothing broadcast": ((2, 16, 8), (2, 16, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradients_equal_the_plain_product(case):
  inputs_shape, scale_shape = CASES[case]
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.standard_normal(inputs_shape), jnp.float32)
  scale = jnp.asarray(rng.standard_normal(scale_shape), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(inputs_shape), jnp.float32)

  def pulled(product):
    value, pull = jax.vjp(product, inputs, scale)
    return (value, *pull(cotangent))

  got = jax.jit(lambda: pulled(layers.scale_features))()
  want = jax.jit(lambda: pulled(lambda x, s: x * s))()
  for name, g, w in zip(("value", "inputs grad", "scale grad"), got, want, strict=True):
    assert g.shape == w.shape, (name, g.shape, w.shape)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_scale_gradient_is_a_contraction_not_a_multiply_reduce():
  inputs, scale, cotangent = jnp.ones((2, 16, 8)), jnp.ones((8,)), jnp.ones((2, 16, 8))

  def scale_grad_jaxpr(product):
    return str(jax.make_jaxpr(lambda s: jax.vjp(lambda s: product(inputs, s), s)[1](cotangent))(scale))

  assert "reduce_sum" in scale_grad_jaxpr(lambda x, s: x * s)  # what autodiff of the product gives
  text = scale_grad_jaxpr(layers.scale_features)
  assert "dot_general" in text and "reduce_sum" not in text, text


def test_a_scale_with_more_axes_than_the_inputs_is_refused():
  with pytest.raises(ValueError, match="more axes"):
    layers.scale_features(jnp.ones((8,)), jnp.ones((2, 8)))


# ------------------------------------------------------------------ project: DenseGeneral's product

PROJECTIONS = {
    "width to heads (q/k/v)": ((2, 16, 8), (8, 2, 4), 1),
    "heads to width (output)": ((2, 16, 2, 4), (2, 4, 8), 2),
    "one clip, width to width": ((1, 32, 8), (8, 12), 1),
}


def _plain_projection(inputs, kernel, in_axes):
  contract = tuple(range(inputs.ndim - in_axes, inputs.ndim))
  return jax.lax.dot_general(inputs, kernel, ((contract, tuple(range(in_axes))), ((), ())))


@pytest.mark.parametrize("case", sorted(PROJECTIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_project_equals_one_dot_general_in_value_and_gradients(case, dtype):
  """On one CPU device the product runs flattened with its own gradient: same values, same dtypes."""
  inputs_shape, kernel_shape, in_axes = PROJECTIONS[case]
  rng = np.random.default_rng(1)
  inputs = jnp.asarray(rng.standard_normal(inputs_shape), dtype)
  kernel = jnp.asarray(rng.standard_normal(kernel_shape), dtype)
  out_shape = inputs_shape[:len(inputs_shape) - in_axes] + kernel_shape[in_axes:]
  cotangent = jnp.asarray(rng.standard_normal(out_shape), dtype)
  assert platform.one_cpu_device()
  assert "custom_vjp_call" in str(jax.make_jaxpr(lambda x, w: layers.project(x, w, in_axes))(inputs, kernel))

  def pulled(product):
    value, pull = jax.vjp(product, inputs, kernel)
    return (value, *pull(cotangent))

  ours = jax.jit(lambda: pulled(lambda x, w: layers.project(x, w, in_axes)))()
  theirs = jax.jit(lambda: pulled(lambda x, w: _plain_projection(x, w, in_axes)))()
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for got, want in zip(ours, theirs, strict=True):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=tolerance * scale)


def test_project_is_one_dot_general_off_the_cpu(monkeypatch):
  """A TPU or GPU trace keeps the single contraction (the kernel's sharded axes stay apart)."""
  inputs, kernel = jnp.ones((2, 16, 8)), jnp.ones((8, 2, 4))
  monkeypatch.setattr(platform, "traced_platform", lambda: "tpu")
  jaxpr = str(jax.make_jaxpr(lambda x, w: layers.project(x, w, 1))(inputs, kernel))
  assert "custom_vjp_call" not in jaxpr and jaxpr.count("dot_general") == 1
