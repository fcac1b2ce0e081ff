"""The spacetime-patch layout (sora_jax/patches.py): one layout for the DiT, packing and FLOP counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import patches


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 1, 2)])
def test_patchify_round_trip_and_order(patch):
  latents = np.random.default_rng(0).normal(size=(4, 6, 8, 3)).astype(np.float32)
  tokens = patches.patchify(latents, patch)
  grid = (4 // patch[0], 6 // patch[1], 8 // patch[2])
  assert tokens.shape == (np.prod(grid), np.prod(patch) * 3)
  np.testing.assert_array_equal(patches.unpatchify(tokens, grid, patch), latents)
  positions = patches.grid_positions(grid)
  t, h, w = positions[5]
  patch_block = latents[t * patch[0]:(t + 1) * patch[0], h * patch[1]:(h + 1) * patch[1],
                        w * patch[2]:(w + 1) * patch[2]]
  np.testing.assert_array_equal(tokens[5], patch_block.reshape(-1))


def test_dense_on_tokens_equals_conv3d_patch_embedding():
  patch, channels, width = (1, 2, 2), 3, 5
  rng = np.random.default_rng(1)
  latents = rng.normal(size=(2, 4, 6, channels)).astype(np.float32)
  kernel = rng.normal(size=(*patch, channels, width)).astype(np.float32)  # DHWIO
  conv = jax.lax.conv_general_dilated(latents[None], kernel, window_strides=patch, padding="VALID",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))[0]
  dense = patches.patchify(latents, patch) @ kernel.reshape(-1, width)
  np.testing.assert_allclose(dense, np.asarray(conv).reshape(-1, width), rtol=1e-5, atol=1e-5)


def test_batched_jax_tokens_equal_each_clips_numpy_tokens_and_padding_is_dropped():
  latents = jnp.arange(2 * 4 * 6 * 8 * 3, dtype=jnp.float32).reshape(2, 4, 6, 8, 3)
  tokens = patches.patchify(latents, (2, 2, 2))
  assert tokens.shape == (2, 24, 24)
  for b in range(2):
    np.testing.assert_array_equal(tokens[b], patches.patchify(np.asarray(latents[b]), (2, 2, 2)))
  padded = jnp.concatenate([tokens, jnp.full((2, 5, 24), jnp.nan)], axis=1)
  np.testing.assert_array_equal(patches.unpatchify(padded, (2, 3, 4), (2, 2, 2)), latents)


def test_grid_and_token_counts_refuse_a_patch_that_does_not_divide():
  assert patches.grid((21, 60, 104, 16), (1, 2, 2)) == (21, 30, 52)
  assert patches.num_tokens((21, 60, 104), (1, 2, 2)) == 32_760
  with pytest.raises(ValueError, match=r"\(5, 6, 8\) is not divisible by model.patch_size = \(2, 2, 2\)"):
    patches.grid((5, 6, 8, 3), (2, 2, 2))
  with pytest.raises(ValueError, match="expected"):
    patches.num_tokens((6, 8), (1, 2, 2))
