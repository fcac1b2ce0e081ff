"""Synthetic moving-shape videos: files, captions, and attributes that survive H.264 at 32x32."""

import csv
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from helpers import decode_video

from sora_jax.offline import synthetic


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  rows = synthetic.generate(out, 12, seed=3, frames=16, size=32, fps=8, workers=1)
  return out, rows


def test_writes_videos_captions_and_attributes(videos):
  out, rows = videos
  with open(os.path.join(out, "captions.csv")) as f:
    captions = list(csv.DictReader(f))
  assert [c["video"] for c in captions] == [r["video"] for r in rows]
  with open(os.path.join(out, "attributes.json")) as f:
    attributes = json.load(f)
  assert attributes["fps"] == 8 and len(attributes["videos"]) == 12
  for caption, row in zip(captions, rows, strict=True):
    assert caption["caption"] == row["caption"]
    assert caption["caption"].startswith(f"a {row['color']} {row['shape']} moves {row['direction']}")
    assert caption["caption"].endswith(f"on a {row['background']} background")
    assert row["color"] != row["background"]
    frames = decode_video(os.path.join(out, row["video"]))
    assert frames.shape == (16, 32, 32, 3)
    with av.open(os.path.join(out, row["video"])) as container:
      stream = container.streams.video[0]
      assert stream.codec_context.name == "h264" and stream.average_rate == 8


def test_attributes_survive_h264_in_every_8_frame_clip(videos):
  out, rows = videos
  for row in rows:
    frames = decode_video(os.path.join(out, row["video"]))
    for clip in (frames[:8], frames[8:]):
      detected = synthetic.detect_attributes(clip)
      expected = {key: row[key] for key in ("color", "shape", "direction", "background")}
      assert detected == expected, row["video"]


def test_motion_is_clearly_visible_over_8_frames(videos):
  _, rows = videos
  for row in rows:
    frames = synthetic.render(row, 32, 16)[:8]
    background = np.asarray(row["background_rgb"])
    centroids = []
    for frame in frames:
      ys, xs = np.nonzero(np.abs(frame.astype(int) - background).sum(-1) > 60)
      centroids.append((xs.mean(), ys.mean()))
    shift = np.hypot(centroids[-1][0] - centroids[0][0], centroids[-1][1] - centroids[0][1])
    assert shift >= 4.0, (row["video"], shift)


def test_palettes_are_far_apart():
  for palette in (synthetic.COLORS, synthetic.BACKGROUNDS):
    rgb = np.asarray(list(palette.values()), float)
    distances = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert distances[~np.eye(len(rgb), dtype=bool)].min() > 100
  for color, background in synthetic.valid_pairs():
    gap = np.abs(np.subtract(synthetic.COLORS[color], synthetic.BACKGROUNDS[background])).sum()
    assert gap > 150, (color, background)


def test_same_seed_same_videos(tmp_path):
  first = synthetic.generate(str(tmp_path / "a"), 3, seed=5, frames=4, workers=1)
  second = synthetic.generate(str(tmp_path / "b"), 3, seed=5, frames=4, workers=1)
  other = synthetic.generate(str(tmp_path / "c"), 3, seed=6, frames=4, workers=1)
  assert first == second and first != other


def test_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="size=33"):
    synthetic.generate(str(tmp_path), 2, size=33)


def test_binary_writes_dataset_and_reports_bad_flags(tmp_path):
  command = [sys.executable, "-m", "sora_jax.data.synthetic", f"--out={tmp_path}", "--num_videos=2",
             "--frames=4", "--workers=1"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "wrote 2 videos" in result.stdout
  assert os.path.isfile(tmp_path / "videos" / "000001.mp4")
  result = subprocess.run(command + ["--size=7"], capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("sora_jax.data.synthetic: error: ")
