"""Packing clips of different shapes into rows of a fixed token budget.

Owns the first-fit assignment of clips to rows and the assembly of one packed row with its segment
ids, positions and text (the token layout itself is sora_jax/patches.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sora_jax import patches


def first_fit(token_counts: Sequence[int], token_budget: int, max_segments: int) -> list[list[int]]:
  """Assigns clips (by position in `token_counts`) to rows, each clip to the first row it fits in.

  A row holds at most `token_budget` tokens and `max_segments` clips; rows keep the clips in stream
  order. Returns the clip positions of every row, rows in the order they were opened.
  """
  rows: list[list[int]] = []
  used: list[int] = []
  for position, tokens in enumerate(token_counts):
    if tokens > token_budget:
      raise ValueError(f"a clip of {tokens} tokens cannot fit data.token_budget={token_budget}")
    for row, row_used in enumerate(used):
      if row_used + tokens <= token_budget and len(rows[row]) < max_segments:
        rows[row].append(position)
        used[row] += tokens
        break
    else:
      rows.append([position])
      used.append(tokens)
  return rows


def empty_rows(num_rows: int, token_budget: int, token_dim: int, max_segments: int, text_len: int,
               text_dim: int) -> dict[str, np.ndarray]:
  """Zeroed packed arrays for `num_rows` rows (all padding: segment 0, loss mask 0)."""
  return {
      "latents": np.zeros((num_rows, token_budget, token_dim), np.float32),
      "segment_ids": np.zeros((num_rows, token_budget), np.int32),
      "positions": np.zeros((num_rows, token_budget, 3), np.int32),
      "loss_mask": np.zeros((num_rows, token_budget), np.float32),
      "text_embeds": np.zeros((num_rows, max_segments * text_len, text_dim), np.float32),
      "text_segment_ids": np.zeros((num_rows, max_segments * text_len), np.int32),
      "segment_grid": np.zeros((num_rows, max_segments, 3), np.int32),
  }


def fill_row(arrays: dict[str, np.ndarray], row: int, clips: Sequence[tuple[np.ndarray, np.ndarray]],
             patch_size: Sequence[int]) -> None:
  """Writes clips (latents [T',H',W',C], text_embeds [L, D]) into row `row` of `arrays` in order.

  Clip k (0-based) becomes segment k+1: its tokens, positions and loss mask occupy the next free
  slice of the row, its text occupies text slot k ([k*L, (k+1)*L) of text_embeds).
  """
  token_budget = arrays["segment_ids"].shape[1]
  max_segments = arrays["segment_grid"].shape[1]
  text_len = arrays["text_embeds"].shape[1] // max_segments
  if len(clips) > max_segments:
    raise ValueError(f"{len(clips)} clips exceed data.max_segments={max_segments} of a packed row")
  start = 0
  for k, (latents, text_embeds) in enumerate(clips):
    tokens = patches.patchify(latents, patch_size)
    end = start + len(tokens)
    if end > token_budget:
      raise ValueError(f"clips of {end} tokens exceed data.token_budget={token_budget} of a packed row")
    grid = patches.grid(latents.shape, patch_size)
    arrays["latents"][row, start:end] = tokens
    arrays["segment_ids"][row, start:end] = k + 1
    arrays["positions"][row, start:end] = patches.grid_positions(grid)
    arrays["loss_mask"][row, start:end] = 1.0
    arrays["text_embeds"][row, k * text_len:(k + 1) * text_len] = text_embeds
    arrays["text_segment_ids"][row, k * text_len:(k + 1) * text_len] = k + 1
    arrays["segment_grid"][row, k] = grid
    start = end
