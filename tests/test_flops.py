"""The analytic FLOP count against XLA's own count of the compiled forward and training step.

XLA's cost analysis counts a scanned (while-loop) body once, so the comparison compiles the
blocks unrolled (`scan_layers=False`); the 1.3B check uses one and two layers, and the count's
linearity in depth is checked against XLA's difference between the two.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sora_jax import config as config_lib
from sora_jax import patches
from sora_jax.model import dit, flops


def _xla_flops(model, latent_shape, text_len, train):
  params = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
      nn.meta.unbox(dit.abstract_params(model)))
  latents = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
  timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
  text = jax.ShapeDtypeStruct((1, text_len, model.text_dim), jnp.float32)

  def forward(params, latents, timesteps, text):
    return dit.DiT(model).apply({"params": params}, latents, timesteps, text)

  def loss(params, latents, timesteps, text):
    return jnp.mean((forward(params, latents, timesteps, text) - latents) ** 2)

  fn = jax.value_and_grad(loss) if train else forward
  cost = jax.jit(fn).lower(params, latents, timesteps, text).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"]


@pytest.fixture(autouse=True)
def _whole_attention(monkeypatch):
  """The `xla` backend on one CPU device loops over the heads of long clips, and XLA's cost analysis
  counts a loop body by its own rules: the counts here are of the unlooped attention."""
  from sora_jax.model import cpu_kernels

  monkeypatch.setattr(cpu_kernels, "SCORES_BYTES", float("inf"))


def _config(name, **model_overrides):
  config = config_lib.load(f"configs/{name}.py")
  # Unscanned layers and the unblocked attention: XLA's cost analysis counts a loop body once.
  config.model.update(scan_layers=False, remat_policy="none", attention_backend="xla", **model_overrides)
  return config


@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
def test_tiny_within_ten_percent_of_xla(train):
  config = _config("tiny")
  latent = patches.latent_shape(config, config.data.buckets[0])
  count = flops.train_flops_per_example if train else flops.forward_flops_per_example
  analytic = count(config.model, latent, config.data.text_len)
  assert analytic == pytest.approx(_xla_flops(config.model, latent, config.data.text_len, train), rel=0.1)


def test_wan_1_3b_within_ten_percent_of_xla_and_linear_in_depth():
  config = _config("wan_1_3b", num_layers=1)
  latent = patches.latent_shape(config, config.data.buckets[0])  # 81x480x832 -> (21, 60, 104, 16)
  text_len = config.data.text_len
  one_layer = _xla_flops(config.model, latent, text_len, train=True)
  assert flops.train_flops_per_example(config.model, latent, text_len) == pytest.approx(one_layer, rel=0.1)

  forward_one = _xla_flops(config.model, latent, text_len, train=False)
  two = _config("wan_1_3b", num_layers=2).model
  forward_two = _xla_flops(two, latent, text_len, train=False)
  per_block = flops.flops_breakdown(two, latent, text_len)["blocks"] / 2
  assert per_block == pytest.approx(forward_two - forward_one, rel=0.05)
  # The count is affine in depth, so the 30-layer figure follows from the per-block one.
  thirty = config_lib.load("configs/wan_1_3b.py").model
  assert flops.forward_flops_per_example(thirty, latent, text_len) == pytest.approx(
      flops.forward_flops_per_example(config.model, latent, text_len) + 29 * per_block)


def test_train_is_three_forwards_less_first_layer_input_grads():
  model = config_lib.load("configs/wan_1_3b.py").model
  latent, text_len = (21, 60, 104, 16), 512
  parts = flops.flops_breakdown(model, latent, text_len)
  forward = flops.forward_flops_per_example(model, latent, text_len)
  assert flops.train_flops_per_example(model, latent, text_len) == 3 * forward - parts["no_input_grad"]
  # At 480p attention is most of the blocks' FLOPs (N = 32760 tokens against D = 1536): 71%.
  assert 0.65 < parts["attention"] / parts["blocks"] < 0.75
  with pytest.raises(ValueError, match="not divisible by model.patch_size"):
    flops.forward_flops_per_example(model, (21, 61, 104), text_len)
