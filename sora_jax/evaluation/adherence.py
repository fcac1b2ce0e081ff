"""Prompt adherence on the synthetic moving-shapes data: does a sample show what its prompt asks?

Owns parsing a prompt into its attributes (colour, shape, direction, background) with the
vocabularies of sora_jax.offline.synthetic, and scoring samples read by its analytic detector.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sora_jax.offline import synthetic

ATTRIBUTES = ("color", "shape", "direction", "background")


def parse_prompt(prompt: str) -> dict[str, str | None]:
  """The attributes a synthetic-style prompt names ('a red circle moves left on a blue background').

  Unnamed attributes are None; a prompt naming none of them is not a synthetic prompt (ValueError).
  """
  words = re.findall(r"[a-z]+", prompt.lower())
  parsed: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
  background_match = re.search(r"on an? (\w+) background", prompt.lower())
  if background_match and background_match.group(1) in synthetic.BACKGROUNDS:
    parsed["background"] = background_match.group(1)
  # The shape's colour is the colour word right before a shape word.
  for previous, word in zip(words, words[1:], strict=False):
    if word in synthetic.SHAPES:
      parsed["shape"] = word
      if previous in synthetic.COLORS:
        parsed["color"] = previous
      break
  move_match = re.search(r"moves (\w+)", prompt.lower())
  if move_match and move_match.group(1) in synthetic.DIRECTIONS:
    parsed["direction"] = move_match.group(1)
  if all(value is None for value in parsed.values()):
    raise ValueError(
        f"prompt {prompt!r} names no colour, shape, direction or background of the synthetic data; "
        f"expected e.g. {synthetic.caption_for('red', 'circle', 'left', 'blue')!r}")
  return parsed


def chance_levels() -> dict[str, float]:
  """Accuracy of guessing uniformly: 1/#colours, 1/#shapes, 1/#directions, 1/#backgrounds."""
  return {
      "color": 1.0 / len(synthetic.COLORS),
      "shape": 1.0 / len(synthetic.SHAPES),
      "direction": 1.0 / len(synthetic.DIRECTIONS),
      "background": 1.0 / len(synthetic.BACKGROUNDS),
  }


def detect(video: np.ndarray, prompt: str) -> dict[str, Any]:
  """One sample's row: {"prompt", "expected", "detected", "correct"} for frames [F, H, W, 3] (uint8, or
  floats in [-1, 1]) sampled from the synthetic-data `prompt`."""
  expected = parse_prompt(prompt)
  detected = synthetic.detect_attributes(np.asarray(video))
  correct = {a: detected.get(a) == expected[a] for a in ATTRIBUTES if expected[a] is not None}
  return {"prompt": prompt, "expected": expected, "detected": {a: detected.get(a) for a in ATTRIBUTES},
          "correct": correct}


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Fraction of prompted attributes the detector read back, per attribute and overall, from `detect`
  rows: {"color": acc, ..., "overall": acc, "num_samples": n, "samples": rows}; an attribute no prompt
  names has accuracy None."""
  right = {a: sum(int(row["correct"][a]) for row in samples if a in row["correct"]) for a in ATTRIBUTES}
  asked = {a: sum(a in row["correct"] for row in samples) for a in ATTRIBUTES}
  result: dict[str, Any] = {a: (right[a] / asked[a] if asked[a] else None) for a in ATTRIBUTES}
  total_asked = sum(asked.values())
  result["overall"] = sum(right.values()) / total_asked if total_asked else None
  result["num_samples"] = len(samples)
  result["samples"] = list(samples)
  return result


def score(videos: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, Any]:
  """`summarize` of every video's `detect` row (one prompt per video)."""
  if len(videos) != len(prompts):
    raise ValueError(
        f"adherence needs one prompt per video; got {len(videos)} videos, {len(prompts)} prompts")
  return summarize([detect(video, prompt) for video, prompt in zip(videos, prompts, strict=True)])


def synthetic_prompts(count: int, seed: int = 0) -> list[str]:
  """`count` distinct-as-possible prompts covering colours, shapes, directions and backgrounds evenly.

  Cycles through every (colour, background) pair, shape and direction in a seeded order, so a
  small eval set still asks for each value about equally often.
  """
  rng = np.random.default_rng(seed)
  pairs = synthetic.valid_pairs()
  shapes, directions = list(synthetic.SHAPES), list(synthetic.DIRECTIONS)
  pair_order = rng.permutation(len(pairs))
  prompts = []
  for index in range(count):
    color, background = pairs[pair_order[index % len(pairs)]]
    shape = shapes[(index + index // len(pairs)) % len(shapes)]
    direction = directions[index % len(directions)]
    prompts.append(synthetic.caption_for(color, shape, direction, background))
  return prompts
