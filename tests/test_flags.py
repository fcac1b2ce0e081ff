"""Every binary checks its flags before touching a checkpoint, dataset or device: one line, nothing written.

One table of (binary, bad flags, flag named): each row runs `python -m sora_jax.<binary>` in a temp
folder holding a file, an empty run, a captions file and an empty folder, and expects exit 1, exactly
one `sora_jax.<binary>: error: ... --<flag> ...` line on stderr and the folder unchanged.
"""

import os

import pytest
from test_cli import REPO, _binary

TINY = f"--config={REPO}/configs/tiny.py"
RUN = ("--workdir=run", "--prompt=a red circle")  # sample: a run dir whose checkpoints are never reached
TOPOLOGY = (TINY, "--topology=v5e-4")

CASES = [
    # binary, bad flags, the flag the error line names
    ("train", (TINY,), "workdir"),
    ("train", (TINY, "--workdir="), "workdir"),
    ("train", (TINY, "--workdir=afile"), "workdir"),
    ("train", (TINY, "--workdir=s3://bucket/run"), "workdir"),  # gs:// is a bucket workdir; others are not
    ("train", (TINY, "--workdir=w", "--num_processes=0"), "num_processes"),
    ("train", (TINY, "--workdir=w", "--num_processes=2", "--process_id=2"), "process_id"),
    ("train", (TINY, "--workdir=w", "--process_id=-1"), "process_id"),
    ("train", (TINY, "--workdir=w", "--coordinator_address=nohost"), "coordinator_address"),
    ("train", (TINY, "--workdir=w", "--coordinator_address=host:99999"), "coordinator_address"),
    ("train", (TINY, "--workdir=w", "--profile_steps=5:2"), "profile_steps"),
    ("train", (TINY, "--workdir=w", "--profile_steps=-1:2"), "profile_steps"),
    ("train", (TINY, "--workdir=w", "--profile_steps=1:2:3"), "profile_steps"),
    # The supervisor of a distributed run would create w/logs/ first.
    ("train", (TINY, "--workdir=w", "--distributed=on", "--profile_steps=abc"), "profile_steps"),
    ("eval", (), "workdir"),
    ("eval", ("--workdir=missing",), "workdir"),
    ("eval", ("--workdir=afile",), "workdir"),
    ("eval", ("--workdir=run", "--step=-1"), "step"),
    ("eval", ("--workdir=missing", "--step=-1"), "step"),
    ("eval", ("--workdir=run", "--all", "--watch"), "all"),
    ("recaption", ("--captions=captions.csv", "--out=o.csv"), "captioner"),
    ("recaption", ("--captions=missing.csv", "--out=o.csv", "--captioner=run"), "captions"),
    ("recaption", ("--captions=captions.csv", "--out=o.csv", "--captioner=missing"), "captioner"),
    ("recaption", ("--captions=captions.csv", "--out=run", "--captioner=run"), "out"),
    ("recaption", ("--captions=captions.csv", "--out=o.csv", "--captioner=run", "--frames=0"), "frames"),
    ("recaption", ("--captions=captions.csv", "--out=o.csv", "--captioner=run", "--captioner_model=m"),
     "captioner_model"),
    ("recaption", ("--captions=captions.csv", "--out=o.csv", "--captioner=run", "--beam_options=--x=1"),
     "beam_options"),
    ("sample", (*RUN, "--extend_prompt=missing"), "extend_prompt"),
    ("sample", (*RUN, "--extend_prompt="), "extend_prompt"),
    ("sample", (*RUN, "--extend_prompt_model=m"), "extend_prompt_model"),
    ("eval", ("--workdir=run", "--extend_prompt=missing"), "extend_prompt"),
    ("eval", ("--workdir=run", "--extend_prompt=run", "--extend_prompt_model=m"), "extend_prompt_model"),
    ("sample", (*RUN, "--image=missing.png"), "image"),
    ("sample", (*RUN, "--image=afile", "--video=afile", "--extend_frames=4"), "image"),
    ("sample", (*RUN, "--video=afile"), "video"),
    ("sample", (*RUN, "--extend_frames=4"), "extend_frames"),
    ("sample", (*RUN, "--video=afile", "--extend_frames=0"), "extend_frames"),
    ("sample", (*RUN, "--video=afile", "--extend_frames=8", "--num_frames=8"), "extend_frames"),
    ("sample", ("--prompt=x",), "workdir"),
    ("sample", ("--workdir=run", "--pretrained=run", "--prompt=x"), "workdir"),
    ("sample", ("--workdir=missing", "--prompt=x"), "workdir"),
    ("sample", ("--workdir=afile", "--prompt=x"), "workdir"),
    ("sample", ("--pretrained=missing", "--prompt=x"), "pretrained"),
    ("sample", ("--workdir=run", "--prompt= "), "prompt"),
    ("sample", (*RUN, "--step=-1"), "step"),
    ("sample", (*RUN, "--ema=1.5"), "ema"),
    ("sample", (*RUN, "--ema=0"), "ema"),
    ("sample", (*RUN, "--num_frames=0"), "num_frames"),
    ("sample", (*RUN, "--height=-8"), "height"),
    ("sample", (*RUN, "--width=0"), "width"),
    ("sample", (*RUN, "--steps=0"), "steps"),
    ("sample", (*RUN, "--guidance=-1"), "guidance"),
    ("sample", (*RUN, "--guidance=nan"), "guidance"),
    ("sample", (*RUN, "--shift=0"), "shift"),
    ("sample", (*RUN, "--seed=-1"), "seed"),
    ("sample", (*RUN, "--seed=4294967296"), "seed"),
    ("sample", (*RUN, "--data_dir=missing"), "data_dir"),
    ("sample", (*RUN, "--out=v.avi"), "out"),
    ("sample", (*RUN, "--out=emptydir.mp4"), "out"),
    ("sample", (*RUN, "--out=afile/v.mp4"), "out"),
    ("export", ("--out=o",), "workdir"),
    ("export", ("--workdir=run",), "out"),
    ("export", ("--workdir=missing", "--out=o"), "workdir"),
    ("export", ("--workdir=afile", "--out=o"), "workdir"),
    ("export", ("--workdir=run", "--out=afile"), "out"),
    ("export", ("--workdir=run", "--out=o", "--step=-1"), "step"),
    ("export", ("--workdir=missing", "--out=o", "--step=-1"), "step"),
    ("export", ("--workdir=run", "--out=o", "--ema=1.5"), "ema"),
    ("export", ("--workdir=run", "--out=o", "--ema=0"), "ema"),
    ("export", ("--workdir=run", "--out=o", "--max_shard_gb=-1"), "max_shard_gb"),
    ("export", ("--workdir=run", "--out=o", "--max_shard_gb=nan"), "max_shard_gb"),
    ("export", ("--workdir=new", "--import_from=missing"), "import_from"),
    ("export", ("--workdir=new", "--import_from=afile"), "import_from"),
    ("export", ("--workdir=afile", "--import_from=run"), "workdir"),
    ("export", ("--workdir=new", "--import_from=run", "--step=3"), "step"),
    ("export", ("--workdir=new", "--import_from=run", "--ema=0.999"), "ema"),
    ("export", ("--workdir=new", "--import_from=run", "--dtype=bf16"), "dtype"),
    ("export", ("--workdir=new", "--import_from=run", "--out=o"), "out"),
    ("export", ("--workdir=new", "--import_from=run", "--max_shard_gb=2"), "max_shard_gb"),
    ("export", ("--workdir=run", "--out=o", f"--config={TINY.split('=', 1)[1]}"), "config"),
    ("prepare", (TINY, "--captions=captions.csv"), "out"),
    ("prepare", (TINY, "--captions=missing.csv", "--out=o"), "captions"),
    ("prepare", (TINY, "--captions=emptydir.mp4", "--out=o"), "captions"),
    ("prepare", (TINY, "--captions=captions.csv", "--out=afile"), "out"),
    ("prepare", (TINY, "--captions=captions.csv", "--out=o", "--chunk_rows=0"), "chunk_rows"),
    ("prepare", (TINY, "--captions=captions.csv", "--out=o", "--beam_options=--runner=DirectRunner"),
     "beam_options"),
    ("prepare", (TINY, "--captions=captions.csv", "--out=o", "--runner=beam", "--beam_options=fast"),
     "beam_options"),
    ("compile", ("--topology=v5e-4",), "config"),
    ("compile", (TINY, "--topology="), "topology"),
    ("compile", (TINY, "--topology=v9z-4"), "topology"),
    ("compile", (*TOPOLOGY, "--num_slices=-1"), "num_slices"),
    ("compile", (*TOPOLOGY, "--hbm_gib=-2"), "hbm_gib"),
    ("compile", (*TOPOLOGY, "--hbm_gib=nan"), "hbm_gib"),
    ("data.synthetic", (), "out"),
    ("data.synthetic", ("--out=",), "out"),
    ("data.synthetic", ("--out=afile",), "out"),
    ("data.synthetic", ("--out=o", "--num_videos=0"), "num_videos"),
    ("data.synthetic", ("--out=o", "--frames=1"), "frames"),
    ("data.synthetic", ("--out=o", "--size=33"), "size"),
    ("data.synthetic", ("--out=o", "--size=8"), "size"),
    ("data.synthetic", ("--out=o", "--fps=0"), "fps"),
    ("data.synthetic", ("--out=o", "--seed=-1"), "seed"),
    ("data.synthetic", ("--out=o", "--workers=-1"), "workers"),
]


