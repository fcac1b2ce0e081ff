"""`python -m sora_jax.recaption`: dense captions by a random tiny vision-language model, local and served."""

import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from language_helpers import make_tiny_vlm, serve
from PIL import Image

from sora_jax.evaluation import media
from sora_jax.offline import preparation, recaptioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = ["a.mp4", "b.mp4", "still.png", "c.mp4"]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
  return make_tiny_vlm(str(tmp_path_factory.mktemp("tiny_vlm")))


def write_captions_folder(folder) -> str:
  """3 videos, an image, a broken file and captions.csv naming them and a missing video; its path."""
  rng = np.random.default_rng(0)
  for name in ("a.mp4", "b.mp4", "c.mp4"):
    media.write_mp4(str(folder / name), rng.integers(0, 256, (12, 32, 48, 3), np.uint8), 8.0, scale=1)
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(folder / "still.png")
  (folder / "broken.mp4").write_text("not a video")
  path = folder / "captions.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "caption"])
    for name in ("a.mp4", "missing.mp4", "b.mp4", "still.png", "broken.mp4", "c.mp4"):
      writer.writerow([name, f"short caption of {name}"])
  return str(path)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
  """A captions file of 3 videos, an image, a missing video and a file that is no video."""
  return write_captions_folder(tmp_path_factory.mktemp("videos"))


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_binary_writes_a_dense_caption_for_every_good_row_and_reports_the_rest(vlm, captions):
  out = os.path.join(os.path.dirname(captions), "dense.csv")
  done = subprocess.run(
      [sys.executable, "-m", "sora_jax.recaption", f"--captions={captions}", f"--out={out}",
       f"--captioner={vlm}", "--chunk_rows=2", "--frames=3", "--max_new_tokens=12", "--noprogress"],
      capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "4 of 6 videos captioned" in done.stdout and "1 missing, 1 unreadable" in done.stdout
  rows = _read(out)
  assert [row["video"] for row in rows] == GOOD
  assert all(row["caption"].strip() and row["caption"] != row["original_caption"] for row in rows)
  assert [row["original_caption"] for row in rows] == [f"short caption of {name}" for name in GOOD]
  # prepare reads it as it is: the dense caption is the caption, the videos resolve.
  read = preparation.read_captions(out)
  assert [r.caption for r in read] == [row["caption"] for row in rows]
  assert all(os.path.exists(r.path) for r in read)
  assert [r.original_caption for r in read] == [row["original_caption"] for row in rows]
  assert not os.path.exists(out + ".work")


def test_an_interrupted_run_resumes_and_an_endpoint_gives_the_same_captions(vlm, captions, tmp_path):
  settings = recaptioning.Settings(frames=3, max_new_tokens=12)
  local = str(tmp_path / "local.csv")
  lines = []
  with pytest.raises(recaptioning.RecaptionError, match="stopped after 1 chunks"):
    recaptioning.recaption(captions, local, captioner=vlm, settings=settings, chunk_rows=2, progress=False,
                           max_chunks=1)
  report = recaptioning.recaption(captions, local, captioner=vlm, settings=settings, chunk_rows=2,
                                  progress=False, log=lines.append)
  assert lines == ["recaption: resuming, 1 of 3 chunks already done"]
  assert report["captioned"] == 4 and report["skipped_by_reason"] == {"missing": 1, "unreadable": 1}
  assert recaptioning.recaption(captions, local, captioner=vlm, settings=settings, chunk_rows=2,
                                progress=False, log=lines.append)["captioned"] == 4
  assert lines[-1].endswith("nothing to do")
  # Another folder than the captions file: video paths become absolute so they still resolve.
  assert all(os.path.isabs(row["video"]) for row in _read(local))

  process, url = serve(vlm, vision=True)
  try:
    served = str(tmp_path / "served.csv")
    recaptioning.recaption(captions, served, captioner=url, settings=settings, chunk_rows=2, progress=False)
  finally:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  assert _read(served) == _read(local)


def test_frames_spread_over_the_clip():
  assert recaptioning.frame_times(8.0, 4, "spread", 8.0) == [1.0, 3.0, 5.0, 7.0]
  assert recaptioning.frame_times(8.0, 3, "middle", 8.0) == [3.875, 4.0, 4.125]


def test_prepare_mixes_original_and_dense_captions_per_clip():
  rows = [preparation.Row(i, f"v{i}.mp4", f"/v{i}.mp4", f"dense {i}", f"short {i}") for i in range(200)]
  for prob, low, high in ((0.0, 0, 0), (1.0, 200, 200), (0.3, 40, 80)):
    chosen = [preparation.clip_caption(row, 0.0, prob) for row in rows]
    originals = sum(caption.startswith("short") for caption in chosen)
    assert low <= originals <= high, (prob, originals)
    assert chosen == [preparation.clip_caption(row, 0.0, prob) for row in rows]  # fixed per clip
  plain = preparation.Row(0, "v.mp4", "/v.mp4", "only caption")
  assert preparation.clip_caption(plain, 0.0, 1.0) == "only caption"  # no original: the caption


def test_the_beam_runner_writes_what_the_local_one_does(vlm, captions, tmp_path):
  settings = recaptioning.Settings(frames=2, max_new_tokens=8)
  outputs = []
  for runner in ("local", "beam"):
    out = str(tmp_path / f"{runner}.csv")
    report = recaptioning.recaption(captions, out, captioner=vlm, settings=settings, chunk_rows=3,
                                    runner=runner, progress=False, log=lambda line: None)
    assert report["captioned"] == 4
    outputs.append(_read(out))
  assert outputs[0] == outputs[1]
