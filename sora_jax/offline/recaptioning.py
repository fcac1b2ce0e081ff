"""Recaptioning: dense captions of training videos by a vision-language model, as a captions file.

Owns frame sampling for the captioner, the caption instruction, the chunked job (local or Apache
Beam; each chunk of rows is committed to a work folder, so an interrupted run resumes) and the output:
a CSV with the input's `video`, the dense `caption` and the input caption as `original_caption`, which
`prepare` reads unchanged, plus a report of the rows skipped and why.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sora_jax.files import atomic, paths
from sora_jax.language import chat
from sora_jax.offline import chunked_job, preparation, video_io

INSTRUCTION = (
    "These are frames of one video clip, in order. Describe the clip in one dense paragraph for training "
    "a text-to-video model: the subjects and their appearance, what moves and how (direction, speed), "
    "the camera and its motion, the background, the lighting and the visual style. Describe only what "
    "is visible. Reply with the description only.")
PLACEMENTS = ("spread", "middle")
REPORT_SUFFIX = ".report.json"
EMPTY_REPLY = "empty_reply"


class RecaptionError(ValueError):
  """A problem with the job as a whole (captions file, output, captioner); bad rows are skipped."""


@dataclasses.dataclass(frozen=True)
class Settings:
  frames: int = 4  # frames sent per video
  placement: str = "spread"  # spread: centres of equal parts of the clip; middle: consecutive, centred
  max_side: int = 512  # frames are downscaled so that their longer side is at most this
  instruction: str = INSTRUCTION
  max_new_tokens: int = 200
  seed: int = 0


def _resize(frame: np.ndarray, max_side: int) -> np.ndarray:
  from PIL import Image

  height, width = frame.shape[:2]
  scale = max_side / max(height, width)
  if scale >= 1:
    return frame
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))


def frame_times(duration_s: float, count: int, placement: str, fps: float) -> list[float]:
  """Seconds into the clip of the `count` frames to send."""
  if placement == "spread":
    return [(i + 0.5) * duration_s / count for i in range(count)]
  middle = duration_s / 2
  return [max(0.0, middle + (i - (count - 1) / 2) / fps) for i in range(count)]


def sample_frames(path: str, settings: Settings) -> list[np.ndarray]:
  """uint8 frames [H, W, 3] of a video (settings.frames of them, placed by settings.placement) or an image."""
  if not os.path.exists(path):
    raise video_io.MediaError(video_io.MISSING, f"{path} does not exist")
  if video_io.is_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
      with Image.open(path) as image:
        return [_resize(np.asarray(image.convert("RGB")), settings.max_side)]
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise video_io.MediaError(video_io.UNREADABLE, f"{path} is not a readable image: {e}") from None
  import av

  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise video_io.MediaError(video_io.UNREADABLE, f"{path} cannot be opened as a video: {e}") from None
  with container:
    if not container.streams.video:
      raise video_io.MediaError(video_io.NOT_VIDEO, f"{path} has no video stream")
    stream = container.streams.video[0]
    fps = float(stream.average_rate) if stream.average_rate else 25.0
    if stream.duration is not None and stream.time_base is not None:
      duration_s = float(stream.duration * stream.time_base)
    else:
      duration_s = (container.duration or 0) / 1e6
    targets = frame_times(duration_s, settings.frames, settings.placement, fps)
    frames: list[np.ndarray] = []
    last = None
    try:
      for frame in container.decode(stream):
        last = frame
        while len(frames) < len(targets) and (frame.time or 0.0) + 0.5 / fps >= targets[len(frames)]:
          frames.append(_resize(frame.to_ndarray(format="rgb24"), settings.max_side))
        if len(frames) == len(targets):
          break
    except (av.error.FFmpegError, ValueError) as e:
      raise video_io.MediaError(video_io.UNREADABLE, f"{path}: decoding failed: {e}") from None
    if last is None:
      raise video_io.MediaError(video_io.TOO_SHORT, f"{path} has no decodable frames")
    while len(frames) < len(targets):  # a duration longer than the frames: repeat the last one
      frames.append(_resize(last.to_ndarray(format="rgb24"), settings.max_side))
  return frames


def caption_row(row: preparation.Row, settings: Settings,
                captioner: chat.ChatModel) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
  """(output row, None) or (None, skip) for one input row; a captioner that does not answer raises."""
  try:
    if not row.video:
      raise video_io.MediaError(video_io.MISSING, "the video path is empty")
    with video_io.local_copy(row.path) as local:
      frames = sample_frames(local, settings)
  except video_io.MediaError as e:
    return None, {"row": row.index, "video": row.video, "reason": e.reason, "detail": str(e)}
  except Exception as e:  # noqa: BLE001 - one odd file must never end a long job
    return None, {"row": row.index, "video": row.video, "reason": video_io.UNREADABLE,
                  "detail": f"{type(e).__name__}: {e}"}
  content = [{"type": "image", "image": frame} for frame in frames]
  content.append({"type": "text", "text": settings.instruction})
  reply = captioner.complete([{"role": "user", "content": content}], seed=settings.seed,
                             max_new_tokens=settings.max_new_tokens)
  caption = " ".join(reply.split())
  if not caption:
    return None, {"row": row.index, "video": row.video, "reason": EMPTY_REPLY,
                  "detail": f"{captioner.name} returned an empty caption"}
  return {"row": row.index, "video": row.video, "path": row.path, "caption": caption,
          "original_caption": row.caption}, None


# ------------------------------------------------------------------------------ the chunked job


def fingerprint(captions_path: str, captioner: str, captioner_model: str | None, settings: Settings,
                chunk_rows: int) -> str:
  """sha256 of what the committed chunks depend on (a resume with other chunks starts over)."""
  digest = hashlib.sha256(paths.read_bytes(captions_path))
  digest.update(json.dumps({"captioner": captioner, "model": captioner_model, "chunk_rows": chunk_rows,
                            "settings": dataclasses.asdict(settings)}, sort_keys=True).encode())
  return digest.hexdigest()


def _chunk_path(work: str, chunk: int) -> str:
  return os.path.join(work, f"chunk_{chunk:06d}.json")


class _CommitChunk:
  """Captions one chunk of rows and commits its file (chunked_job.ChunkCommit).

  Opens the captioning model on first use, so each Beam worker opens its own.
  """

  def __init__(self, work: str, captioner: str, captioner_model: str | None, settings: Settings):
    self.work, self.settings = work, settings
    self.captioner, self.captioner_model = captioner, captioner_model
    self.model = None

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "model": None}  # each Beam worker opens its own

  def __call__(self, chunk: int, rows: Sequence[preparation.Row], mapped: Sequence[Any]) -> int:
    if self.model is None:
      self.model = chat.open_chat_model(self.captioner, self.captioner_model, flag="--captioner", vision=True)
    captioned, skipped = [], []
    for row in rows:
      result, skip = caption_row(row, self.settings, self.model)
      if result:
        captioned.append(result)
      else:
        skipped.append(skip)
    atomic.write_json(_chunk_path(self.work, chunk), {"captioned": captioned, "skipped": skipped},
                      indent=None)
    return len(rows)


def recaption(captions_path: str, out_path: str, *, captioner: str, captioner_model: str | None = None,
              settings: Settings = Settings(), runner: str = "local", beam_options: Sequence[str] = (),
              chunk_rows: int = 16, overwrite: bool = False, progress: bool = True,
              max_chunks: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes the recaptioned CSV `out_path` and its report; returns the report.

  Re-running the same job resumes from its committed chunks; a finished job is not redone.
  `max_chunks` stops after that many chunks, as an interruption would (tests resumption).
  """
  if settings.placement not in PLACEMENTS:
    raise RecaptionError(f"frame placement {settings.placement!r}; expected one of {PLACEMENTS}")
  if runner not in chunked_job.RUNNERS:
    raise RecaptionError(f"runner={runner!r}; expected one of {chunked_job.RUNNERS}")
  try:
    rows = preparation.read_captions(captions_path)
  except preparation.PrepareError as error:
    raise RecaptionError(str(error)) from None
  job = fingerprint(captions_path, captioner, captioner_model, settings, chunk_rows)
  report_path = out_path + REPORT_SUFFIX
  if paths.is_file(out_path) and paths.is_file(report_path):
    report = json.loads(paths.read_text(report_path))
    if report.get("fingerprint") == job:
      log(f"recaption: {out_path} already holds this job's captions; nothing to do")
      return report
  if paths.is_file(out_path) and not overwrite:
    raise RecaptionError(f"--out={out_path!r} exists and was written by another job (or not by recaption); "
                         f"pass --overwrite to replace it, or choose another --out")
  work = f"{out_path}.work/{job[:16]}"  # beside --out (in the bucket for gs://), so any machine resumes
  if not paths.is_remote(work):
    os.makedirs(work, exist_ok=True)
  try:
    chunks = chunked_job.split_rows(rows, chunk_rows)
    start = time.time()
    chunked_job.run(chunked_job.Job("recaption", functools.partial(_chunk_path, work), unit="video"), chunks,
                    _CommitChunk(work, captioner, captioner_model, settings), runner=runner,
                    beam_options=beam_options, progress=progress, max_chunks=max_chunks, log=log)
  except chunked_job.JobError as error:
    raise RecaptionError(str(error)) from None
  return _assemble(captions_path, out_path, work, sorted(chunks), job, time.time() - start, len(rows))


