"""`python -m sora_jax.recaption`: dense captions for a captions file, by a vision-language model.

Thin binary: parses flags and calls `sora_jax.offline.recaptioning.recaption`, which owns the work.

  python -m sora_jax.recaption --captions=videos/captions.csv --out=videos/dense.csv \
      --captioner=/models/Qwen2.5-VL-7B-Instruct
  python -m sora_jax.recaption --captions=videos/captions.csv --out=videos/dense.csv \
      --captioner=http://localhost:8000/v1 --captioner_model=Qwen2.5-VL-7B-Instruct --frames=6
"""

from __future__ import annotations

import os

from absl import app, flags

from sora_jax import cli
from sora_jax.files import paths

_CAPTIONS = flags.DEFINE_string(
    "captions", None, "Input CSV (header video,caption) or JSONL, as prepare reads; relative video paths "
    "are relative to this file.")
_OUT = flags.DEFINE_string(
    "out", None, "Output CSV: video, caption (dense), original_caption; prepare reads it unchanged.")
_CAPTIONER = flags.DEFINE_string(
    "captioner", None, "A local Hugging Face vision-language model directory (transformers, the [torch] "
    "extra), or the base URL of an OpenAI-compatible endpoint (http://HOST:PORT/v1; vLLM, SGLang).")
_CAPTIONER_MODEL = flags.DEFINE_string(
    "captioner_model", None, "The served model at a --captioner endpoint (default: its first).")
_FRAMES = flags.DEFINE_integer("frames", 4, "Frames sent per video (an image is sent once).")
_PLACEMENT = flags.DEFINE_enum(
    "frame_placement", "spread", ["spread", "middle"], "spread: the centres of equal parts of the video; "
    "middle: consecutive frames around its middle.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 512, "Frames are downscaled to at most this longer side.")
_INSTRUCTION = flags.DEFINE_string(
    "instruction", None, "The captioning instruction (default: a dense text-to-video caption, "
    "sora_jax.offline.recaptioning.INSTRUCTION).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Longest caption, in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed sent with every request (replies are greedy).")
_RUNNER = flags.DEFINE_enum(
    "runner", "local", ["local", "beam"], "local: this process; beam: an Apache Beam pipeline "
    "(DirectRunner unless --beam_options names another runner), one element per chunk.")
_BEAM_OPTIONS = flags.DEFINE_list("beam_options", [], "Comma-separated Beam pipeline options.")
_CHUNK_ROWS = flags.DEFINE_integer(
    "chunk_rows", 16, "Rows per committed chunk; an interrupted run resumes from whole chunks.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an --out written by another job.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar with videos/s and ETA on stderr.")


def _check_flags() -> None:
  if not _CAPTIONS.value or not _OUT.value or not _CAPTIONER.value:
    raise cli.FlagError("--captions, --out and --captioner are required")
  cli.check_input_file("captions", _CAPTIONS.value, "a CSV (header video,caption) or JSONL file")
  cli.check_model_source("captioner", _CAPTIONER.value, "vision-language model")
  cli.check_served_model("captioner_model", _CAPTIONER_MODEL.value, "captioner", _CAPTIONER.value)
  if _OUT.value.startswith("gs://"):
    reason = paths.bucket_write_problem(os.path.dirname(_OUT.value))
    if reason is not None:
      raise cli.FlagError(f"--out={_OUT.value!r} is not writable ({reason}); expected a path in a bucket "
                          f"this process can create objects in")
  if _OUT.value.endswith("/") or (not _OUT.value.startswith("gs://") and os.path.isdir(_OUT.value)):
    raise cli.FlagError(f"--out={_OUT.value!r} is a directory; expected a CSV file name")
  cli.check_number("frames", _FRAMES.value, "at least 1 frame per video", minimum=1)
  cli.check_number("max_side", _MAX_SIDE.value, "at least 16 pixels", minimum=16)
  cli.check_number("max_new_tokens", _MAX_NEW_TOKENS.value, "at least 1 token", minimum=1)
  cli.check_number("seed", _SEED.value, "a seed >= 0", minimum=0)
  cli.check_number("chunk_rows", _CHUNK_ROWS.value, "at least 1 row per chunk", minimum=1)
  if _BEAM_OPTIONS.value and _RUNNER.value != "beam":
    raise cli.FlagError(f"--beam_options={','.join(_BEAM_OPTIONS.value)} is only read by --runner=beam")
  if _INSTRUCTION.value is not None and not _INSTRUCTION.value.strip():
    raise cli.FlagError("--instruction is empty; expected the captioning instruction")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  _check_flags()
  from sora_jax.offline import recaptioning

  settings = recaptioning.Settings(
      frames=_FRAMES.value, placement=_PLACEMENT.value, max_side=_MAX_SIDE.value,
      instruction=_INSTRUCTION.value or recaptioning.INSTRUCTION, max_new_tokens=_MAX_NEW_TOKENS.value,
      seed=_SEED.value)
  report = recaptioning.recaption(
      _CAPTIONS.value, _OUT.value, captioner=_CAPTIONER.value, captioner_model=_CAPTIONER_MODEL.value,
      settings=settings, runner=_RUNNER.value, beam_options=_BEAM_OPTIONS.value, chunk_rows=_CHUNK_ROWS.value,
      overwrite=_OVERWRITE.value, progress=_PROGRESS.value)
  print(recaptioning.summary_line(report, _OUT.value), flush=True)


def run() -> None:
  cli.run(main, "recaption", quiet_libraries=False)


if __name__ == "__main__":
  run()
