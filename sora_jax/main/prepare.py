"""`python -m sora_jax.prepare`: videos/images + captions -> a latent clip dataset (TFDS ArrayRecord).

Thin binary: parses flags and calls `sora_jax.offline.preparation.prepare`, which owns the work.

  python -m sora_jax.prepare --captions=videos/captions.csv --out=/tmp/dataset --config=configs/tiny.py
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sora_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py); override fields with --config.data.fps=... etc.")
_CAPTIONS = flags.DEFINE_string(
    "captions", None, "CSV (header video,caption) or JSONL ({video, caption}) file; relative video paths "
    "are relative to this file.")
_OUT = flags.DEFINE_string(
    "out", None, "Dataset directory to write (sora_clips/1.0.0/ shards, prepare_report.json).")
_RUNNER = flags.DEFINE_enum(
    "runner", "local", ["local", "beam"], "local: a process pool on this machine (data.prepare_workers); "
    "beam: an Apache Beam pipeline (DirectRunner unless --beam_options names another runner).")
_BEAM_OPTIONS = flags.DEFINE_list(
    "beam_options", [], "Comma-separated Beam pipeline options, e.g. --runner=DirectRunner,"
    "--direct_num_workers=2.")
_CHUNK_ROWS = flags.DEFINE_integer(
    "chunk_rows", 128, "Input rows per committed chunk; an interrupted run resumes from whole chunks.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a complete dataset in --out made from other inputs (kept until the new "
    "one is complete).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar with clips/s and ETA on stderr.")


def _check_flags() -> None:
  """Every flag's value, before any caption, video or dataset is read or written (`--out` itself is
  checked first thing in preparation.prepare: a file, or a folder that holds no dataset, is refused)."""
  if _CONFIG.value is None or not _CAPTIONS.value or not _OUT.value:
    raise cli.FlagError("--config, --captions and --out are required")
  cli.check_input_file("captions", _CAPTIONS.value, "a CSV (header video,caption) or JSONL file")
  cli.check_number("chunk_rows", _CHUNK_ROWS.value, "at least 1 input row per chunk", minimum=1)
  if _BEAM_OPTIONS.value and _RUNNER.value != "beam":
    raise cli.FlagError(f"--beam_options={','.join(_BEAM_OPTIONS.value)} is only read by --runner=beam; "
                        f"expected --runner=beam or no --beam_options")
  for option in _BEAM_OPTIONS.value:
    if not option.startswith("--"):
      raise cli.FlagError(f"--beam_options: {option!r} is not a pipeline option; expected --NAME=VALUE "
                          f"entries, e.g. --runner=DirectRunner,--direct_num_workers=2")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  _check_flags()
  from sora_jax import config as config_lib
  from sora_jax.offline import preparation

  config = _CONFIG.value
  config_lib.validate(config)
  report = preparation.prepare(
      _CAPTIONS.value, _OUT.value, config, runner=_RUNNER.value, beam_options=_BEAM_OPTIONS.value,
      chunk_rows=_CHUNK_ROWS.value, overwrite=_OVERWRITE.value, progress=_PROGRESS.value)
  print(preparation.summary_line(report), flush=True)


def run() -> None:
  cli.run(main, "prepare", quiet_libraries=False)


if __name__ == "__main__":
  run()
