"""Scores of one weight set's samples: prompt adherence, CLIP score and consistency, FVD.

Owns opening the optional feature models once per eval process (`open_scorers`: a model that is not
there is one log line and a `fvd_skipped` / `clip_skipped` reason in every result, never a crash),
scoring a weight set's videos with them (per prompt, per prompt-suite dimension and overall), and the
scalars TensorBoard and the step table show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from sora_jax.evaluation import adherence, feature_models, prompt_suite
from sora_jax.evaluation import fvd as fvd_lib

# What can go wrong opening or running a feature model: its own errors, and the library's.
_MODEL_ERRORS = (feature_models.FeatureModelError, ValueError, OSError, RuntimeError, ImportError)


@dataclasses.dataclass
class Scorers:
  """The feature models of one eval process, or why each is off."""

  fvd: fvd_lib.Reference | None = None
  fvd_skipped: str = ""
  clip: feature_models.ImageTextModel | None = None
  clip_skipped: str = ""
  clip_frames: int = 8

  def skipped_fields(self) -> dict[str, str]:
    return {name: reason for name, reason in (("fvd_skipped", self.fvd_skipped),
                                              ("clip_skipped", self.clip_skipped)) if reason}

  @classmethod
  def skipped(cls, eval_config: ml_collections.ConfigDict, reason: str) -> Scorers:
    """Scorers of a run that samples nothing: each one asked for is skipped with `reason`."""
    return cls(fvd_skipped=reason if eval_config.fvd_model else "",
               clip_skipped=reason if eval_config.clip_model else "")


def open_scorers(config: ml_collections.ConfigDict, workdir: str, vae: Any, log: Callable[[str], None],
                 is_main: bool = True) -> Scorers:
  """The FVD reference and CLIP model that config.eval asks for (on process 0: the others write nothing)."""
  e = config.eval
  scorers = Scorers(clip_frames=int(e.clip_frames))
  if not is_main:
    return scorers
  if e.fvd_model:
    try:
      model = feature_models.open_video_model(e.fvd_model)
      scorers.fvd = fvd_lib.reference(config, workdir, vae, model, log)
    except _MODEL_ERRORS as error:
      scorers.fvd_skipped = f"{type(error).__name__}: {error}"
      log(f"eval: no FVD: {scorers.fvd_skipped}")
  if e.clip_model:
    try:
      scorers.clip = feature_models.open_image_text_model(e.clip_model)
    except _MODEL_ERRORS as error:
      scorers.clip_skipped = f"{type(error).__name__}: {error}"
      log(f"eval: no CLIP score: {scorers.clip_skipped}")
  return scorers


def _is_synthetic(prompt: str) -> bool:
  try:
    adherence.parse_prompt(prompt)
  except ValueError:
    return False
  return True


def _means(rows: Sequence[dict[str, float]]) -> dict[str, float]:
  return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def score(scorers: Scorers, videos: Sequence[np.ndarray], entries: Sequence[prompt_suite.PromptEntry],
          log: Callable[[str], None] = print) -> dict[str, Any]:
  """{"adherence", "adherence_samples", "clip", "fvd"} for the samples of one weight set, where each
  applies (a score that fails on these samples is a `*_skipped` reason instead)."""
  prompts = [entry.prompt for entry in entries]
  out: dict[str, Any] = {}
  scorable = [(v, p) for v, p in zip(videos, prompts, strict=True) if _is_synthetic(p)]
  if scorable:
    result = adherence.score([v for v, _ in scorable], [p for _, p in scorable])
    out["adherence"] = {k: result[k] for k in (*adherence.ATTRIBUTES, "overall", "num_samples")}
    out["adherence_samples"] = result["samples"]
  if scorers.clip is not None:
    try:
      per_prompt = feature_models.clip_scores(scorers.clip, videos, prompts, scorers.clip_frames)
    except _MODEL_ERRORS as error:
      out["clip_skipped"] = f"{type(error).__name__}: {error}"
      log(f"eval: no CLIP score: {out['clip_skipped']}")
    else:
      out["clip"] = {**_means(per_prompt), "model": scorers.clip.name, "frames": scorers.clip_frames,
                     "per_prompt": per_prompt,
                     "by_dimension": {dimension: _means([per_prompt[i] for i in indices])
                                      for dimension, indices in prompt_suite.by_dimension(entries).items()}}
  if scorers.fvd is not None:
    try:
      out["fvd"] = fvd_lib.score(scorers.fvd, videos)
    except _MODEL_ERRORS as error:
      out["fvd_skipped"] = f"{type(error).__name__}: {error}"
      log(f"eval: no FVD: {out['fvd_skipped']}")
  return out


def scalars(entry: dict[str, Any]) -> dict[str, float]:
  """{tag: value} of one weight set's sample scores for TensorBoard and the step table."""
  values = {}
  if entry.get("fvd"):
    values["fvd"] = entry["fvd"]["fvd"]
  clip = entry.get("clip")
  if clip:
    values["clip_score"] = clip["clip_score"]
    values["clip_consistency"] = clip["clip_consistency"]
    for dimension, means in clip["by_dimension"].items():
      values[f"clip_score_{dimension}"] = means["clip_score"]
  return values
