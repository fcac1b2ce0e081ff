"""Reading videos and images into fixed-size RGB clips for prepare (PyAV decode, PIL for images).

Owns bucket choice by aspect ratio, resize-to-cover + centre crop, resampling a video to a fixed
fps (the frame on screen at each sample time), cutting it into clips every `clip_stride_s` seconds,
and `MediaError`, whose `reason` names the skip category prepare reports.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from sora_jax.files import paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Skip reasons prepare counts and lists in prepare_report.json.
MISSING, UNREADABLE, NOT_VIDEO, TOO_SHORT, EMPTY_CAPTION = (
    "missing", "unreadable", "not_video", "too_short", "empty_caption")


class MediaError(ValueError):
  """A video or image that yields no clip; `reason` is one of the skip categories above."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def is_image(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def pick_bucket(height: int, width: int, buckets: Sequence[Sequence[int]],
                max_frames: int | None = None) -> tuple[int, int, int]:
  """The (frames, height, width) bucket nearest in log aspect ratio; ties go to more frames.

  Buckets with more frames than `max_frames` (when known) are passed over; if none is left, the
  shortest bucket is returned and the caller finds the video too short.
  """
  if not buckets:
    raise ValueError(
        f"no buckets to fit a {width}x{height} input into; expected at least one (frames, height, width) "
        f"in data.buckets / data.image_buckets")
  candidates = [tuple(b) for b in buckets if max_frames is None or b[0] <= max_frames]
  if not candidates:
    return min((tuple(b) for b in buckets), key=lambda b: b[0])
  aspect = math.log(width / height)
  return min(candidates, key=lambda b: (round(abs(aspect - math.log(b[2] / b[1])), 6), -b[0], -b[1] * b[2]))


def cover_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
  """(height, width) after scaling to cover the target while keeping the aspect ratio."""
  scale = max(target_height / height, target_width / width)
  return max(target_height, round(height * scale)), max(target_width, round(width * scale))


def center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
  top = (frame.shape[0] - height) // 2
  left = (frame.shape[1] - width) // 2
  return frame[top:top + height, left:left + width]


def read_image(path: str, image_buckets: Sequence[Sequence[int]]) -> tuple[np.ndarray, tuple[int, int, int]]:
  """An image as a 1-frame clip [1, H, W, 3] uint8 in its nearest image bucket."""
  from PIL import Image, UnidentifiedImageError

  if not os.path.exists(path):
    raise MediaError(MISSING, f"{path} does not exist")
  try:
    with Image.open(path) as image:
      rgb = image.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise MediaError(UNREADABLE, f"{path} is not a readable image: {e}") from None
  bucket = pick_bucket(rgb.height, rgb.width, image_buckets)
  height, width = cover_size(rgb.height, rgb.width, bucket[1], bucket[2])
  resized = np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=2.0))
  return center_crop(resized, bucket[1], bucket[2])[None], bucket


def read_video_clips(path: str, *, fps: float, buckets: Sequence[Sequence[int]],
                     clip_stride_s: float) -> Iterator[tuple[float, np.ndarray, tuple[int, int, int]]]:
  """Yields (clip start in seconds, frames [F, H, W, 3] uint8, bucket) for each clip of a video.

  The video is resampled to `fps` (each sample is the frame on screen at k/fps) and cut into clips
  of the bucket's frame count starting every `clip_stride_s` seconds; frames are decoded once and
  only a clip's worth is kept in memory. Raises MediaError if no clip comes out.
  """
  import av

  if not os.path.exists(path):
    raise MediaError(MISSING, f"{path} does not exist")
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise MediaError(UNREADABLE, f"{path} cannot be opened as a video: {e}") from None
  with container:
    if not container.streams.video:
      raise MediaError(NOT_VIDEO, f"{path} has no video stream")
    stream = container.streams.video[0]
    source_height, source_width = stream.codec_context.height, stream.codec_context.width
    if not source_height or not source_width:
      raise MediaError(UNREADABLE, f"{path} has a video stream without a frame size")
    duration_s = None
    if stream.duration is not None and stream.time_base is not None:
      duration_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
      duration_s = container.duration / 1e6
    max_frames = None if duration_s is None else int(math.floor(duration_s * fps + 1e-6))
    bucket = pick_bucket(source_height, source_width, buckets, max_frames)
    frames_per_clip, height, width = bucket
    scaled_height, scaled_width = cover_size(source_height, source_width, height, width)
    stride = max(1, round(clip_stride_s * fps))

    def convert(frame) -> np.ndarray:
      array = frame.to_ndarray(width=scaled_width, height=scaled_height, format="rgb24",
                               interpolation="AREA")
      return center_crop(array, height, width)

    samples: list[np.ndarray] = []  # resampled frames from sample index `next_clip_start` on
    next_clip_start = 0
    clips = 0
    sample_index = 0
    previous, previous_array, last_time = None, None, 0.0
    frame_period = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps

    def take(array: np.ndarray) -> Iterator[tuple[float, np.ndarray, tuple[int, int, int]]]:
      nonlocal next_clip_start, clips, sample_index
      index = sample_index
      sample_index += 1
      if index < next_clip_start:  # between clips when the stride is longer than a clip
        return
      samples.append(array)
      if len(samples) == frames_per_clip:
        yield next_clip_start / fps, np.stack(samples), bucket
        clips += 1
        next_clip_start += stride
        del samples[:stride]

    try:
      for frame in container.decode(stream):
        time_s = frame.time if frame.time is not None else last_time + frame_period
        last_time = time_s
        # Every sample time before this frame shows the previous frame (or this one, at the start).
        while sample_index / fps < time_s - 1e-6:
          if previous is None:
            previous, previous_array = frame, convert(frame)
          if previous_array is None:
            previous_array = convert(previous)
          yield from take(previous_array)
        previous, previous_array = frame, None
      if previous is not None:
        end = last_time + frame_period
        while sample_index / fps < end - 1e-6:
          if previous_array is None:
            previous_array = convert(previous)
          yield from take(previous_array)
    except (av.error.FFmpegError, OSError, ValueError) as e:
      if clips == 0:
        raise MediaError(UNREADABLE, f"{path} fails to decode: {e}") from None
      return  # a damaged tail: keep the clips decoded before it
    if clips == 0:
      seconds = sample_index / fps
      raise MediaError(
          TOO_SHORT, f"{path} gives {sample_index} frames at {fps:g} fps ({seconds:.2f} s), fewer than "
                     f"the {frames_per_clip} frames of bucket {bucket}")


