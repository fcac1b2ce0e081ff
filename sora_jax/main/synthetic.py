"""`python -m sora_jax.data.synthetic`: writes the synthetic demo videos, captions.csv and attributes.json.

  python -m sora_jax.data.synthetic --out=DIR --num_videos=N [--frames=16 --size=32 --fps=8]

The renderer, vocabularies and writer are sora_jax.offline.synthetic; this module owns the flags.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from absl import app, flags

from sora_jax import cli
from sora_jax.offline import synthetic

_OUT = flags.DEFINE_string(
    "out", None, "Directory for videos/, captions.csv and attributes.json.", required=True)
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 1000, "Number of videos to write.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the attributes; video i depends only on (seed, i).")
_FRAMES = flags.DEFINE_integer("frames", 16, "Frames per video (16 at 8 fps = 2 s, two 8-frame clips).")
_SIZE = flags.DEFINE_integer("size", 32, "Height and width of the square videos in pixels (even).")
_FPS = flags.DEFINE_integer("fps", 8, "Frame rate of the written videos.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Writer processes; 0 = all local cores.")


def _check_flags() -> None:
  """Every flag's value, before the output folder is created."""
  if not _OUT.value:
    raise cli.FlagError("--out is required: the directory for videos/, captions.csv and attributes.json")
  cli.check_output_directory("out", _OUT.value, "a directory for videos/, captions.csv and attributes.json")
  cli.check_number("num_videos", _NUM_VIDEOS.value, "at least 1 video", minimum=1)
  cli.check_number("frames", _FRAMES.value, "at least 2 frames per video", minimum=2)
  if _SIZE.value < 16 or _SIZE.value % 2:
    raise cli.FlagError(f"--size={_SIZE.value}; expected an even size of at least 16 pixels")
  cli.check_number("fps", _FPS.value, "at least 1 frame per second", minimum=1)
  cli.check_number("seed", _SEED.value, "a seed >= 0", minimum=0)
  cli.check_number("workers", _WORKERS.value, "a number of writer processes >= 1, or 0 for all cores",
                   minimum=0)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  _check_flags()
  start = time.time()
  rows = synthetic.generate(_OUT.value, _NUM_VIDEOS.value, seed=_SEED.value, frames=_FRAMES.value,
                            size=_SIZE.value, fps=_FPS.value, workers=_WORKERS.value)
  seconds = time.time() - start
  print(f"wrote {len(rows)} videos ({_FRAMES.value} frames of {_SIZE.value}x{_SIZE.value} at "
        f"{_FPS.value} fps) and captions.csv to {_OUT.value} in {seconds:.1f} s "
        f"({len(rows) / seconds:.0f} videos/s)")


def run() -> None:
  """Console-script entry point (`sora-synthetic`)."""
  cli.run(main, "data.synthetic", quiet_libraries=False, cpu_without_accelerator=False)


if __name__ == "__main__":
  run()
