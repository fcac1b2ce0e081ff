"""Writing eval media: H.264 mp4 (imageio-ffmpeg), GIF, PNG contact sheets and the loss-vs-sigma plot.

Owns the conversion of decoded pixels ([-1, 1] floats) to uint8 frames and every image/video file the
eval and sample binaries write.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from sora_jax.files import atomic

# Videos and sheets are upscaled (nearest neighbour) until their short side reaches this many pixels:
# the demo's 32x32 clips are unreadable at native size, and H.264 chroma subsampling would smear them.
MIN_DISPLAY_SIDE = 128
# A contact sheet cell's longer side at most: 720p samples shrink to 320x180 (box filter), so a sheet of
# every eval prompt stays an image a browser opens (native 720p cells make one row 10k pixels wide).
MAX_SHEET_SIDE = 320


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Maps decoded pixels in [-1, 1] (any float dtype, any leading shape, channels last) to uint8."""
  pixels = np.asarray(pixels, dtype=np.float32)
  if not np.all(np.isfinite(pixels)):
    raise ValueError("pixels contain NaN or inf; expected finite values in [-1, 1]")
  return np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_frames(frames: np.ndarray, name: str) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f"{name}: expected uint8 frames [F, H, W, 3]; got {frames.dtype}{list(frames.shape)}")
  return frames


def display_scale(height: int, width: int) -> int:
  """Integer nearest-neighbour factor that brings the short side to at least MIN_DISPLAY_SIDE."""
  return max(1, math.ceil(MIN_DISPLAY_SIDE / max(1, min(height, width))))


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of [..., H, W, C] by an integer factor."""
  if factor == 1:
    return frames
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def write_mp4(path: str, frames: np.ndarray, fps: float, scale: int | None = None) -> None:
  """Writes uint8 frames [F, H, W, 3] as H.264 / yuv420p mp4 (plays in browsers and players)."""
  frames = _check_frames(frames, path)
  frames = upscale(frames, scale or display_scale(*frames.shape[1:3]))
  # yuv420p needs even sides; pad by repeating the last row / column.
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  height, width = frames.shape[1:3]
  with _quiet_fork():
    _encode(path, frames, width, height, fps)


@contextlib.contextmanager
def _quiet_fork():
  # ffmpeg runs as a child process: fork is followed by exec at once, so JAX's warning about
  # forking a multithreaded process does not apply.
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
    yield


def _encode(path: str, frames: np.ndarray, width: int, height: int, fps: float) -> None:
  import imageio_ffmpeg

  with atomic.staged_path(path, suffix=".mp4") as staged:
    _encode_to(staged, frames, width, height, fps, imageio_ffmpeg)


def _encode_to(path: str, frames: np.ndarray, width: int, height: int, fps: float, imageio_ffmpeg) -> None:
  writer = imageio_ffmpeg.write_frames(
      path, (width, height), fps=float(fps), codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
      macro_block_size=1, quality=None, output_params=["-crf", "18"], ffmpeg_log_level="error")
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


def read_video(path: str) -> np.ndarray:
  """Reads an mp4 back as uint8 frames [F, H, W, 3] (for checks and tests)."""
  import imageio_ffmpeg

  with _quiet_fork():
    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
  if not frames:
    raise ValueError(f"{path}: no video frames could be decoded")
  return np.stack(frames)


def write_gif(path: str, frames: np.ndarray, fps: float, scale: int | None = None) -> None:
  """Writes uint8 frames [F, H, W, 3] as a looping GIF."""
  frames = _check_frames(frames, path)
  frames = upscale(frames, scale or display_scale(*frames.shape[1:3]))
  images = [Image.fromarray(frame) for frame in frames]
  with atomic.open_atomic(path, "wb") as f:
    images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)


def sheet_row(video: np.ndarray, max_frames: int = 8, scale: int | None = None) -> np.ndarray:
  """A video's contact-sheet row: up to `max_frames` evenly spaced frames, sized as the sheet shows them
  (uint8 [n, h, w, 3]), so a caller can keep the row and drop the video.

  `scale` None: small frames are upscaled (`display_scale`) and large ones shrunk to `MAX_SHEET_SIDE`
  (box filter); an explicit `scale` upscales by it and never shrinks."""
  video = _check_frames(video, "video")
  height, width = video.shape[1:3]
  shrink = min(1.0, MAX_SHEET_SIDE / max(height, width)) if scale is None else 1.0
  scale = scale or display_scale(height, width)
  picks = np.linspace(0, video.shape[0] - 1, num=min(max_frames, video.shape[0])).round().astype(int)
  frames = upscale(video[picks], scale)
  if shrink < 1.0:
    size = (max(1, round(width * scale * shrink)), max(1, round(height * scale * shrink)))
    frames = np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BOX))
                       for frame in frames])
  return frames


def contact_sheet(videos: Sequence[np.ndarray], labels: Sequence[str], max_frames: int = 8,
                  scale: int | None = None) -> np.ndarray:
  """One row per video (`sheet_row`: up to `max_frames` evenly spaced frames), its label above it;
  uint8 [H, W, 3]."""
  if not videos or len(videos) != len(labels):
    raise ValueError(
        f"contact sheet needs one label per video; got {len(videos)} videos, {len(labels)} labels")
  return compose_sheet([sheet_row(_check_frames(video, f"video {index}"), max_frames, scale)
                        for index, video in enumerate(videos)], labels)


def compose_sheet(rows: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
  """The contact sheet of `sheet_row` rows, each row's label above it; uint8 [H, W, 3]."""
  if not rows or len(rows) != len(labels):
    raise ValueError(f"contact sheet needs one label per row; got {len(rows)} rows, {len(labels)} labels")
  cell_h, cell_w = max(r.shape[1] for r in rows), max(r.shape[2] for r in rows)
  label_h, gap = 14, 2
  columns = max(r.shape[0] for r in rows)
  sheet = Image.new("RGB", (columns * (cell_w + gap) + gap, len(rows) * (cell_h + label_h + gap) + gap),
                    (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for index, (row, label) in enumerate(zip(rows, labels, strict=True)):
    top = gap + index * (cell_h + label_h + gap)
    draw.text((gap, top), label, fill=(0, 0, 0))
    for column, frame in enumerate(row):
      sheet.paste(Image.fromarray(frame), (gap + column * (cell_w + gap), top + label_h))
  return np.asarray(sheet)


def write_png(path: str, image: np.ndarray) -> None:
  with atomic.open_atomic(path, "wb") as f:
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG")


def write_curves(path: str, x: Sequence[float], curves: Mapping[str, Sequence[float | None]], *,
                 xlabel: str, ylabel: str, title: str) -> None:
  """Line plot of each curve (a weight set's values; None = not measured there) against `x`, as PNG."""
  import matplotlib

  matplotlib.use("Agg")  # headless: eval runs on hosts without a display
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for label, values in curves.items():
    if len(values) != len(x):
      raise ValueError(f"curve {label!r} has {len(values)} points for {len(x)} x values")
    points = [(a, b) for a, b in zip(x, values, strict=True) if b is not None]
    if points:
      ax.plot([a for a, _ in points], [b for _, b in points], marker="o", label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with atomic.open_atomic(path, "wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)


def write_loss_plot(path: str, sigmas: Sequence[float], losses: Mapping[str, Sequence[float]],
                    title: str = "validation loss vs sigma") -> None:
  """Line plot of loss against sigma, one line per weight set (raw, ema_0.999, ...), as PNG."""
  write_curves(path, sigmas, losses, xlabel="sigma (noise level)", ylabel="flow-matching MSE", title=title)
