"""Packing: patch-token layout, first-fit rows, and packed batches that trace back to their clips."""

import numpy as np
import pytest
import test_pipeline as tp
from hypothesis import given, settings
from hypothesis import strategies as st
from sora_jax.configs import wan_1_3b

from sora_jax import config as config_lib
from sora_jax import patches
from sora_jax.data import buckets, packing


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(64, 100), st.integers(1, 5))
def test_first_fit_respects_budget_and_segments(token_counts, budget, max_segments):
  rows = packing.first_fit(token_counts, budget, max_segments)
  assert sorted(p for row in rows for p in row) == list(range(len(token_counts)))
  for row in rows:
    assert sum(token_counts[p] for p in row) <= budget
    assert len(row) <= max_segments
    assert row == sorted(row)


def test_first_fit_rejects_a_clip_larger_than_the_budget():
  with pytest.raises(ValueError, match="token_budget=8"):
    packing.first_fit([4, 9], 8, 4)


def _packed_config(**data):
  return tp._config(packing=True, token_budget=40, max_segments=3, **data)


def test_packed_batches_trace_back_to_their_clips():
  source = tp._source()
  config = _packed_config(image_ratio=0.4)
  batches = tp._take(iter(tp._make(config, source, batch=3)), 6)
  patch = tuple(config.model.patch_size)
  num_images = num_clips = 0
  for batch in batches:
    assert batch["latents"].shape == (3, 40, 48) and batch["text_embeds"].shape == (3, 3 * tp.TEXT_LEN, 8)
    for row in range(3):
      segment_ids = batch["segment_ids"][row]
      np.testing.assert_array_equal(batch["loss_mask"][row], (segment_ids > 0).astype(np.float32))
      num_segments = segment_ids.max()
      assert 1 <= num_segments <= 3
      start = 0
      for segment in range(1, num_segments + 1):
        grid = tuple(batch["segment_grid"][row, segment - 1])
        end = start + int(np.prod(grid))
        # Segments are contiguous, in order, and exactly as long as their clip's patch grid.
        assert (segment_ids[start:end] == segment).all()
        tokens = batch["latents"][row, start:end]
        index = int(tokens[0, 0])
        record = source[index]
        np.testing.assert_array_equal(tokens, patches.patchify(record["latents"].astype(np.float32), patch))
        np.testing.assert_array_equal(batch["positions"][row, start:end], patches.grid_positions(grid))
        text = slice((segment - 1) * tp.TEXT_LEN, segment * tp.TEXT_LEN)
        expected_text = record["text_embeds"].astype(np.float32)
        np.testing.assert_array_equal(batch["text_embeds"][row, text], expected_text)
        assert (batch["text_segment_ids"][row, text] == segment).all()
        num_images += record["is_image"]
        num_clips += 1
        start = end
      # Everything after the last segment is padding: never over the budget, zeros everywhere.
      assert start <= 40 and not segment_ids[start:].any() and not batch["latents"][row, start:].any()
      assert not batch["text_segment_ids"][row, num_segments * tp.TEXT_LEN:].any()
  assert abs(num_images - 0.4 * num_clips) <= 1


def test_clip_streams_of_processes_are_disjoint_and_cover_an_epoch():
  table = buckets.bucket_table(tp._config())
  bucket_ids = np.array([0] * 10 + [1] * 6 + [2] * 7 + [-1])
  plans = [buckets.ClipPlan(bucket_ids, table, p, 2, 0.0, seed=5) for p in range(2)]
  per_epoch = plans[0].clips_per_epoch[buckets.VIDEO]
  assert per_epoch == 8
  epochs = [[plan.clip(i) for i in range(per_epoch)] for plan in plans]
  assert not set(epochs[0]) & set(epochs[1])
  assert sorted(epochs[0] + epochs[1]) == list(range(16))
  assert [plans[0].clip(i) for i in range(per_epoch, 2 * per_epoch)] != epochs[0]


def test_packed_validation_skips_the_clip_and_errors_name_it():
  source = tp._source(((tp.SQUARE, 8),))
  source[3]["latents"][0, 0, 1, 0] = np.nan
  config = _packed_config(image_ratio=0.0, validation="skip")
  dataset = tp._make(config, source, batch=2)
  batches = tp._take(iter(dataset), 8)
  first_tokens = [int(b["latents"][r, s, 0]) for b in batches for r in range(2)
                  for s in np.flatnonzero(np.diff(b["segment_ids"][r], prepend=0) > 0)]
  assert 3 not in first_tokens and len(first_tokens) > 8
  assert all(np.isfinite(b["latents"]).all() for b in batches)
  assert dataset.reader.num_skipped >= 1
  config.data.validation = "error"
  with pytest.raises(ValueError, match=r"record 3\b.*non-finite"):
    tp._take(iter(tp._make(config, source, batch=2)), 8)


def test_token_budget_smaller_than_a_clip_is_rejected():
  with pytest.raises(ValueError, match="token_budget=16"):
    tp._make(tp._config(packing=True, token_budget=16), tp._source())


def test_config_validation_rejects_a_budget_below_one_clip():
  config = wan_1_3b.get_config()
  config.data.packing = True
  config.data.token_budget = 4096
  with pytest.raises(config_lib.ConfigError, match="token_budget >= 32760"):
    config_lib.validate(config)
  config.data.token_budget = 32760
  config_lib.validate(config)


def test_text_slots_capped_by_the_smallest_clip_in_use():
  # Only 16-token clips in use: a 40-token row holds at most 2, so 2 text slots, not max_segments=3.
  batch = next(iter(tp._make(_packed_config(image_ratio=0.0), tp._source(((tp.SQUARE, 8),)), batch=2)))
  assert batch["text_embeds"].shape == (2, 2 * tp.TEXT_LEN, tp.TEXT_DIM)
  assert batch["segment_grid"].shape == (2, 2, 3)
  assert (batch["segment_ids"].max(axis=1) == 2).all()
