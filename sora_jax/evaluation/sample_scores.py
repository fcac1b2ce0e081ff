"""Scores of one weight set's samples: prompt adherence, CLIP score and consistency, FVD.

Owns opening the optional feature models once per eval process (`open_scorers`: a model that is not
there is one log line and a `fvd_skipped` / `clip_skipped` reason in every result, never a crash),
scoring a weight set's videos with them a batch at a time (per prompt, per prompt-suite dimension and
overall), and the scalars TensorBoard and the step table show.
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


class SampleScoring:
  """The scores of one weight set's samples, fed the decoded videos a batch at a time in entry order
  (`add`): host memory holds one batch of videos, the FVD model's pending frames and a row per sample,
  never every sample (256 eval prompts at 720p x 81 are 57 GB of uint8 frames).

  `result()` is {"adherence", "adherence_samples", "clip", "fvd"} where each applies; a score whose model
  fails on these samples is a `*_skipped` reason instead.
  """

  def __init__(self, scorers: Scorers, entries: Sequence[prompt_suite.PromptEntry],
               log: Callable[[str], None] = print):
    self.scorers, self.entries, self.log = scorers, list(entries), log
    self._count = 0
    self._adherence: list[dict[str, Any]] = []
    self._clip: list[dict[str, float]] = []
    self._fvd = feature_models.FeatureStream(scorers.fvd.model) if scorers.fvd is not None else None
    self._skipped: dict[str, str] = {}

  def _guard(self, name: str, run: Callable[[], None]) -> None:
    """Runs one feature model's part of `add`; its first failure turns that score off with the reason."""
    if f"{name}_skipped" in self._skipped:
      return
    try:
      run()
    except _MODEL_ERRORS as error:
      reason = self._skipped[f"{name}_skipped"] = f"{type(error).__name__}: {error}"
      self.log(f"eval: no {'FVD' if name == 'fvd' else 'CLIP score'}: {reason}")

  def add(self, videos: Sequence[np.ndarray]) -> None:
    """The next `len(videos)` entries' decoded uint8 videos [F, H, W, 3]."""
    entries = self.entries[self._count:self._count + len(videos)]
    if len(entries) != len(videos):
      raise ValueError(f"{self._count + len(videos)} videos scored for {len(self.entries)} prompts")
    self._count += len(videos)
    prompts = [entry.prompt for entry in entries]
    self._adherence += [adherence.detect(video, prompt) for video, prompt in zip(videos, prompts, strict=True)
                        if _is_synthetic(prompt)]
    if self.scorers.clip is not None:
      self._guard("clip", lambda: self._clip.extend(
          feature_models.clip_scores(self.scorers.clip, videos, prompts, self.scorers.clip_frames)))
    if self._fvd is not None:
      self._guard("fvd", lambda: [self._fvd.add(video) for video in videos])

  def result(self) -> dict[str, Any]:
    if self._count != len(self.entries):
      raise ValueError(f"{self._count} of {len(self.entries)} prompts' videos were scored")
    out: dict[str, Any] = {}
    if self._adherence:
      result = adherence.summarize(self._adherence)
      out["adherence"] = {k: result[k] for k in (*adherence.ATTRIBUTES, "overall", "num_samples")}
      out["adherence_samples"] = result["samples"]
    if self.scorers.clip is not None and "clip_skipped" not in self._skipped:
      per_prompt, groups = self._clip, prompt_suite.by_dimension(self.entries)
      out["clip"] = {**_means(per_prompt), "model": self.scorers.clip.name,
                     "frames": self.scorers.clip_frames, "per_prompt": per_prompt,
                     "by_dimension": {dimension: _means([per_prompt[i] for i in indices])
                                      for dimension, indices in groups.items()}}
    if self._fvd is not None:
      self._guard("fvd", lambda: out.update(fvd=fvd_lib.score_features(self.scorers.fvd,
                                                                       self._fvd.features())))
    out.update(self._skipped)
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
