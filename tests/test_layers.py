"""model/layers.py: `scale_features` equals the plain broadcast product in value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.model import layers

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