def read_frames(path: str, height: int, width: int, max_frames: int | None = None,
                fps: float | None = None) -> np.ndarray:
  """An image ([1, H, W, 3]) or a video's frames ([F, H, W, 3]) as uint8 RGB, resized to cover
  `height` x `width` and centre-cropped to it: the frames a sample starts from.

  `fps` resamples the video to that rate (the frame on screen at each k/fps, as prepare does), else
  every decoded frame is kept; `max_frames` keeps only the last ones (memory stays bounded).
  """
  from collections import deque

  from PIL import Image, UnidentifiedImageError

  if not os.path.exists(path):
    raise MediaError(MISSING, f"{path} does not exist")
  if is_image(path):
    try:
      with Image.open(path) as image:
        rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise MediaError(UNREADABLE, f"{path} is not a readable image: {e}") from None
    scaled_height, scaled_width = cover_size(rgb.height, rgb.width, height, width)
    resized = np.asarray(rgb.resize((scaled_width, scaled_height), Image.Resampling.BICUBIC))
    return center_crop(resized, height, width)[None]
  import av

  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise MediaError(UNREADABLE, f"{path} cannot be opened as a video or image: {e}") from None
  frames: deque[np.ndarray] = deque(maxlen=max_frames)
  with container:
    if not container.streams.video:
      raise MediaError(NOT_VIDEO, f"{path} has no video stream")
    stream = container.streams.video[0]
    scaled_height, scaled_width = cover_size(stream.codec_context.height, stream.codec_context.width,
                                             height, width)
    period = 1.0 / float(stream.average_rate) if stream.average_rate else None
    convert = lambda frame: center_crop(frame.to_ndarray(
        width=scaled_width, height=scaled_height, format="rgb24", interpolation="AREA"), height, width)
    samples = 0  # resampled frames emitted so far (sample k is at k / fps)
    previous, previous_time = None, 0.0
    try:
      for frame in container.decode(stream):
        if fps is None:
          frames.append(convert(frame))
          continue
        time_s = float(frame.time) if frame.time is not None else previous_time + (period or 1 / fps)
        if previous is not None:  # `previous` was on screen during [previous_time, time_s)
          while samples / fps < time_s:
            frames.append(previous)
            samples += 1
        previous, previous_time = convert(frame), time_s
    except (av.error.FFmpegError, ValueError) as e:
      raise MediaError(UNREADABLE, f"{path}: decoding failed after {len(frames)} frames: {e}") from None
    if previous is not None:
      end = previous_time + (period or 1 / fps)
      while samples / fps < end or samples == 0:
        frames.append(previous)
        samples += 1
  if not frames:
    raise MediaError(TOO_SHORT, f"{path} has no decodable frames")
  return np.stack(frames)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path holding the media file `path`: `path` itself on local disk; for a bucket path a
  temporary copy (same extension, deleted after the block). A bucket path that does not exist is
  given back as it is, for the readers to report as missing."""
  if not paths.is_remote(path) or not paths.is_file(path):
    yield path
    return
  handle, local = tempfile.mkstemp(prefix="sora_jax_media_", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(handle, "wb") as target, paths.resolve(path).open("rb") as source:
      shutil.copyfileobj(source, target, length=8 << 20)
    yield local
  finally:
    os.remove(local)
