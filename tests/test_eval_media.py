"""Tests of eval media: mp4 / GIF round trips, contact sheet layout, loss plot."""

import numpy as np
import pytest
from PIL import Image

from sora_jax.evaluation import media


def _moving_square(num_frames=6, size=16):
  frames = np.zeros((num_frames, size, size, 3), np.uint8)
  frames[...] = (20, 40, 200)
  for t in range(num_frames):
    frames[t, 4:10, 2 + t:8 + t] = (230, 30, 30)
  return frames


def test_to_uint8_maps_range_and_rejects_nan():
  np.testing.assert_array_equal(media.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])
  with pytest.raises(ValueError, match="NaN"):
    media.to_uint8(np.array([np.nan]))


def test_mp4_is_h264_and_decodes_to_the_frames(tmp_path):
  import av

  frames = _moving_square()
  path = str(tmp_path / "clip.mp4")
  media.write_mp4(path, frames, fps=8, scale=4)
  with av.open(path) as container:
    stream = container.streams.video[0]
    assert stream.codec_context.name == "h264"
    assert (stream.width, stream.height) == (64, 64)
  decoded = media.read_video(path)
  assert decoded.shape == (6, 64, 64, 3)
  # Lossy but close: compare the centre pixel of each 4x4 block with the source.
  error = np.abs(decoded[:, 2::4, 2::4].astype(int) - frames.astype(int))
  assert np.median(error) <= 6


def test_gif_round_trips_frames(tmp_path):
  frames = _moving_square()
  path = str(tmp_path / "clip.gif")
  media.write_gif(path, frames, fps=8, scale=1)
  with Image.open(path) as gif:
    assert gif.n_frames == 6
    gif.seek(3)
    np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), frames[3])


def test_contact_sheet_places_frames_in_rows():
  videos = [_moving_square(), _moving_square(num_frames=3)]
  sheet = media.contact_sheet(videos, ["first", "second"], max_frames=4, scale=2)
  cell, gap, label = 32, 2, 14
  assert sheet.shape == (2 * (cell + label + gap) + gap, 4 * (cell + gap) + gap, 3)
  # Row 0, column 1 shows frame 2 (frames 0, 2, 3, 5 of six, evenly spaced), upscaled 2x.
  top, left = gap + label, gap + (cell + gap)
  np.testing.assert_array_equal(sheet[top:top + cell:2, left:left + cell:2], videos[0][2])
  with pytest.raises(ValueError, match="one label per video"):
    media.contact_sheet(videos, ["only one"])


def test_loss_plot_writes_png(tmp_path):
  path = str(tmp_path / "plot" / "loss.png")
  media.write_loss_plot(path, [0.05, 0.5, 0.95], {"raw": [0.1, 0.5, 0.9], "ema_0.99": [0.2, 0.4, 0.8]})
  with Image.open(path) as image:
    assert image.size == (600, 400)
  with pytest.raises(ValueError, match="2 points for 3 x values"):
    media.write_loss_plot(path, [0.1, 0.2, 0.3], {"raw": [1.0, 2.0]})


def test_bad_frames_are_named():
  with pytest.raises(ValueError, match=r"expected uint8 frames \[F, H, W, 3\]"):
    media.write_gif("x.gif", np.zeros((4, 4, 3), np.float32), fps=8)


def test_samples_decode_a_batch_at_a_time_with_the_same_frames():
  from sora_jax.evaluation import sampling

  calls = []

  class PassThroughVae:
    def decode(self, latents):
      calls.append(len(latents))
      return latents

  rng = np.random.default_rng(0)
  latents = rng.uniform(-1, 1, (5, 2, 4, 4, 3)).astype(np.float32)
  latents[3, 0, 0, 0, 0] = np.nan  # a diverged sample in the second batch
  videos, nonfinite = sampling.decode_to_frames(PassThroughVae(), latents, batch=2)
  assert calls == [2, 2, 2] and nonfinite == 1 and len(videos) == 5  # the last batch padded
  whole, whole_nonfinite = sampling.decode_to_frames(PassThroughVae(), latents, batch=5)
  assert whole_nonfinite == 1
  for ours, want in zip(videos, whole, strict=True):
    np.testing.assert_array_equal(ours, want)


def test_contact_sheet_shrinks_large_frames_to_a_viewable_cell():
  video = np.zeros((3, 720, 1280, 3), np.uint8)
  video[:, :, :640] = (200, 100, 50)  # left half coloured
  sheet = media.contact_sheet([video], ["720p"])
  cell_h, cell_w, gap, label = 180, 320, 2, 14
  assert sheet.shape == (cell_h + label + 2 * gap, 3 * (cell_w + gap) + gap, 3)
  top = gap + label
  np.testing.assert_array_equal(sheet[top + 90, gap + 80], (200, 100, 50))
  np.testing.assert_array_equal(sheet[top + 90, gap + 240], (0, 0, 0))
  assert media.contact_sheet([video[:, :8, :8]], ["small"], scale=1).shape[0] == 8 + label + 2 * gap
