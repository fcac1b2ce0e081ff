"""Library side of `sora_jax.prepare`: captions file -> clips -> latents + text embeddings -> dataset.

Owns reading the captions file, the resumable chunked work (each chunk of input rows is decoded,
encoded and committed atomically as one file under `DIR/.prepare_work/<fingerprint>/`), the local
multiprocessing and Apache Beam runners, the hash split, the final TFDS assembly and
`DIR/prepare_report.json`. Bad rows are skipped with a reason, never fatal.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from sora_jax.data import schema
from sora_jax.encoders import tokenizer as tokenizer_lib
from sora_jax.files import atomic, paths
from sora_jax.offline import chunked_job, video_io

REPORT_FILE = "prepare_report.json"
WORK_DIR = ".prepare_work"
CHUNK_ROWS = 128  # input rows per committed chunk: the unit of resumption


class PrepareError(ValueError):
  """A problem with the job as a whole (captions file, config, output dir); bad rows are skipped."""


@dataclasses.dataclass(frozen=True)
class Row:
  index: int  # 0-based data row of the captions file
  video: str  # path as written in the captions file
  path: str  # resolved path (relative entries are relative to the captions file)
  caption: str
  original_caption: str = ""  # a recaptioned file's short caption (sora_jax.recaption), else empty


def read_captions(path: str) -> list[Row]:
  """Rows of a CSV (header with `video,caption`) or JSONL (objects with those keys) captions file."""
  if not paths.is_file(path):
    raise PrepareError(f"captions file {path!r} does not exist")
  base = os.path.dirname(paths.shown(path))  # relative video paths are relative to the captions file
  text = paths.read_text(path)
  entries: list[tuple[Any, Any]] = []
  if path.endswith((".jsonl", ".json")):
    for line_number, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise PrepareError(f"captions file {path!r} line {line_number} is not JSON: {e}") from None
      if not isinstance(item, dict) or "video" not in item:
        raise PrepareError(
            f"captions file {path!r} line {line_number}: expected an object with keys video, caption")
      entries.append((item["video"], item.get("caption"), item.get("original_caption")))
  else:
    with io.StringIO(text, newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"video", "caption"} <= set(reader.fieldnames):
        raise PrepareError(
            f"captions file {path!r} has columns {reader.fieldnames}; expected a header with video,caption")
      entries = [(item["video"], item["caption"], item.get("original_caption")) for item in reader]
  rows = []
  for index, (video, caption, original) in enumerate(entries):
    video = str(video or "")
    resolved = video if os.path.isabs(video) or paths.is_remote(video) else os.path.join(base, video)
    rows.append(Row(index, video, resolved, str(caption or "").strip(), str(original or "").strip()))
  if not rows:
    raise PrepareError(f"captions file {path!r} has no rows")
  return rows


# ------------------------------------------------------------------------------ per-row decoding


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  fps: float
  clip_stride_s: float
  buckets: tuple[tuple[int, int, int], ...]
  image_buckets: tuple[tuple[int, int, int], ...]
  original_caption_prob: float = 0.0  # data.original_caption_prob


def decode_row(row: Row, settings: DecodeSettings) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
  """(clips, skip): clips carry uint8 frames and their metadata; skip names why a row gave none."""
  try:
    if not row.caption:
      raise video_io.MediaError(video_io.EMPTY_CAPTION, "the caption is empty")
    if not row.video:
      raise video_io.MediaError(video_io.MISSING, "the video path is empty")
    with video_io.local_copy(row.path) as local:
      if video_io.is_image(row.path):
        frames, bucket = video_io.read_image(local, settings.image_buckets)
        clips = [_clip(row, 0.0, frames, bucket, 0.0, True, settings)]
      else:
        clips = [
            _clip(row, start, frames, bucket, settings.fps, False, settings)
            for start, frames, bucket in video_io.read_video_clips(
                local, fps=settings.fps, buckets=settings.buckets, clip_stride_s=settings.clip_stride_s)]
    return clips, None
  except video_io.MediaError as e:
    return [], {"row": row.index, "video": row.video, "reason": e.reason, "detail": str(e)}
  except Exception as e:  # noqa: BLE001 - one odd file must never end a long job
    return [], {"row": row.index, "video": row.video, "reason": video_io.UNREADABLE,
                "detail": f"{type(e).__name__}: {e}"}


def clip_caption(row: Row, start: float, original_caption_prob: float) -> str:
  """The caption of the clip of `row` starting at `start` s: the original (short) caption with
  probability data.original_caption_prob where the row has one, else the (dense) caption. Fixed by the
  clip, so a re-run prepares the same dataset."""
  if row.original_caption and original_caption_prob > 0:
    if split_draw(f"caption:{row.video}:{start:.3f}") < original_caption_prob:
      return row.original_caption
  return row.caption


def _clip(row: Row, start: float, frames: np.ndarray, bucket, fps: float, is_image: bool,
          settings: DecodeSettings) -> dict[str, Any]:
  caption = clip_caption(row, start, settings.original_caption_prob)
  return {"row": row.index, "source": row.video, "caption": caption, "clip_start_s": start,
          "frames": frames, "fps": fps, "num_frames": bucket[0], "height": bucket[1], "width": bucket[2],
          "is_image": is_image}


# ------------------------------------------------------------------------------ encoding a chunk


class ChunkEncoder:
  """VAE + text encoder for the clips of one chunk; builds the on-disk examples.

  Clips of one bucket are encoded together, `vae_batch` at a time (the local device count by default),
  so a VAE that spreads a batch over the local devices (the Wan VAE does) runs data-parallel.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
               vae_batch: int | None = None):
    from sora_jax.encoders import text_encoder, vae  # deferred: jax only in the encoding process

    self.vae = vae.get_vae(config)
    self.text_encoder = text_encoder.get_text_encoder(config, tokenizer)
    self.record_dtype = config.data.record_dtype
    if vae_batch is None:
      import jax

      vae_batch = jax.local_device_count() if getattr(self.vae, "data_parallel", False) else 1
    self.vae_batch = max(1, vae_batch)

  def _latents(self, clips: Sequence[dict[str, Any]]) -> list[np.ndarray]:
    """Latents of every clip, in order: same-shape clips batched, the last batch padded by repetition."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, clip in enumerate(clips):
      by_shape.setdefault(clip["frames"].shape, []).append(index)
    latents: list[np.ndarray | None] = [None] * len(clips)
    for indices in by_shape.values():
      for start in range(0, len(indices), self.vae_batch):
        batch = indices[start:start + self.vae_batch]
        padded = batch + [batch[-1]] * (self.vae_batch - len(batch))
        pixels = np.stack([clips[i]["frames"] for i in padded]).astype(np.float32) / 127.5 - 1.0
        encoded = np.asarray(self.vae.encode(pixels))
        for row, index in enumerate(batch):
          latents[index] = encoded[row]
    return latents

  def encode(self, clips: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    captions = sorted({clip["caption"] for clip in clips})
    if not clips:
      return []
    embeds, lengths = self.text_encoder.encode(captions)
    by_caption = {caption: i for i, caption in enumerate(captions)}
    examples = []
    clip_index: Counter = Counter()
    for clip, latents in zip(clips, self._latents(clips), strict=True):
      k = by_caption[clip["caption"]]
      record = {key: clip[key] for key in (
          "caption", "source", "clip_start_s", "fps", "num_frames", "height", "width", "is_image")}
      record.update(latents=latents, text_embeds=embeds[k], text_len=lengths[k])
      key = f"{clip['row']:09d}-{clip_index[clip['row']]:05d}"
      clip_index[clip["row"]] += 1
      examples.append((key, schema.encode(record, self.record_dtype)))
    return examples


def _chunk_path(work: str, chunk: int) -> str:
  return os.path.join(work, "chunks", f"chunk_{chunk:06d}.pkl")


def _commit(path: str, payload: Any) -> None:
  """Writes `payload` to `path` atomically: a crash leaves either nothing or the whole file."""
  atomic.write_bytes(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def _write_chunk(work: str, chunk: int, examples, skipped, num_rows: int) -> int:
  _commit(_chunk_path(work, chunk), {
      "examples": examples, "skipped": skipped, "rows": num_rows,
      "sources": [example["source"] for _, example in examples]})
  return len(examples)


def _load_chunk(path: str) -> dict[str, Any]:
  return pickle.loads(paths.read_bytes(path))


# ------------------------------------------------------------------------------ the chunked job


class _CommitChunk:
  """Encodes one chunk's decoded clips and commits its file (chunked_job.ChunkCommit).

  The local runner hands it the parent's encoder; on a Beam worker it builds its own on first use.
  """

  def __init__(self, work: str, config_json: str, tokenizer_file: str, encoder: ChunkEncoder | None = None):
    self.work, self.config_json, self.tokenizer_file = work, config_json, tokenizer_file
    self.encoder = encoder

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "encoder": None}  # models are not shipped to workers: each builds its own

  def __call__(self, chunk: int, rows: Sequence[Row], mapped: Sequence[tuple[list, dict | None]]) -> int:
    if self.encoder is None:
      config = ml_collections.ConfigDict(json.loads(self.config_json))
      self.encoder = ChunkEncoder(config, tokenizer_lib.load(self.tokenizer_file))
    clips = [clip for row_clips, _ in mapped for clip in row_clips]
    skipped = [skip for _, skip in mapped if skip]
    return _write_chunk(self.work, chunk, self.encoder.encode(clips), skipped, len(rows))


def split_draw(source: str) -> float:
  """A uniform [0, 1) draw fixed by the source path: clips of one video share a split."""
  digest = hashlib.sha256(source.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2 ** 64


def assign_validation(sources: Sequence[str], eval_fraction: float) -> set[str]:
  """Sources whose clips go to the validation split (at least one when there are two or more)."""
  unique = sorted(set(sources))
  draws = {source: split_draw(source) for source in unique}
  validation = {source for source in unique if draws[source] < eval_fraction}
  if not validation and len(unique) >= 2 and eval_fraction > 0:
    validation = {min(unique, key=draws.get)}
  if len(validation) == len(unique) and len(unique) >= 2:
    validation.discard(max(unique, key=draws.get))
  return validation


def _chunk_examples(chunk_path: str, *, split: str, validation: frozenset) -> Iterator[tuple[str, dict]]:
  for key, example in _load_chunk(chunk_path)["examples"]:
    if (example["source"] in validation) == (split == "validation"):
      yield key, example


def fingerprint(captions_path: str, config: ml_collections.ConfigDict, tokenizer_sha256: str) -> str:
  """sha256 of everything a chunk's content depends on: inputs, data/model config, code schema."""
  digest = hashlib.sha256()
  digest.update(paths.read_bytes(captions_path))
  data = config.data
  relevant = {key: data[key] for key in (
      "fps", "clip_stride_s", "buckets", "image_buckets", "record_dtype", "vae", "vae_spatial_factor",
      "vae_temporal_factor", "text_encoder", "text_encoder_layers", "text_encoder_heads",
      "text_encoder_ffn_dim", "text_encoder_seed", "text_len", "vocab_size")}
  if data.text_encoder_position_bias_std:  # only when set: older datasets keep their fingerprint
    relevant["text_encoder_position_bias_std"] = data.text_encoder_position_bias_std
  if data.original_caption_prob:
    relevant["original_caption_prob"] = data.original_caption_prob
  if data.pretrained:  # the encoders' weights: their directory and the encoding precision
    relevant.update(pretrained=os.path.abspath(data.pretrained), encoder_dtype=data.encoder_dtype)
  relevant.update(in_channels=config.model.in_channels, text_dim=config.model.text_dim,
                  schema_version=schema.SCHEMA_VERSION, tokenizer=tokenizer_sha256)
  digest.update(json.dumps(relevant, sort_keys=True, default=list).encode())
  return digest.hexdigest()


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  """Refuses to write into a folder that holds other files than a dataset (or prepare's own work), and a
  bucket path this process cannot write to."""
  if paths.is_remote(out_dir):
    reason = paths.bucket_write_problem(out_dir)
    if reason is not None:
      raise PrepareError(f"--out={out_dir} is not writable ({reason}); expected a bucket path this "
                         f"process can create objects in")
  try:
    names = sorted(paths.list_names(out_dir))
  except FileNotFoundError:
    return
  except NotADirectoryError:
    raise PrepareError(f"--out={out_dir} is a file; expected a new or empty directory") from None
  ours = {schema.DATASET_NAME, WORK_DIR, REPORT_FILE}
  foreign = [name for name in names if name not in ours and not name.startswith(".staging-")]
  if foreign and not overwrite:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise PrepareError(
        f"--out={out_dir} is a non-empty directory that holds no sora_jax dataset ({shown}); choose a "
        f"new or empty directory, or pass --overwrite to write the dataset beside those files")


