"""Synthetic demo data: H.264 videos of coloured shapes moving over plain backgrounds, with captions.

Owns the attribute vocabularies (COLORS, SHAPES, DIRECTIONS, SPEEDS, BACKGROUNDS), the renderer,
the writer of `videos/*.mp4` + `captions.csv` + `attributes.json`, a detector that reads the
attributes back from decoded frames (for scoring prompt adherence). Reads no flags: the binary
`python -m sora_jax.data.synthetic --out=DIR --num_videos=N` is sora_jax.main.synthetic.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sora_jax.files import atomic

# Saturated, far-apart colours: each stays closest to its own entry after 4:2:0 H.264 at 32x32.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 70, 240),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "gray": (120, 120, 120),
    "blue": (20, 30, 120),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit motion per direction as (dx, dy) in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Fraction of the free travel room (frame size minus shape size) crossed over a whole video.
SPEEDS: dict[str, float] = {"slowly": 0.5, "quickly": 1.0}

SHAPE_FRACTION = 0.34  # shape extent as a fraction of the frame size
CAPTION_SPEED_PROB = 0.5  # how often the caption states the speed (prompts may leave it out)


def caption_for(color: str, shape: str, direction: str, background: str, speed: str | None = None) -> str:
  """The caption of one video, e.g. 'a red circle moves left on a blue background'."""
  motion = f"moves {direction} {speed}" if speed else f"moves {direction}"
  return f"a {color} {shape} {motion} on a {background} background"


def valid_pairs() -> list[tuple[str, str]]:
  """(shape colour, background) pairs that are not the same colour name."""
  return [(c, b) for c in COLORS for b in BACKGROUNDS if c != b]


def sample_attributes(rng: np.random.Generator, size: int, frames: int) -> dict[str, Any]:
  """Draws one video's attributes, start position and per-frame velocity (pixels)."""
  pairs = valid_pairs()
  color, background = pairs[rng.integers(len(pairs))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
  speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
  extent = max(4.0, SHAPE_FRACTION * size)
  room = size - extent
  travel = SPEEDS[speed] * room
  step = travel / max(frames - 1, 1)
  dx, dy = DIRECTIONS[direction]
  # Start on the trailing side so the whole path stays inside the frame.
  along_start = extent / 2 + rng.uniform(0, room - travel) + (travel if (dx < 0 or dy < 0) else 0.0)
  across = extent / 2 + rng.uniform(0, room)
  center = (along_start, across) if dx else (across, along_start)
  with_speed = bool(rng.random() < CAPTION_SPEED_PROB)
  return {
      "color": color, "shape": shape, "direction": direction, "speed": speed,
      "background": background,
      "caption": caption_for(color, shape, direction, background, speed if with_speed else None),
      "color_rgb": list(COLORS[color]), "background_rgb": list(BACKGROUNDS[background]),
      "start_xy": [float(center[0]), float(center[1])],
      "velocity_xy_per_frame": [float(dx * step), float(dy * step)],
      "extent": float(extent),
  }


def render(attributes: Mapping[str, Any], size: int, frames: int) -> np.ndarray:
  """The frames [F, size, size, 3] uint8 of one video (4x supersampled, so edges are anti-aliased)."""
  scale = 4
  grid = (np.arange(size * scale) + 0.5) / scale
  xs, ys = np.meshgrid(grid, grid)
  color = np.asarray(attributes["color_rgb"], np.float32)
  background = np.asarray(attributes["background_rgb"], np.float32)
  half = attributes["extent"] / 2
  video = np.empty((frames, size, size, 3), np.uint8)
  for index in range(frames):
    cx = attributes["start_xy"][0] + index * attributes["velocity_xy_per_frame"][0]
    cy = attributes["start_xy"][1] + index * attributes["velocity_xy_per_frame"][1]
    u, v = xs - cx, ys - cy
    if attributes["shape"] == "circle":
      inside = u * u + v * v <= half * half
    elif attributes["shape"] == "square":
      inside = (np.abs(u) <= half * 0.9) & (np.abs(v) <= half * 0.9)
    else:  # triangle pointing up: apex at top, base at bottom
      inside = (v <= half) & (v >= -half) & (np.abs(u) <= (v + half) / 2)
    coverage = inside.reshape(size, scale, size, scale).mean(axis=(1, 3))[..., None]
    video[index] = np.round(coverage * color + (1 - coverage) * background).astype(np.uint8)
  return video


def write_mp4(path: str, frames: np.ndarray, fps: int, crf: int = 12) -> None:
  """Writes uint8 frames [F, H, W, 3] as H.264 (yuv420p) mp4 with PyAV."""
  import av  # deferred: only writers and readers of video need it

  with atomic.staged_path(path, suffix=".mp4") as staged, av.open(staged, mode="w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf), "preset": "veryfast"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _write_one(job: tuple[int, str, int, int, int, int]) -> dict[str, Any]:
  index, out_dir, seed, frames, size, fps = job
  rng = np.random.default_rng([seed, index])
  attributes = sample_attributes(rng, size, frames)
  relative = os.path.join("videos", f"{index:06d}.mp4")
  write_mp4(os.path.join(out_dir, relative), render(attributes, size, frames), fps)
  return {"video": relative, **attributes}


def generate(out_dir: str, num_videos: int, *, seed: int = 0, frames: int = 16, size: int = 32,
             fps: int = 8, workers: int = 0) -> list[dict[str, Any]]:
  """Writes `out_dir/videos/*.mp4`, `captions.csv` (video,caption) and `attributes.json`.

  Video i depends only on (seed, i), so any worker count gives the same files.
  """
  if num_videos < 1 or frames < 2 or size < 16 or size % 2 or fps < 1 or seed < 0 or workers < 0:
    raise ValueError(
        f"num_videos={num_videos}, frames={frames}, size={size}, fps={fps}, seed={seed}, workers={workers}: "
        f"expected num_videos >= 1, frames >= 2, an even size >= 16, fps >= 1, seed >= 0 and workers >= 0")
  os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
  jobs = [(i, out_dir, seed, frames, size, fps) for i in range(num_videos)]
  workers = workers or os.cpu_count() or 1
  if workers > 1 and num_videos >= 16:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      rows = pool.map(_write_one, jobs, chunksize=16)
  else:
    rows = [_write_one(job) for job in jobs]
  with atomic.open_atomic(os.path.join(out_dir, "captions.csv"), newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "caption"])
    writer.writerows((row["video"], row["caption"]) for row in rows)
  atomic.write_json(os.path.join(out_dir, "attributes.json"),
                    {"fps": fps, "frames": frames, "size": size, "seed": seed, "videos": rows}, indent=1)
  return rows


def _nearest(rgb: np.ndarray, palette: Mapping[str, Sequence[int]], exclude: str | None = None) -> str:
  names = [name for name in palette if name != exclude]
  distances = [np.sum((rgb - np.asarray(palette[name], np.float32)) ** 2) for name in names]
  return names[int(np.argmin(distances))]


def detect_attributes(frames: np.ndarray) -> dict[str, Any]:
  """Reads (color, shape, direction, background) back from frames [F, H, W, 3] (uint8 or [-1, 1]).

  Background: nearest BACKGROUNDS entry to the median border pixel. Shape: pixels far from it; its
  colour is the nearest COLORS entry to the mean of its core (the half of those pixels farthest from
  the background), so soft edges blended with the background do not pull a dim white towards blue or
  a yellow on black towards green; a triangle has only ~1/4 of its pixels in the
  top half of its bounding box, a square fills its box (circle ~0.79); its direction is the
  centroid's largest displacement.
  Returns None values for what cannot be seen (e.g. no shape pixels).
  """
  video = np.asarray(frames, np.float32)
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"frames have shape {video.shape}; expected [F, H, W, 3]")
  if video.min() < 0:
    video = (video + 1.0) * 127.5
  border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
  background_rgb = np.median(border.reshape(-1, 3), axis=0)
  background = _nearest(background_rgb, BACKGROUNDS)
  distance = np.sqrt(np.sum((video - np.asarray(BACKGROUNDS[background], np.float32)) ** 2, axis=-1))
  mask = distance > 60.0  # [F, H, W]
  result: dict[str, Any] = {"background": background, "color": None, "shape": None, "direction": None}
  if mask.sum() < 4:
    return result
  core = mask & (distance >= np.median(distance[mask]))
  result["color"] = _nearest(video[core].mean(axis=0), COLORS, exclude=background)
  fills, top_shares, centroids = [], [], []
  for frame_mask in mask:
    ys, xs = np.nonzero(frame_mask)
    if len(xs) < 4:
      continue
    centroids.append((xs.mean(), ys.mean()))
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fills.append(len(xs) / box)
    top_shares.append(np.mean(ys < (ys.min() + ys.max()) / 2))
  if fills:
    # An upward triangle keeps about a quarter of its pixels in the top half of its box.
    if np.median(top_shares) < 0.38:
      result["shape"] = "triangle"
    else:
      result["shape"] = "square" if np.median(fills) > 0.88 else "circle"
  if len(centroids) >= 2:
    dx = centroids[-1][0] - centroids[0][0]
    dy = centroids[-1][1] - centroids[0][1]
    if max(abs(dx), abs(dy)) >= 1.0:
      result["direction"] = (("right" if dx > 0 else "left") if abs(dx) >= abs(dy)
                             else ("down" if dy > 0 else "up"))
  return result
