"""Prompt suites: the prompts eval samples, each with an optional dimension, negative prompt and seed.

Owns reading `eval.prompt_file` (JSONL, one object a line: "prompt", and optionally "dimension" such as
subject / motion / camera / style, "negative_prompt", "seed"), with one error naming the file, line and
field, and the fall back to `eval.prompts` when no file is set. Scores are grouped by dimension.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import ml_collections

FIELDS = ("prompt", "dimension", "negative_prompt", "seed")


class PromptSuiteError(ValueError):
  """A prompt file that cannot be read as a suite."""


@dataclasses.dataclass(frozen=True)
class PromptEntry:
  prompt: str
  dimension: str | None = None
  negative_prompt: str | None = None  # None: eval.negative_prompt
  seed: int | None = None  # None: the noise of eval.seed at this prompt's position


def read(path: str) -> list[PromptEntry]:
  """The entries of a JSONL prompt file, in file order (blank lines skipped)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as error:
    raise PromptSuiteError(f"eval.prompt_file={path!r} cannot be read ({error.strerror}); expected a JSONL "
                           f"file of prompts") from None
  entries = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"eval.prompt_file={path!r} line {number}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as error:
      raise PromptSuiteError(f"{where} is not JSON ({error.msg})") from None
    if not isinstance(row, dict):
      raise PromptSuiteError(f"{where} is not a JSON object; expected {{\"prompt\": ...}}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
      raise PromptSuiteError(f"{where} has unknown fields {unknown}; expected some of {list(FIELDS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
      raise PromptSuiteError(f"{where} has no non-empty \"prompt\" string")
    for name in ("dimension", "negative_prompt"):
      if row.get(name) is not None and not isinstance(row[name], str):
        raise PromptSuiteError(f"{where}: \"{name}\" must be a string")
    seed = row.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
      raise PromptSuiteError(f"{where}: \"seed\" must be an integer >= 0")
    entries.append(PromptEntry(prompt.strip(), row.get("dimension") or None, row.get("negative_prompt"),
                               seed))
  if not entries:
    raise PromptSuiteError(f"eval.prompt_file={path!r} holds no prompts")
  return entries


def from_config(eval_config: ml_collections.ConfigDict) -> list[PromptEntry]:
  """eval.prompt_file's entries when set, else one entry per eval.prompts caption."""
  if eval_config.prompt_file:
    return read(eval_config.prompt_file)
  return [PromptEntry(prompt) for prompt in eval_config.prompts]


def by_dimension(entries: Sequence[PromptEntry]) -> dict[str, list[int]]:
  """{dimension: indices of its entries}, in first-seen order; entries without one are left out."""
  groups: dict[str, list[int]] = {}
  for index, entry in enumerate(entries):
    if entry.dimension:
      groups.setdefault(entry.dimension, []).append(index)
  return groups
