"""sora_jax.prepare end to end on generated mp4s, images and bad rows; resume; dataset protection; beam."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import decode_video
from PIL import Image

from sora_jax.config import load
from sora_jax.data import buckets, pipeline, schema
from sora_jax.encoders import text_encoder as text_encoder_lib
from sora_jax.encoders import tokenizer as tokenizer_lib
from sora_jax.encoders import vae as vae_lib
from sora_jax.offline import preparation, synthetic


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """4 good 2 s videos, 2 images, and one row of each kind of bad input."""
  return write_inputs(str(tmp_path_factory.mktemp("inputs")))


def write_inputs(root: str):
  """(root, captions file, good rows) of the inputs above, written under `root`."""
  os.makedirs(root, exist_ok=True)
  rows = synthetic.generate(root, 4, seed=1, frames=16, size=32, fps=8, workers=1)
  entries = [(row["video"], row["caption"]) for row in rows]
  # A wide video (48x32) is centre-cropped into the square bucket.
  wide = synthetic.render(dict(rows[0], start_xy=[20.0, 16.0]), 48, 16)[:, 8:40]
  synthetic.write_mp4(os.path.join(root, "videos", "wide.mp4"), np.tile(wide, (1, 1, 2, 1))[:, :, :48], 8)
  entries.append(("videos/wide.mp4", "a wide video"))
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, :30] = (230, 30, 30)
  Image.fromarray(image).save(os.path.join(root, "half_red.png"))
  Image.fromarray(image).save(os.path.join(root, "half_red.jpg"), quality=95)
  entries += [("half_red.png", "a red half"), ("half_red.jpg", "a red half in jpeg")]
  short = synthetic.render(rows[1], 32, 4)
  synthetic.write_mp4(os.path.join(root, "videos", "short.mp4"), short, 8)
  with open(os.path.join(root, "videos", "corrupt.mp4"), "wb") as f:
    f.write(np.random.default_rng(0).bytes(5000))
  with open(os.path.join(root, "videos", "000000.mp4"), "rb") as f:
    data = f.read()
  with open(os.path.join(root, "videos", "truncated.mp4"), "wb") as f:
    f.write(data[: len(data) // 2])
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not a video\n")
  entries += [
      ("videos/short.mp4", "a short video"),
      ("videos/corrupt.mp4", "a corrupt video"),
      ("videos/truncated.mp4", "a truncated video"),
      ("videos/does_not_exist.mp4", "a missing video"),
      ("videos/000001.mp4", "   "),
      ("notes.txt", "a text file"),
  ]
  captions = os.path.join(root, "captions.csv")
  with open(captions, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "caption"])
    writer.writerows(entries)
  return root, captions, rows


# The checks below are written for 32x32 buckets; pinned so they do not follow the demo's clip size.
BUCKET_FLAGS = ["--config.data.buckets=((8, 32, 32),)", "--config.data.image_buckets=((1, 32, 32),)"]


@pytest.fixture(scope="module")
def config():
  return prepare_config()


def prepare_config():
  """configs/tiny.py with 32x32 buckets, one prepare worker and 30% held out."""
  config = load("configs/tiny.py")
  config.data.prepare_workers = 1
  config.data.eval_fraction = 0.3
  config.data.buckets = ((8, 32, 32),)
  config.data.image_buckets = ((1, 32, 32),)
  return config


EXPECTED_SKIPS = {
    7: "too_short", 8: "unreadable", 9: "unreadable", 10: "missing", 11: "empty_caption",
    12: "unreadable"}


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
  """The binary run once (2 worker processes), shared by the checks below."""
  _, captions, _ = inputs
  out = str(tmp_path_factory.mktemp("dataset"))
  command = [sys.executable, "-m", "sora_jax.prepare", f"--captions={captions}", f"--out={out}",
             "--config=configs/tiny.py", "--config.data.prepare_workers=2",
             "--config.data.eval_fraction=0.3", "--chunk_rows=4", "--noprogress", *BUCKET_FLAGS]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result.stdout


def test_report_lists_every_skipped_row(prepared):
  out, stdout = prepared
  with open(os.path.join(out, preparation.REPORT_FILE)) as f:
    report = json.load(f)
  # 4 videos x 2 clips + the wide video's 2 clips + 2 images.
  assert report["clips_written"] == 12
  assert {s["row"]: s["reason"] for s in report["skipped"]} == EXPECTED_SKIPS
  assert report["skipped_by_reason"] == {"empty_caption": 1, "missing": 1, "too_short": 1, "unreadable": 3}
  assert report["rows_skipped"] == 6 and report["rows"] == 13
  assert report["clips_per_bucket"] == {"1x32x32": 2, "8x32x32": 10}
  short = next(s for s in report["skipped"] if s["reason"] == "too_short")
  assert "4 frames" in short["detail"] and "short.mp4" in short["detail"]
  assert "prepare: wrote 12 clips" in stdout and "skipped 6 rows" in stdout
  assert not os.path.exists(os.path.join(out, preparation.WORK_DIR))


def test_records_hold_the_video_and_caption(prepared, inputs, config):
  out, _ = prepared
  root, _, rows = inputs
  metadata = schema.read_metadata(out)
  assert metadata["latent_shapes"]["8x32x32"] == [8, 16, 16, 12]
  assert metadata["text_encoder"]["name"] == "tiny_umt5"
  records = []
  for split in ("train", "validation"):
    source = schema.open_split(out, split)
    records += [schema.decode(source[i]) for i in range(len(source))]
    assert len(source) == metadata["clips_per_split"][split] > 0
  # Clips of one source never straddle the splits.
  split_of = {}
  for split in ("train", "validation"):
    source = schema.open_split(out, split)
    for i in range(len(source)):
      assert split_of.setdefault(schema.decode(source[i])["source"], split) == split
  assert len(records) == 12
  tokenizer = tokenizer_lib.load(schema.tokenizer_path(out))
  encoder = text_encoder_lib.get_text_encoder(config, tokenizer)
  assert encoder.identity == metadata["text_encoder"]
  vae = vae_lib.get_vae(config)
  by_key = {(r["source"], float(r["clip_start_s"])): r for r in records}
  for row in rows:
    frames = decode_video(os.path.join(root, row["video"]))
    for start in (0.0, 1.0):
      record = by_key[(row["video"], start)]
      assert record["latents"].dtype == np.float16 and record["latents"].shape == (8, 16, 16, 12)
      assert record["caption"] == row["caption"] and not record["is_image"]
      assert record["fps"] == 8 and record["num_frames"] == 8 and record["height"] == 32
      pixels = vae.decode(record["latents"].astype(np.float32)[None])[0]
      expected = frames[int(start * 8): int(start * 8) + 8].astype(np.float32) / 127.5 - 1
      np.testing.assert_allclose(pixels, expected, atol=2e-3)
      embeds, lengths = encoder.encode([row["caption"]])
      assert record["text_len"] == lengths[0]
      np.testing.assert_allclose(record["text_embeds"].astype(np.float32), embeds[0], atol=2e-3, rtol=2e-3)
  image = by_key[("half_red.png", 0.0)]
  assert image["is_image"] and image["latents"].shape == (1, 16, 16, 12) and image["num_frames"] == 1
  pixels = vae.decode(image["latents"].astype(np.float32)[None])[0, 0]
  # 60x40 -> cover 48x32 -> centre crop 32x32: the left third is red, the right part black.
  assert pixels[:, :6, 0].min() > 0.7 and pixels[:, -6:].max() < -0.9
  wide = by_key[("videos/wide.mp4", 0.0)]
  assert wide["latents"].shape == (8, 16, 16, 12)


def test_shape_index_is_published_and_spares_the_reader_a_scan(prepared, config, monkeypatch):
  out, _ = prepared
  published = {}
  for split in ("train", "validation"):
    published[split] = np.load(schema.latent_shapes_path(out, split))
    source = schema.open_split(out, split)
    np.testing.assert_array_equal(published[split], buckets.scan_shapes(source, schema.decode))
  both = np.concatenate(list(published.values()))
  assert sorted(map(tuple, np.unique(both, axis=0))) == [(1, 16, 16, 12, 1), (8, 16, 16, 12, 0)]

  def no_scan(*args):
    raise AssertionError("the pipeline scanned a split that has a published shape index")

  monkeypatch.setattr(buckets, "scan_shapes", no_scan)
  iterator = pipeline.make_iterator(config, out, "train", process_index=0, process_count=1, seed=0,
                                    batch_size_per_process=1)
  assert next(iterator)["latents"].shape[1:] in {(8, 16, 16, 12), (1, 16, 16, 12)}
  iterator.close()


def test_resume_after_interruption_matches_a_clean_run(inputs, config, tmp_path, caplog, monkeypatch):
  from sora_jax.offline import tfds_builder

  _, captions, _ = inputs
  handed = {}  # split -> the shape index prepare gave the writer (None would mean a read-back scan)
  publish = tfds_builder._publish_shapes
  monkeypatch.setattr(tfds_builder, "_publish_shapes", lambda staged, split, shapes: (
      handed.__setitem__(split, shapes), publish(staged, split, shapes))[1])
  interrupted = str(tmp_path / "interrupted")
  with pytest.raises(preparation.PrepareError, match="stopped after 2 chunks"):
    preparation.prepare(captions, interrupted, config, chunk_rows=3, progress=False, max_chunks=2)
  work = os.path.join(interrupted, preparation.WORK_DIR)
  (job,) = os.listdir(work)
  assert sorted(os.listdir(os.path.join(work, job, "chunks"))) == ["chunk_000000.pkl", "chunk_000001.pkl"]
  assert not os.path.exists(os.path.join(interrupted, schema.DATASET_NAME))
  # A chunk killed mid-write leaves only a temp file, which the resumed run ignores.
  with open(os.path.join(work, job, "chunks", "chunk_000002.pkl.tmp-123"), "wb") as f:
    f.write(b"partial")
  messages = []
  report = preparation.prepare(captions, interrupted, config, chunk_rows=3, progress=False,
                               log=messages.append)
  assert any("resuming, 2 of 5 chunks already done" in m for m in messages)
  clean = str(tmp_path / "clean")
  clean_report = preparation.prepare(captions, clean, config, chunk_rows=3, progress=False)
  assert report["clips_written"] == clean_report["clips_written"] == 12
  assert report["skipped"] == clean_report["skipped"]

  def contents(out):
    found = {}
    for split in ("train", "validation"):
      source = schema.open_split(out, split)
      for i in range(len(source)):
        record = schema.decode(source[i])
        found[(split, record["source"], float(record["clip_start_s"]))] = (
            record["latents"].tobytes(), record["text_embeds"].tobytes())
    return found

  assert contents(interrupted) == contents(clean)
  for split in ("train", "validation"):
    np.testing.assert_array_equal(np.load(schema.latent_shapes_path(interrupted, split)),
                                  np.load(schema.latent_shapes_path(clean, split)))
  assert "scanning" not in caplog.text  # the index came from the chunks, not from reading back
  assert set(handed) == {"train", "validation"} and all(handed.values())
  # A finished dataset is not redone.
  messages.clear()
  preparation.prepare(captions, interrupted, config, chunk_rows=3, progress=False, log=messages.append)
  assert any("nothing to do" in m for m in messages)


def test_existing_dataset_is_never_corrupted(inputs, config, tmp_path, capfd):
  root, captions, _ = inputs
  out = str(tmp_path / "out")
  preparation.prepare(captions, out, config, progress=True)
  # The progress bar on stderr: rows done of all, elapsed<ETA, and the clips written per second.
  bar = capfd.readouterr().err
  assert re.search(r"prepare: 100%.* 13/13 \[\d\d:\d\d<\d\d:\d\d, .*clips=12, clips_per_s=[\d.]+\]", bar), bar
  before = len(schema.open_split(out, "train"))
  other = os.path.join(root, "other.jsonl")
  with open(other, "w") as f:
    f.write(json.dumps({"video": "videos/000002.mp4", "caption": "one video"}) + "\n")
    f.write(json.dumps({"video": "videos/corrupt.mp4", "caption": "bad"}) + "\n")
  with pytest.raises(preparation.PrepareError, match="--overwrite"):
    preparation.prepare(other, out, config, progress=False)
  only_bad = os.path.join(root, "only_bad.jsonl")
  with open(only_bad, "w") as f:
    f.write(json.dumps({"video": "videos/corrupt.mp4", "caption": "bad"}) + "\n")
  with pytest.raises(preparation.PrepareError, match=r"no clip could be made .*'unreadable': 1"):
    preparation.prepare(only_bad, out, config, progress=False, overwrite=True)
  assert len(schema.open_split(out, "train")) == before
  # Given a tokenizer file (data.tokenizer), prepare uses it instead of training one on the captions.
  given_tokenizer = str(tmp_path / "given.model")
  shutil.copy(schema.tokenizer_path(out), given_tokenizer)
  with_tokenizer = config.copy_and_resolve_references()
  with_tokenizer.data.tokenizer = given_tokenizer
  report = preparation.prepare(other, out, with_tokenizer, progress=False, overwrite=True)
  assert report["clips_written"] == 2 and report["skipped_by_reason"] == {"unreadable": 1}
  assert (tokenizer_lib.load(schema.tokenizer_path(out)).sha256
          == tokenizer_lib.load(given_tokenizer).sha256)
  assert len(schema.open_split(out, "train")) == 2  # one source: everything in train
  with pytest.raises(schema.DatasetError, match="has no split 'validation'"):
    schema.open_split(out, "validation")


def test_captions_file_errors(tmp_path, config):
  bad = tmp_path / "bad.csv"
  bad.write_text("path,text\nx.mp4,hello\n")
  with pytest.raises(preparation.PrepareError, match="expected a header with video,caption"):
    preparation.read_captions(str(bad))
  with pytest.raises(preparation.PrepareError, match="does not exist"):
    preparation.read_captions(str(tmp_path / "nope.csv"))
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"video": "a.mp4", "caption": "x"}\n{not json\n')
  with pytest.raises(preparation.PrepareError, match="line 2 is not JSON"):
    preparation.read_captions(str(broken))


def test_binary_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.prepare", f"--captions={tmp_path}/missing.csv", f"--out={tmp_path}/o",
       "--config=configs/tiny.py"], capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"sora_jax.prepare: error: --captions='{tmp_path}/missing.csv' does not exist; expected a CSV (header "
      f"video,caption) or JSONL file")


def test_beam_runner_matches_local(prepared, inputs, config, tmp_path, caplog):
  """Beam's DirectRunner against the binary's local run (same inputs, config and chunking)."""
  _, captions, _ = inputs
  local_dir, _ = prepared
  with open(os.path.join(local_dir, preparation.REPORT_FILE)) as f:
    local = json.load(f)
  beam = preparation.prepare(captions, str(tmp_path / "beam"), config, chunk_rows=4, progress=False,
                             runner="beam")
  assert beam["clips_written"] == local["clips_written"] == 12
  assert beam["skipped"] == local["skipped"]
  for split in ("train", "validation"):
    ours = schema.open_split(str(tmp_path / "beam"), split)
    theirs = schema.open_split(local_dir, split)
    key = lambda r: (r["source"], float(r["clip_start_s"]))
    a = {key(r): r["latents"].tobytes() for r in map(schema.decode, (ours[i] for i in range(len(ours))))}
    b = {key(r): r["latents"].tobytes() for r in map(schema.decode, (theirs[i] for i in range(len(theirs))))}
    assert a == b
    # tfds's Beam writer stores records in the same order, so the index from the keys holds.
    np.testing.assert_array_equal(np.load(schema.latent_shapes_path(str(tmp_path / "beam"), split)),
                                  buckets.scan_shapes(ours, schema.decode))
  assert "scanning" not in caplog.text
  from array_record.python import array_record_module

  for path, _ in schema.split_shards(str(tmp_path / "beam"), "train"):
    reader = array_record_module.ArrayRecordReader(path)
    assert "uncompressed" in reader.writer_options_string()  # the Beam writer uses ours too
    reader.close()
  shutil.rmtree(tmp_path)


def test_a_non_empty_folder_that_is_not_a_dataset_is_refused_untouched(inputs, tmp_path):
  _, captions, _ = inputs
  out = tmp_path / "photos"
  out.mkdir()
  (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.prepare", f"--captions={captions}", f"--out={out}",
       "--config=configs/tiny.py"], capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"sora_jax.prepare: error: --out={out} is a non-empty")
  assert "holiday.jpg" in lines[0] and "--overwrite" in lines[0]
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
