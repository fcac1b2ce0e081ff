"""NVIDIA GPU checks, run by `make test-gpu` on a GPU host (deselected by `make test` / `make test-all`).

cudnn's fused attention against the fp32 reference (forward and input gradients, with and without a
packing mask) and one bf16 train step of a small Wan-shaped model with each attention backend. The
same comparison, at [2, 1024, 12, 128], is in bench/gpu_step.py with its H200 figures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.model import attention as attention_lib

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_gpu():
  if jax.default_backend() != "gpu":
    pytest.fail(f"make test-gpu needs an NVIDIA GPU; jax's backend here is {jax.default_backend()!r}")


def _attention_and_grads(backend, q, k, v, d_out, segments):
  mask = attention_lib.segment_mask(segments, segments)

  def loss(q, k, v):
    if backend == "reference":
      out = attention_lib.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    else:
      out = attention_lib.attention(q, k, v, backend=backend, query_segment_ids=segments,
                                    kv_segment_ids=segments)
    return jnp.sum(out.astype(jnp.float32) * d_out), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_matches_the_reference(packed):
  rng = np.random.default_rng(0)
  shape = (2, 256, 4, 64)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
  d_out = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  segments = None
  valid = np.ones(shape[1], bool)
  if packed:
    row = np.array([1] * 150 + [2] * 90 + [0] * 16, np.int32)
    segments = jnp.asarray(np.repeat(row[None], shape[0], axis=0))
    valid = row > 0
  reference = _attention_and_grads("reference", q, k, v, d_out, segments)
  for got, want, name in zip(_attention_and_grads("cudnn", q, k, v, d_out, segments), reference,
                             ("out", "dq", "dk", "dv"), strict=True):
    got, want = got[:, valid], want[:, valid]
    error = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert error < 2e-2, (name, error)  # bf16 inputs and outputs: ~3e-3 measured on an H200


def test_bf16_train_step_agrees_across_attention_backends(tiny_train_config):
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import step as step_lib

  losses = {}
  for backend in ("xla", "cudnn"):
    config = tiny_train_config
    config.model.update(attention_backend=backend, compute_dtype="bfloat16", dim=64, num_heads=2,
                        ffn_dim=128)
    config.train.fast_compile = False
    mesh = mesh_lib.create_mesh(config, jax.devices()[:1])
    trainable = step_lib.build(config, mesh)
    state = trainable.setup.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    b = config.train.global_batch_size
    text_shape = (b, config.data.text_len, config.model.text_dim)
    batch = jax.device_put({"latents": rng.standard_normal((b, 4, 4, 4, 12)).astype(np.float32),
                            "text_embeds": rng.standard_normal(text_shape).astype(np.float32)},
                           trainable.batch_sharding)
    history = []
    for _ in range(3):
      state, metrics = trainable.train_step(state, batch)
      history.append(float(metrics["loss"]))
    losses[backend] = history
  assert all(np.isfinite(losses["cudnn"]))
  np.testing.assert_allclose(losses["cudnn"], losses["xla"], rtol=2e-2)
