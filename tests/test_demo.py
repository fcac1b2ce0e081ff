"""Tests of the `make demo` orchestration: stage skipping, the summary, and (slow) a full short run."""

import json
import os
import subprocess
import sys

import pytest

from sora_jax.main import demo
from sora_jax.train import checkpoint_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_steps_lists_only_committed_steps(tmp_path):
  for name in ("100/state", "20/state", "300.orbax-checkpoint-tmp-12/state", "400"):
    os.makedirs(tmp_path / "checkpoints" / name)
  assert checkpoint_layout.committed_steps(str(tmp_path)) == [20, 100]
  assert checkpoint_layout.committed_steps(str(tmp_path / "missing")) == []


def test_format_summary_marks_targets():
  result = {"weight_sets": {"raw": {
      "loss": 0.25,
      "adherence": {"color": 0.95, "background": 1.0, "direction": 0.5, "shape": 0.4, "num_samples": 20},
      "files": {"contact_sheet": "/w/samples/9/raw/contact_sheet.png"}}}}
  lines = demo.format_summary(result)
  assert lines[0] == "  raw: val loss 0.2500, 20 prompts"
  assert "color 95% (ok)" in lines[1]
  assert "background 100% (ok)" in lines[1]
  assert "direction 50% (below 60%)" in lines[1]
  assert "shape 40%" in lines[1] and "shape 40% (" not in lines[1]  # no target for shape
  assert lines[2].endswith("/w/samples/9/raw/contact_sheet.png")


def test_format_summary_reports_continuation_per_given_frame_count():
  continued = {"given_latent_frames": 4, "generated_from_frame": 4, "num_clips": 32, "color": 1.0,
               "background": 0.97, "direction": 0.5, "shape": None, "samples": [{}]}
  result = {"step": 9, "weight_sets": {"ema_0.99": {
      "loss": 0.1, "adherence": {"color": 1.0, "num_samples": 4, "samples": [{}]},
      "continuation": {"given_4": continued},
      "files": {"continuation": {"given_4": {"contact_sheet": "/w/continuation_given_4.png", "mp4": []}}}}}}
  lines = demo.format_summary(result)
  assert lines[2] == ("    extension from 4 given latent frames, 32 held-out clips, frames 4+ against the "
                      "real clip: color 100% (ok), background 97% (ok), direction 50% (below 60%)")
  assert lines[3].endswith("/w/continuation_given_4.png")
  record = demo.summary_record(result, {"train": 12.34, "eval": None}, "configs/demo.py")
  assert record["seconds"] == {"train": 12.3, "eval": None}
  assert record["weight_sets"]["ema_0.99"]["continuation"]["given_4"]["direction"] == 0.5
  assert "samples" not in record["weight_sets"]["ema_0.99"]["continuation"]["given_4"]
  assert "samples" not in record["weight_sets"]["ema_0.99"]["adherence"]


def _run_demo(out: str, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "sora_jax.demo", f"--out={out}", "--num_videos=48", "--num_steps=2",
       "--stage2_steps=2", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=1200, check=False,
      env={**os.environ, "XLA_FLAGS": ""})  # one CPU device, as `make demo` runs


@pytest.mark.slow
def test_demo_runs_end_to_end_and_skips_finished_stages(tmp_path):
  first = _run_demo(str(tmp_path))
  assert first.returncode == 0, first.stderr[-3000:]
  assert "=== demo finished" in first.stdout
  assert "adherence: color" in first.stdout
  assert os.path.exists(tmp_path / "workdir" / "eval" / "2.json")
  assert "image-to-video from 1 given latent frame" in first.stdout
  assert "extension from 4 given latent frames" in first.stdout
  assert os.path.exists(tmp_path / "workdir" / "samples" / "2" / "raw" / "continued_given_1" / "00.mp4")
  with open(tmp_path / "demo_summary.json") as f:
    assert set(json.load(f)["weight_sets"]["raw"]["continuation"]) == {"given_1", "given_4"}
  assert checkpoint_layout.committed_steps(str(tmp_path / "workdir")) == [2]
  # The second stage: twice the frames, started from the first run's step 2, evaluated.
  assert checkpoint_layout.committed_steps(str(tmp_path / "workdir_stage2")) == [2]
  with open(tmp_path / "workdir_stage2" / "config.json") as f:
    saved = json.load(f)
  assert saved["train"]["init_from"] == f"{tmp_path / 'workdir'}@2"
  assert saved["data"]["buckets"] == [[16, 16, 16]]
  with open(tmp_path / "demo_summary.json") as f:
    summary = json.load(f)
  assert summary["stage2"]["frames"] == 16 and "raw" in summary["stage2"]["weight_sets"]
  assert "stage 2, 16-frame clips from the first run's step 2" in first.stdout

  again = _run_demo(str(tmp_path))
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("skipped:") == 6  # synthetic, train, eval per stage; prepare returns at once
  assert "already holds this dataset" in again.stdout + again.stderr


def test_demo_rejects_a_missing_config(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.demo", f"--out={tmp_path}", "--config=configs/nope.py"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("sora_jax.demo: error: config file")