def _assemble(captions_path: str, out_path: str, work: str, chunks: list[int], job: str, seconds: float,
              num_rows: int) -> dict[str, Any]:
  captioned, skipped = [], []
  for chunk in chunks:
    payload = json.loads(paths.read_text(_chunk_path(work, chunk)))
    captioned.extend(payload["captioned"])
    skipped.extend(payload["skipped"])
  # Relative video paths stay valid only next to the input captions file.
  same_folder = os.path.dirname(paths.shown(out_path)) == os.path.dirname(paths.shown(captions_path))
  table = io.StringIO(newline="")
  writer = csv.writer(table)
  writer.writerow(["video", "caption", "original_caption"])
  for item in captioned:
    writer.writerow([item["video"] if same_folder else paths.shown(item["path"]), item["caption"],
                     item["original_caption"]])
  atomic.write_text(out_path, table.getvalue())
  reasons: dict[str, int] = {}
  for skip in skipped:
    reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
  report = {"fingerprint": job, "rows": num_rows, "captioned": len(captioned), "skipped": len(skipped),
            "skipped_by_reason": reasons, "skipped_rows": skipped, "seconds": round(seconds, 1)}
  atomic.write_json(out_path + REPORT_SUFFIX, report)
  paths.remove_tree(f"{out_path}.work")
  return report


def summary_line(report: dict[str, Any], out_path: str) -> str:
  reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report["skipped_by_reason"].items()))
  return (f"recaption: {report['captioned']} of {report['rows']} videos captioned into {out_path}"
          + (f"; skipped {report['skipped']} ({reasons}), listed in {out_path}{REPORT_SUFFIX}"
             if report["skipped"] else ""))
