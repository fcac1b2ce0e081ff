"""eval on a real-data footing: prompt suites, FVD and CLIP score from local models, the step table and
curves, and a watch that starts before the run and stops at the run's own final step."""

import json
import os
import threading
import time

import numpy as np
import pytest
from eval_helpers import eval_config, make_dataset, make_workdir

from sora_jax.evaluation import evaluator as evaluator_lib
from sora_jax.evaluation import fvd as fvd_lib
from sora_jax.evaluation import prompt_suite, report
from sora_jax.parallel import mesh as mesh_lib

pytest.importorskip("torch")
pytest.importorskip("transformers")
from feature_model_helpers import make_siglip, make_videomae  # noqa: E402

pytestmark = pytest.mark.torch

SUITE = [
    {"prompt": "a red ball rolls", "dimension": "subject", "seed": 7},
    {"prompt": "waves on a beach", "dimension": "scene", "negative_prompt": "snow in a forest"},
    {"prompt": "a boat on a lake", "dimension": "scene"},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("quality")
  config = eval_config()
  make_dataset(str(root), config)
  suite = root / "suite.jsonl"
  suite.write_text("\n".join(json.dumps(row) for row in SUITE) + "\n")
  config.eval.prompt_file = str(suite)
  config.eval.fvd_model = make_videomae(str(root / "videomae"))
  config.eval.clip_model = make_siglip(str(root / "siglip"))
  config.eval.fvd_reference_clips = 6
  config.eval.clip_frames = 3
  workdir = str(root / "workdir")
  make_workdir(workdir, config, steps=(10, 20))
  return config, workdir


def test_fvd_clip_score_and_dimensions_in_every_result(run):
  config, workdir = run
  lines = []
  evaluator = evaluator_lib.build(config, workdir, mesh_lib.create_mesh(config), log=lines.append)
  assert evaluator.scorers.fvd.computed and os.path.isfile(evaluator.scorers.fvd.path)
  assert [e.dimension for e in evaluator.entries] == ["subject", "scene", "scene", "adherence", "adherence"]
  results = evaluator_lib.evaluate_steps(evaluator, [10, 20])
  saved = json.load(open(os.path.join(workdir, "eval", "20.json")))
  raw = saved["weight_sets"]["raw"]
  assert raw["fvd"]["generated_clips"] == 5 and raw["fvd"]["reference_clips"] == 6
  assert raw["fvd"]["model"] == "videomae:videomae" and raw["fvd"]["fvd"] > 0
  assert len(raw["clip"]["per_prompt"]) == 5 and raw["clip"]["model"] == "siglip:siglip"
  assert set(raw["clip"]["by_dimension"]) == {"subject", "scene", "adherence"}
  scene = np.mean([raw["clip"]["per_prompt"][i]["clip_score"] for i in (1, 2)])
  assert raw["clip"]["by_dimension"]["scene"]["clip_score"] == pytest.approx(scene)
  assert saved["dimensions"][:3] == ["subject", "scene", "scene"]
  for path in raw["files"]["contact_sheets_by_dimension"].values():
    assert os.path.getsize(path) > 0
  assert "FVD" in evaluator_lib.summary_line(results[-1]) and "clip_score" in evaluator_lib.summary_line(
      results[-1])
  # The table and the curves across steps.
  text = report.table(results)
  assert text.splitlines()[0].split() == ["step", "weights", "val_loss", "fvd", "clip_score",
                                          "clip_consistency", "adherence"]
  assert len(text.splitlines()) == 5  # 2 steps x 2 weight sets
  curves = report.write_curves(workdir, evaluator_lib.saved_results(workdir))
  assert set(curves) == {"val_loss", "fvd", "clip_score", "clip_consistency", "adherence"}
  # A second eval process reads the cached reference statistics instead of decoding the clips again.
  again = evaluator_lib.build(config, workdir, mesh_lib.create_mesh(config), log=lines.append)
  assert not again.scorers.fvd.computed and again.scorers.fvd.key == evaluator.scorers.fvd.key
  assert evaluator_lib.evaluate_step(again, 20)["weight_sets"]["raw"]["fvd"]["fvd"] == raw["fvd"]["fvd"]


def test_samples_are_scored_and_written_a_sampler_call_at_a_time_with_the_same_results(run, monkeypatch):
  config, workdir = run
  import jax
  from PIL import Image

  from sora_jax.evaluation import sample_scores

  added = []
  add = sample_scores.SampleScoring.add
  monkeypatch.setattr(sample_scores.SampleScoring, "add", lambda self, videos: (added.append(len(videos)),
                                                                                 add(self, videos))[1])
  sized = config.copy_and_resolve_references()
  evaluator = evaluator_lib.build(sized, workdir, mesh_lib.create_mesh(config, jax.devices()[:2]),
                                  log=lambda _: None)  # two batch shards
  results = {}
  for size in (2, 6):
    sized.eval.sample_batch_size = size
    added.clear()
    compiled = evaluator.sampler._run._cache_size()
    results[size] = evaluator_lib.evaluate_step(evaluator, 10)["weight_sets"]["raw"]
    # Five prompts per weight set: two calls of two and a last one padded to two (one compile), or one call.
    assert added == ([2, 2, 1] if size == 2 else [5]) * 2
    assert evaluator.sampler._run._cache_size() == compiled + 1
    results[size]["sheet"] = np.asarray(Image.open(results[size]["files"]["contact_sheet"]))
  split, whole = results[2], results[6]
  assert split["nonfinite_samples"] == whole["nonfinite_samples"] == 0
  assert split["adherence_samples"] == whole["adherence_samples"]
  assert split["fvd"]["generated_clips"] == 5
  assert split["fvd"]["fvd"] == pytest.approx(whole["fvd"]["fvd"], rel=1e-4)
  for one, two in zip(split["clip"]["per_prompt"], whole["clip"]["per_prompt"], strict=True):
    assert one == pytest.approx(two, rel=1e-4)
  assert np.abs(split["sheet"].astype(int) - whole["sheet"]).max() <= 1


def test_fvd_of_held_out_clips_against_themselves_is_near_zero_and_noise_is_far(run):
  config, workdir = run
  from sora_jax.encoders import vae as vae_lib
  from sora_jax.evaluation import feature_models

  vae = vae_lib.get_vae(config)
  ref = fvd_lib.reference(config, workdir, vae, feature_models.open_video_model(config.eval.fvd_model),
                          log=lambda _: None)
  clips = fvd_lib.reference_videos(config.data, vae, 6)
  same = fvd_lib.score(ref, clips)["fvd"]
  rng = np.random.default_rng(0)
  noise = fvd_lib.score(ref, [rng.integers(0, 256, clip.shape, dtype=np.uint8) for clip in clips])["fvd"]
  assert same < 1e-6 * max(noise, 1.0) and noise > 10 * max(same, 1e-9)


def test_reference_features_stream_one_feature_batch_of_decoded_clips_at_a_time(run):
  config, _ = run
  import dataclasses

  from sora_jax.encoders import vae as vae_lib
  from sora_jax.evaluation import feature_models

  vae = vae_lib.get_vae(config)
  model = feature_models.open_video_model(config.eval.fvd_model)
  events = []

  class CountingVae:
    def decode(self, latents):
      events.append("decode")
      return vae.decode(latents)

  def embed(batch):
    events.append(len(batch))
    return model.embed(batch)

  counting = dataclasses.replace(model, embed=embed, batch_size=2)
  streamed = fvd_lib.reference_features(config.data, CountingVae(), counting, 5, decode_batch=2)
  # Clips are decoded two per call and embedded two at a time as they come: never more than a batch held.
  assert events == ["decode", 2, "decode", 2, "decode", 1]
  np.testing.assert_allclose(streamed, model.features(fvd_lib.reference_videos(config.data, vae, 5)),
                             rtol=1e-5, atol=1e-6)


def test_missing_feature_models_are_skipped_with_a_reason(run, tmp_path):
  config, workdir = run
  config = config.copy_and_resolve_references()
  config.eval.fvd_model = str(tmp_path / "no_i3d.pt")
  config.eval.clip_model = str(tmp_path / "no_clip")
  lines = []
  evaluator = evaluator_lib.build(config, workdir, mesh_lib.create_mesh(config), log=lines.append)
  results = evaluator_lib.evaluate_step(evaluator, 10)
  assert "does not exist" in results["fvd_skipped"] and "is not a directory" in results["clip_skipped"]
  assert "fvd" not in results["weight_sets"]["raw"] and results["weight_sets"]["raw"]["loss"] > 0
  assert any(line.startswith("eval: no FVD: ") for line in lines)
  assert any(line.startswith("eval: no CLIP score: ") for line in lines)


def test_prompt_suite_errors_name_the_line(tmp_path):
  path = tmp_path / "suite.jsonl"
  for text, message in (('{"prompt": "a"}\n{"prompt": ""}', "line 2 has no non-empty"),
                        ('{"prompt": "a", "seed": -1}', "line 1: \"seed\" must be an integer >= 0"),
                        ('{"prompt": "a", "style": "x"}', "unknown fields \\['style'\\]"),
                        ("not json", "line 1 is not JSON"), ("\n", "holds no prompts")):
    path.write_text(text)
    with pytest.raises(prompt_suite.PromptSuiteError, match=message):
      prompt_suite.read(str(path))
  shipped = prompt_suite.read(os.path.join(os.path.dirname(__file__), "..", "configs", "prompts",
                                           "video_suite.jsonl"))
  assert len(shipped) >= 30
  dimensions = {entry.dimension for entry in shipped}
  assert {"subject", "motion", "camera", "style", "scene", "color", "spatial"} <= dimensions


def test_watch_waits_for_the_workdir_and_stops_at_the_runs_final_step(run, tmp_path):
  config, _ = run
  config = config.copy_and_resolve_references()
  config.eval.fvd_model = config.eval.clip_model = config.eval.prompt_file = ""
  workdir = str(tmp_path / "late")
  threading.Timer(0.5, lambda: os.makedirs(workdir)).start()
  assert evaluator_lib.wait_for_workdir(workdir, 0.1, lambda: False, log=lambda _: None)
  saved = config.copy_and_resolve_references()
  saved.train.num_steps = 20  # the run's own final step; the watcher's config says 10**6
  make_workdir(workdir, saved, steps=(10, 20))
  evaluator = evaluator_lib.build(config, workdir, mesh_lib.create_mesh(config), log=lambda _: None)
  start = time.time()
  results = evaluator_lib.watch(evaluator, 0.1, lambda: time.time() - start > 300, final_step=10**6)
  assert [r["step"] for r in results] == [10, 20]
  assert time.time() - start < 300
  assert evaluator_lib.wait_for_workdir(str(tmp_path / "never"), 0.1, lambda: True) is False


def test_reference_clips_are_decoded_in_batches_of_one_shape_in_record_order():
  shapes = [(2, 3), (2, 3), (2, 3), (4, 3), (2, 3)]
  arrays = [np.full(shape, value) for value, shape in enumerate(shapes)]
  stacks = list(fvd_lib.shape_batches(arrays, batch=2))
  assert [stack.shape for stack in stacks] == [(2, 2, 3), (1, 2, 3), (1, 4, 3), (1, 2, 3)]
  assert [int(v) for stack in stacks for v in stack[:, 0, 0]] == [0, 1, 2, 3, 4]