@pytest.fixture
def folder(tmp_path):
  """A file, an empty run, a captions file and an empty folder whose name looks like a video."""
  (tmp_path / "afile").write_text("not a directory\n")
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "captions.csv").write_text("video,caption\nv.mp4,a red circle\n")
  (tmp_path / "emptydir.mp4").mkdir()
  return tmp_path


def _listing(root) -> dict:
  """Every path under `root` with its size and modification time."""
  found = {}
  for parent, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(parent, name)
      stat = os.stat(path)
      found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
  return found


def _one_error_line(result, binary: str) -> str:
  lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
  assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
  assert len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith(f"sora_jax.{binary}: error: "), lines[0]
  assert "Traceback" not in result.stderr
  return lines[0]


@pytest.mark.parametrize("binary, args, flag", CASES,
                         ids=[f"{binary}-{'-'.join(a for a in args if a not in (TINY, *RUN))}"
                              for binary, args, _ in CASES])
def test_a_bad_flag_is_one_line_naming_it_and_writes_nothing(folder, binary, args, flag):
  before = _listing(folder)
  result = _binary(f"sora_jax.{binary}", *args, cwd=folder)
  line = _one_error_line(result, binary)
  assert f"--{flag}" in line, line
  assert _listing(folder) == before


@pytest.mark.parametrize("binary", sorted({binary for binary, _, _ in CASES}))
def test_a_stray_argument_is_one_line(folder, binary):
  before = _listing(folder)
  required = ("--out=o",) if binary == "data.synthetic" else ()  # absl checks its required flag first
  line = _one_error_line(_binary(f"sora_jax.{binary}", *required, "extra", cwd=folder), binary)
  assert "unexpected arguments ['extra']" in line
  assert _listing(folder) == before


@pytest.mark.parametrize("binary, args", [("train", (TINY, "--workdir=w", "--num_processes=0")),
                                          ("sample", (*RUN, "--seed=-1"))])
def test_verbosity_shows_the_traceback_of_a_flag_error(folder, binary, args):
  result = _binary(f"sora_jax.{binary}", *args, "--verbosity=1", cwd=folder)
  assert result.returncode != 0 and "Traceback" in result.stderr and "FlagError" in result.stderr
