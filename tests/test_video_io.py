"""Video and image reading for prepare: bucket choice by aspect ratio, fps resampling, clip stride, images."""

import os

import numpy as np
import pytest
from PIL import Image

from sora_jax.offline import synthetic, video_io

BUCKETS = ((8, 32, 48), (8, 48, 32), (8, 32, 32), (16, 32, 32))


@pytest.mark.parametrize(("height", "width", "expected"), [
    (360, 640, (8, 32, 48)),  # 16:9 landscape -> the 2:3 landscape bucket
    (640, 360, (8, 48, 32)),  # portrait -> portrait
    (100, 110, (16, 32, 32)),  # near square -> square, ties go to more frames
])
def test_pick_bucket_is_nearest_in_aspect_ratio(height, width, expected):
  assert video_io.pick_bucket(height, width, BUCKETS) == expected


def test_pick_bucket_passes_over_buckets_longer_than_the_video():
  assert video_io.pick_bucket(100, 100, BUCKETS, max_frames=12) == (8, 32, 32)
  # Nothing fits: the shortest bucket comes back and the reader reports the video too short.
  assert video_io.pick_bucket(100, 100, BUCKETS, max_frames=3)[0] == 8
  with pytest.raises(ValueError, match=r"no buckets to fit a 10x10 input.*data.buckets"):
    video_io.pick_bucket(10, 10, ())


def _counter_video(path, num_frames, fps, height=32, width=32):
  """Frame i is a flat grey of level 5*i: the decoded level tells which source frame was sampled."""
  levels = (5 * np.arange(num_frames)).astype(np.uint8)
  frames = np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()
  synthetic.write_mp4(path, frames, fps)
  return levels


def test_video_is_resampled_to_the_configured_fps_and_cut_every_stride(tmp_path):
  path = str(tmp_path / "counter.mp4")
  _counter_video(path, 48, fps=24)  # 2 s at 24 fps
  clips = list(video_io.read_video_clips(path, fps=8, buckets=((8, 32, 32),), clip_stride_s=0.5))
  # 16 samples at 8 fps; 8-frame clips starting every 4 samples: at 0, 0.5 and 1.0 s.
  assert [start for start, _, _ in clips] == [0.0, 0.5, 1.0]
  for start, frames, bucket in clips:
    assert bucket == (8, 32, 32) and frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    # Sample k of the clip is the frame on screen at start + k/8 s: source frame 24*(start + k/8).
    source_frames = np.round(24 * (start + np.arange(8) / 8)).astype(int)
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), 5 * source_frames, atol=2.5)


def test_upsampling_repeats_the_frame_on_screen(tmp_path):
  path = str(tmp_path / "slow.mp4")
  _counter_video(path, 8, fps=4)  # 2 s at 4 fps, sampled at 8 fps: every frame shown twice
  (start, frames, _), = video_io.read_video_clips(path, fps=8, buckets=((16, 32, 32),), clip_stride_s=4.0)
  assert start == 0.0
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), 5 * (np.arange(16) // 2), atol=2.5)


def test_portrait_video_is_cropped_into_the_portrait_bucket(tmp_path):
  path = str(tmp_path / "portrait.mp4")
  frames = np.zeros((16, 96, 48, 3), np.uint8)
  frames[:, :, 16:32] = 255  # a white vertical band in the middle third
  synthetic.write_mp4(path, frames, 8)
  clips = list(video_io.read_video_clips(path, fps=8, buckets=BUCKETS[:3], clip_stride_s=1.0))
  assert [bucket for _, _, bucket in clips] == [(8, 48, 32)] * 2
  # 96x48 covers 48x32 at 64x32 (height cropped), so the band stays in the middle third of the width.
  first = clips[0][1].astype(np.float32)
  assert first[:, :, 12:20].min() > 200 and first[:, :, :8].max() < 50 and first[:, :, -8:].max() < 50


def test_too_short_not_a_video_and_missing_are_named(tmp_path):
  path = str(tmp_path / "short.mp4")
  _counter_video(path, 4, fps=8)
  with pytest.raises(video_io.MediaError, match=r"short.mp4 gives 4 frames.*fewer than the 8") as error:
    list(video_io.read_video_clips(path, fps=8, buckets=((8, 32, 32),), clip_stride_s=1.0))
  assert error.value.reason == video_io.TOO_SHORT
  text = tmp_path / "notes.txt"
  text.write_text("not a video")
  with pytest.raises(video_io.MediaError) as error:
    list(video_io.read_video_clips(str(text), fps=8, buckets=((8, 32, 32),), clip_stride_s=1.0))
  assert error.value.reason == video_io.UNREADABLE and "notes.txt" in str(error.value)
  with pytest.raises(video_io.MediaError) as error:
    video_io.read_image(str(tmp_path / "gone.webp"), ((1, 32, 32),))
  assert error.value.reason == video_io.MISSING


@pytest.mark.parametrize("extension", ["png", "jpg", "webp"])
def test_images_become_one_frame_clips_in_their_nearest_bucket(tmp_path, extension):
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 40:] = (30, 30, 230)  # right half blue
  path = os.path.join(tmp_path, f"half_blue.{extension}")
  Image.fromarray(image).save(path, **({"quality": 95} if extension != "png" else {}))
  assert video_io.is_image(path)
  frames, bucket = video_io.read_image(path, ((1, 32, 48), (1, 48, 32), (1, 32, 32)))
  assert bucket == (1, 32, 48) and frames.shape == (1, 32, 48, 3) and frames.dtype == np.uint8
  # 80x40 covers 48x32 at 64x32: columns 8..56 kept, so the blue half starts at column 24.
  assert frames[0, :, :20, 2].max() < 60 and frames[0, :, 28:, 2].min() > 180


def test_given_frames_are_resampled_cropped_and_the_last_ones_kept(tmp_path):
  """sample --video: the frames a sample continues, at the run's fps, the last `max_frames` of them."""
  path = str(tmp_path / "counter.mp4")
  _counter_video(path, 48, fps=24, height=32, width=48)  # 2 s at 24 fps
  every = video_io.read_frames(path, 16, 16)
  assert every.shape == (48, 16, 16, 3)
  resampled = video_io.read_frames(path, 16, 16, fps=8)  # the frame on screen at k/8 s
  np.testing.assert_allclose(resampled.mean(axis=(1, 2, 3)), 5 * 3 * np.arange(16), atol=2.5)
  last = video_io.read_frames(path, 16, 16, fps=8, max_frames=3)
  np.testing.assert_array_equal(last, resampled[-3:])
  slow = video_io.read_frames(path, 16, 16, fps=48)  # upsampled: each frame twice
  np.testing.assert_allclose(slow.mean(axis=(1, 2, 3)), 5 * (np.arange(96) // 2), atol=2.5)