def _dataset_fingerprint(out_dir: str) -> str | None:
  try:
    return schema.read_metadata(out_dir).get("fingerprint")
  except schema.DatasetError:
    return None


def _write_json(path: str, payload: Any) -> None:
  atomic.write_json(path, payload, indent=1, default=str)


def prepare(captions_path: str, out_dir: str, config: ml_collections.ConfigDict, *, runner: str = "local",
            beam_options: Sequence[str] = (), chunk_rows: int = CHUNK_ROWS, overwrite: bool = False,
            progress: bool = True, max_chunks: int | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Prepares the dataset in `out_dir`; returns the report (also written to DIR/prepare_report.json).

  Re-running with the same inputs resumes from the committed chunks, or does nothing if the dataset
  is complete. A different complete dataset in `out_dir` is replaced only with `overwrite`, and only
  once the new one is complete.
  """
  if runner not in chunked_job.RUNNERS:
    raise PrepareError(f"runner={runner!r}; expected one of {chunked_job.RUNNERS}")
  if chunk_rows < 1:
    raise PrepareError(f"chunk_rows={chunk_rows}; expected >= 1")
  _check_out_dir(out_dir, overwrite)
  start_time = time.time()
  rows = read_captions(captions_path)
  from sora_jax.encoders import vae as vae_lib  # deferred: pulls in jax

  vae_lib.get_vae(config)  # fail on an unusable VAE before any decoding
  tokenizer = _tokenizer(config.data, rows)
  job = fingerprint(captions_path, config, tokenizer.sha256)
  report_path = os.path.join(out_dir, REPORT_FILE)
  existing = _dataset_fingerprint(out_dir)
  if existing == job and paths.is_file(report_path):
    report = json.loads(paths.read_text(report_path))
    log(f"prepare: {out_dir} already holds this dataset ({report['clips_written']} clips); nothing to do")
    return report
  if existing is not None and not overwrite:
    raise PrepareError(
        f"{out_dir} holds a complete dataset prepared from other inputs or settings; pass --overwrite "
        f"to replace it (it is kept until the new one is complete) or choose another --out")

  # The committed chunks live beside the dataset (in the bucket for gs://), so any machine resumes.
  work = os.path.join(out_dir, WORK_DIR, job[:16])
  if not paths.is_remote(work):
    os.makedirs(os.path.join(work, "chunks"), exist_ok=True)
  tokenizer_file = os.path.join(work, schema.TOKENIZER_FILE)
  tokenizer.save(tokenizer_file)
  chunks = chunked_job.split_rows(rows, chunk_rows)
  settings = _decode_settings(config.data)
  workers = config.data.prepare_workers or os.cpu_count() or 1
  encoder = ChunkEncoder(config, tokenizer)  # also gives the text encoder identity for the metadata
  _encode_chunks(chunks, settings, config, encoder, tokenizer_file, work, runner, beam_options, workers,
                 progress, max_chunks, log)
  encode_seconds = time.time() - start_time

  chunk_files = [_chunk_path(work, c) for c in sorted(chunks)]
  assembled = _assemble(chunk_files, config.data)
  if not assembled.sources:
    raise PrepareError(
        f"no clip could be made from the {len(rows)} rows of {captions_path}; reasons: "
        f"{dict(Counter(s['reason'] for s in assembled.skipped))} (details in {work})")
  metadata = _metadata(config, job, encoder, settings, assembled, captions_path)
  _write_dataset(out_dir, config, encoder.vae, assembled, metadata, tokenizer_file, runner)

  report = {
      "out": os.fspath(paths.resolve(out_dir)), "captions": paths.shown(captions_path), "rows": len(rows),
      "clips_written": len(assembled.sources), "clips_per_split": assembled.clips_per_split,
      "clips_per_bucket": metadata["clips_per_bucket"], "rows_skipped": len(assembled.skipped),
      "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in assembled.skipped).items())),
      "skipped": sorted(assembled.skipped, key=lambda s: s["row"]), "runner": runner, "workers": workers,
      "encode_seconds": round(encode_seconds, 2), "total_seconds": round(time.time() - start_time, 2),
      "fingerprint": job,
  }
  _write_json(report_path, report)
  paths.remove_tree(os.path.join(out_dir, WORK_DIR))
  return report


def _tokenizer(data: ml_collections.ConfigDict, rows: Sequence[Row]) -> Any:
  """The configured tokenizer, or one trained on the captions; checked against data.vocab_size."""
  if data.tokenizer or data.pretrained:
    from sora_jax.encoders import text_encoder as text_encoder_lib

    tokenizer = tokenizer_lib.load(text_encoder_lib.resolve_tokenizer_path(data))
  else:
    tokenizer = tokenizer_lib.train([row.caption for row in rows] +
                                    [row.original_caption for row in rows if row.original_caption],
                                    data.vocab_size)
  tokenizer_lib.check_fits(tokenizer, data.vocab_size)
  return tokenizer


def _decode_settings(data: ml_collections.ConfigDict) -> DecodeSettings:
  return DecodeSettings(
      fps=float(data.fps), clip_stride_s=float(data.clip_stride_s),
      buckets=tuple(tuple(b) for b in data.buckets),
      image_buckets=tuple(tuple(b) for b in data.image_buckets),
      original_caption_prob=float(data.original_caption_prob))


def _encode_chunks(chunks: dict[int, list[Row]], settings: DecodeSettings, config: ml_collections.ConfigDict,
                   encoder: ChunkEncoder, tokenizer_file: str, work: str, runner: str,
                   beam_options: Sequence[str], workers: int, progress: bool, max_chunks: int | None,
                   log: Callable[[str], None]) -> None:
  """Decodes and encodes every chunk not yet committed under `work` (a resumed job skips the rest)."""
  job = chunked_job.Job("prepare", functools.partial(_chunk_path, work), unit="clip")
  commit = _CommitChunk(work, config.to_json(), tokenizer_file, encoder if runner == "local" else None)
  try:
    chunked_job.run(job, chunks, commit, map_row=functools.partial(decode_row, settings=settings),
                    runner=runner, workers=workers, beam_options=beam_options, progress=progress,
                    max_chunks=max_chunks, log=log)
  except chunked_job.JobError as error:
    raise PrepareError(str(error)) from None


@dataclasses.dataclass
class _Assembled:
  """Every committed chunk read back: the clips' sources, the skipped rows, and what each split holds."""

  sources: list[str]
  skipped: list[dict[str, Any]]
  counts_per_bucket: Counter
  clips_per_split: dict[str, int]
  splits: dict[str, Any]  # split name -> (chunk files, example generator)
  shape_index: dict[str, dict[str, tuple[int, ...]]]  # split name -> {example key: (T', H', W', C, is_image)}


def _assemble(chunk_files: Sequence[str], data: ml_collections.ConfigDict) -> _Assembled:
  """Splits the committed chunks' clips by source into the train and validation splits."""
  sources, skipped, counts_per_bucket = [], [], Counter()
  shape_of_key: dict[str, tuple[int, ...]] = {}
  source_of_key: dict[str, str] = {}
  for path in chunk_files:
    payload = _load_chunk(path)
    sources.extend(payload["sources"])
    skipped.extend(payload["skipped"])
    for key, example in payload["examples"]:
      counts_per_bucket[(int(example["num_frames"]), int(example["height"]), int(example["width"]))] += 1
      shape_of_key[key] = (*np.shape(example["latents"]), int(bool(example["is_image"])))
      source_of_key[key] = example["source"]
  validation = frozenset(assign_validation(sources, data.eval_fraction))
  clips_per_split = {
      data.train_split: sum(1 for s in sources if s not in validation),
      data.eval_split: sum(1 for s in sources if s in validation)}
  splits, shape_index = {}, {}
  for split_name, internal in ((data.train_split, "train"), (data.eval_split, "validation")):
    if clips_per_split[split_name]:
      splits[split_name] = (chunk_files, functools.partial(
          _chunk_examples, split=internal, validation=validation))
      shape_index[split_name] = {
          key: shape for key, shape in shape_of_key.items()
          if (source_of_key[key] in validation) == (internal == "validation")}
  return _Assembled(sources, skipped, counts_per_bucket, clips_per_split, splits, shape_index)


def _metadata(config: ml_collections.ConfigDict, job: str, encoder: ChunkEncoder, settings: DecodeSettings,
              assembled: _Assembled, captions_path: str) -> dict[str, Any]:
  """The dataset's metadata.json: schema, encoders, latent shape per bucket, clip counts."""
  data, vae = config.data, encoder.vae
  return {
      "schema_version": schema.SCHEMA_VERSION, "fingerprint": job, "record_dtype": data.record_dtype,
      "latent_channels": vae.latent_channels, "text_dim": config.model.text_dim, "text_len": data.text_len,
      "vae": {"name": data.vae, "spatial_factor": data.vae_spatial_factor,
              "temporal_factor": data.vae_temporal_factor},
      "text_encoder": encoder.text_encoder.identity, "tokenizer_file": schema.TOKENIZER_FILE,
      "fps": data.fps, "clip_stride_s": data.clip_stride_s,
      "latent_shapes": {"x".join(map(str, bucket)): list(vae.latent_shape(*bucket))
                        for bucket in [*settings.buckets, *settings.image_buckets]},
      "clips_per_bucket": {"x".join(map(str, b)): n for b, n in sorted(assembled.counts_per_bucket.items())},
      "clips_per_split": assembled.clips_per_split, "eval_fraction": data.eval_fraction,
      "captions_file": paths.shown(captions_path),
  }


def _write_dataset(out_dir: str, config: ml_collections.ConfigDict, vae: Any, assembled: _Assembled,
                   metadata: dict[str, Any], tokenizer_file: str, runner: str) -> None:
  """Writes the TFDS ArrayRecord dataset with each split's shape index, replacing any old one whole."""
  data = config.data
  beam_runner = None
  if runner == "beam":
    from apache_beam.runners.direct import DirectRunner

    beam_runner = DirectRunner()
  num_shards = max(1, min(data.shards, min(n for n in assembled.clips_per_split.values() if n)))
  tfds_log_level = _quiet_tfds()
  try:
    from sora_jax.offline import tfds_builder

    # tfds prints a banner on stdout; the binary's stdout is its one summary line.
    with contextlib.redirect_stdout(io.StringIO()):
      tfds_builder.write_dataset(
          out_dir, latent_channels=vae.latent_channels, text_dim=config.model.text_dim,
          record_dtype=data.record_dtype, splits=assembled.splits, metadata=metadata,
          num_shards=num_shards, extra_files={schema.TOKENIZER_FILE: tokenizer_file},
          beam_runner=beam_runner, latent_shapes=assembled.shape_index)
  finally:
    _restore_tfds(tfds_log_level)


def _quiet_tfds():
  import tensorflow_datasets as tfds
  from absl import logging

  tfds.disable_progress_bar()
  level = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  return level


def _restore_tfds(level) -> None:
  from absl import logging

  logging.set_verbosity(level)


def summary_line(report: dict[str, Any]) -> str:
  """The one line prepare prints at the end."""
  splits = ", ".join(f"{name} {count}" for name, count in report["clips_per_split"].items())
  reasons = ", ".join(f"{reason} {count}" for reason, count in report["skipped_by_reason"].items())
  skipped = f"skipped {report['rows_skipped']} rows" + (f" ({reasons})" if reasons else "")
  return (f"prepare: wrote {report['clips_written']} clips ({splits}) to {report['out']}; {skipped}; "
          f"report: {os.path.join(report['out'], REPORT_FILE)}")
