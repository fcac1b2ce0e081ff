"""Sample scores fed a sampler call's videos at a time: the same scores as all at once, bounded feature
batches, and a feature model that fails mid-way turned into one skip reason."""

import numpy as np
import pytest

from sora_jax.evaluation import adherence, feature_models, frechet, fvd, prompt_suite, sample_scores

FRAMES, SIDE = 4, 8


def _video_model(batches):
  def embed(batch):
    batches.append(len(batch))
    return batch.reshape(len(batch), -1, 3).mean(axis=1)  # mean colour: a 3-wide feature

  return feature_models.VideoFeatureModel("mean_colour", {}, num_frames=2, embed=embed, batch_size=2)


def _clip_model(fail_after=None):
  calls = []

  def image_embeddings(frames):
    calls.append(len(frames))
    if fail_after is not None and len(calls) > fail_after:
      raise RuntimeError("out of memory in the image tower")
    features = frames.reshape(len(frames), -1, 3).mean(axis=1) + 1.0
    return features / np.linalg.norm(features, axis=-1, keepdims=True)

  text = lambda prompts: np.tile(np.array([[1.0, 0.0, 0.0]]), (len(prompts), 1))
  return feature_models.ImageTextModel("fake_clip", {}, text, image_embeddings)


def _scorers(batches, clip):
  rng = np.random.default_rng(1)
  reference = feature_models.FeatureStream(_video_model([]))
  for _ in range(6):
    reference.add(rng.integers(0, 256, (FRAMES, SIDE, SIDE, 3), dtype=np.uint8))
  stats = frechet.statistics(reference.features())
  ref = fvd.Reference(_video_model(batches), stats, key="k", path="", computed=True)
  return sample_scores.Scorers(fvd=ref, clip=clip, clip_frames=2)


def _inputs(count=5):
  entries = [prompt_suite.PromptEntry(p, dimension="adherence") for p in adherence.synthetic_prompts(count)]
  rng = np.random.default_rng(0)
  return entries, [rng.integers(0, 256, (FRAMES, SIDE, SIDE, 3), dtype=np.uint8) for _ in entries]


def test_scores_fed_a_call_at_a_time_equal_the_scores_of_one_call():
  entries, videos = _inputs()
  results, batches = {}, {}
  for split in ((5,), (2, 2, 1)):
    batches[split] = []
    scoring = sample_scores.SampleScoring(_scorers(batches[split], _clip_model()), entries)
    start = 0
    for size in split:
      scoring.add(videos[start:start + size])
      start += size
    results[split] = scoring.result()
  whole, parts = results[(5,)], results[(2, 2, 1)]
  assert parts["fvd"]["fvd"] == pytest.approx(whole["fvd"]["fvd"]) and parts["fvd"]["generated_clips"] == 5
  assert parts["clip"] == whole["clip"] and len(parts["clip"]["per_prompt"]) == 5
  assert parts["adherence"] == whole["adherence"] and parts["adherence"]["num_samples"] == 5
  # The FVD model embeds two clips at a time whatever the calls: never more than a batch is pending.
  assert batches[(2, 2, 1)] == batches[(5,)] == [2, 2, 1]


def test_a_feature_model_failing_mid_way_is_one_skip_reason():
  entries, videos = _inputs()
  lines = []
  scoring = sample_scores.SampleScoring(_scorers([], _clip_model(fail_after=2)), entries, lines.append)
  for start in range(0, 5, 2):
    scoring.add(videos[start:start + 2])
  result = scoring.result()
  assert result["clip_skipped"] == "RuntimeError: out of memory in the image tower"
  assert "clip" not in result and result["fvd"]["generated_clips"] == 5
  assert lines == ["eval: no CLIP score: RuntimeError: out of memory in the image tower"]


def test_scoring_needs_one_video_per_entry():
  entries, videos = _inputs(3)
  scoring = sample_scores.SampleScoring(sample_scores.Scorers(), entries)
  scoring.add(videos[:2])
  with pytest.raises(ValueError, match="2 of 3 prompts' videos were scored"):
    scoring.result()
  with pytest.raises(ValueError, match="4 videos scored for 3 prompts"):
    scoring.add(videos[:2])
