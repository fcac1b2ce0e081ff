"""Input pipeline: shuffling, process sharding, bucketing, image mixing, validation, state, to_global."""

import json
import os
import re
import sys

import jax
import numpy as np
import pytest
from array_record.python import array_record_data_source
from hypothesis import given, settings
from hypothesis import strategies as st
from sora_jax.configs import tiny

from sora_jax.data import buckets, pipeline, schema
from sora_jax.offline import tfds_builder

# Latent shapes of the test buckets (pixel VAE: /2 spatially, 12 channels, patch (1, 2, 2)).
SQUARE, WIDE, IMAGE = (4, 4, 4, 12), (4, 4, 8, 12), (1, 4, 4, 12)
TEXT_LEN, TEXT_DIM = 4, 8


def _config(**data):
  config = tiny.get_config()
  config.model.patch_size = (1, 2, 2)  # pinned: the token counts below assume it, whatever tiny uses
  config.data.buckets = ((4, 8, 8), (4, 8, 16))
  config.data.image_buckets = ((1, 8, 8),)
  config.data.text_len = TEXT_LEN
  config.model.text_dim = TEXT_DIM
  config.data.read_threads = 2
  for key, value in data.items():
    config.data[key] = value
  return config


def _record(index: int, shape, dtype=np.float16, text_len: int = 2) -> dict:
  """A record whose latents carry its index at [0, 0, 0, 0] so batches can be traced to records."""
  rng = np.random.default_rng(index)
  latents = rng.normal(size=shape).astype(np.float32)
  latents.flat[0] = index
  text_embeds = np.zeros((TEXT_LEN, TEXT_DIM), np.float32)
  text_embeds[:text_len] = rng.normal(size=(text_len, TEXT_DIM))
  text_embeds[0, 0] = index
  return {"latents": latents.astype(dtype), "text_embeds": text_embeds.astype(dtype),
          "text_len": np.int32(text_len), "is_image": shape[0] == 1}


def _source(counts=((SQUARE, 16), (WIDE, 8), (IMAGE, 8))):
  records = []
  for shape, count in counts:
    for _ in range(count):
      records.append(_record(len(records), shape))
  return records


def _ids(batch) -> list[int]:
  return [int(v) for v in batch["latents"].reshape(len(batch["latents"]), -1)[:, 0]]


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def _make(config, source, process_index=0, process_count=1, batch=2, seed=0):
  return pipeline.make_dataset(config, source, process_index=process_index, process_count=process_count,
                               seed=seed, batch_size_per_process=batch)


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("stop_at", [3, 7])
def test_restore_continues_bit_identical(packing, stop_at):
  # 24 video clips / global batch 4 = 6 batches per epoch: stop_at=7 restores across the boundary.
  config = _config(packing=packing, token_budget=64, image_ratio=0.0 if not packing else 0.25)
  source = _source(((SQUARE, 16), (WIDE, 8), (IMAGE, 8)))
  dataset = _make(config, source, process_count=2, batch=2)
  reference = _take(iter(dataset), stop_at + 8)
  interrupted = iter(dataset)
  _take(interrupted, stop_at)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = iter(_make(config, source, process_count=2, batch=2))
  resumed.set_state(state)
  _assert_same(_take(resumed, 8), reference[stop_at:])


def test_processes_read_disjoint_shards_whose_union_is_one_epoch():
  config = _config(image_ratio=0.0)
  source = _source(((SQUARE, 16), (WIDE, 8)))
  steps_per_epoch = (16 + 8) // 4
  per_process = []
  for process_index in range(2):
    iterator = iter(_make(config, source, process_index=process_index, process_count=2))
    batches = _take(iterator, 2 * steps_per_epoch)
    per_process.append(batches)
  epoch_ids = [[_ids(b) for b in batches[:steps_per_epoch]] for batches in per_process]
  first = [i for steps in epoch_ids[0] for i in steps]
  second = [i for steps in epoch_ids[1] for i in steps]
  assert not set(first) & set(second)
  assert sorted(first + second) == list(range(24))
  # Both processes see the same bucket at every step, so global batches have one shape.
  for a, b in zip(per_process[0], per_process[1], strict=True):
    assert a["latents"].shape == b["latents"].shape
  # The next epoch covers everything again, in another order.
  next_epoch = [[_ids(b) for b in batches[steps_per_epoch:]] for batches in per_process]
  assert next_epoch != epoch_ids
  assert sorted(i for steps in next_epoch for ids in steps for i in ids) == list(range(24))


def test_each_batch_holds_one_bucket():
  config = _config(image_ratio=0.3)
  source = _source()
  shape_of = {i: r["latents"].shape for i, r in enumerate(source)}
  for batch in _take(iter(_make(config, source, batch=4)), 20):
    assert {shape_of[i] for i in _ids(batch)} == {batch["latents"].shape[1:]}
    assert batch["latents"].dtype == np.float32 and batch["text_embeds"].dtype == np.float32
    assert batch["text_embeds"].shape == (4, TEXT_LEN, TEXT_DIM)


def test_shuffle_depends_on_seed():
  config = _config()
  source = _source()
  ids = [[_ids(b) for b in _take(iter(_make(config, source, seed=seed)), 6)] for seed in (0, 0, 1)]
  assert ids[0] == ids[1]
  assert ids[0] != ids[2]


@pytest.mark.parametrize("image_ratio", [0.0, 0.3, 1.0])
def test_image_ratio_respected(image_ratio):
  plan = buckets.BatchPlan(np.array([0] * 8 + [1] * 8 + [2] * 8), buckets.bucket_table(_config()), 2,
                           image_ratio, seed=3)
  steps = 500
  images = sum(plan.table[plan.step(s)[0]].is_image for s in range(steps))
  assert abs(images - image_ratio * steps) <= 1
  # And through the pipeline: the batches' shapes follow the same schedule.
  config = _config(image_ratio=image_ratio)
  batches = _take(iter(_make(config, _source(), batch=2)), 40)
  assert abs(sum(b["latents"].shape[1] == 1 for b in batches) - image_ratio * 40) <= 1


def test_text_embeds_padded_to_text_len():
  config = _config(image_ratio=0.0, text_len=6)
  batch = next(iter(_make(config, _source(((SQUARE, 8),)))))
  assert batch["text_embeds"].shape == (2, 6, TEXT_DIM)
  assert not batch["text_embeds"][:, TEXT_LEN:].any()


def test_missing_stream_is_a_clear_error():
  with pytest.raises(ValueError, match="image"):
    _make(_config(image_ratio=0.5), _source(((SQUARE, 8),)))


@pytest.mark.parametrize("problem", ["nan", "shape", "dtype"])
def test_validation_error_names_the_record(problem):
  source = _source(((SQUARE, 8),))
  if problem == "nan":
    source[5]["latents"][1, 2, 3, 4] = np.nan
  elif problem == "shape":
    source[5]["latents"] = np.zeros((4, 4, 6, 12), np.float16)
  else:
    source[5]["latents"] = source[5]["latents"].astype(np.float32)
  config = _config(image_ratio=0.0, validation="error")
  with pytest.raises(pipeline.InvalidRecordError, match=r"record 5\b") as error:
    _take(iter(_make(config, source)), 4)
  assert {"nan": "non-finite", "shape": "shape", "dtype": "dtype"}[problem] in str(error.value)


@pytest.mark.parametrize("problem", ["nan", "shape"])
def test_validation_skip_counts_and_never_yields_bad_record(problem):
  source = _source(((SQUARE, 8),))
  if problem == "nan":
    source[5]["text_embeds"][0, 1] = np.inf
  else:
    source[5]["latents"] = np.zeros((4, 4, 6, 12), np.float16)
  config = _config(image_ratio=0.0, validation="skip")
  dataset = _make(config, source)
  batches = _take(iter(dataset), 12)
  seen = {i for b in batches for i in _ids(b)}
  assert 5 not in seen
  assert all(np.isfinite(b["latents"]).all() and np.isfinite(b["text_embeds"]).all() for b in batches)
  assert all(b["latents"].shape == (2, *SQUARE) for b in batches)
  assert dataset.reader.num_skipped >= 1


def test_to_global_on_eight_devices():
  devices = np.array(jax.devices()[:8]).reshape(2, 4, 1, 1)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "context", "tensor"))
  batch = next(iter(_make(_config(image_ratio=0.0), _source(((SQUARE, 16),)), batch=8)))
  arrays = pipeline.to_global(batch, mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  assert arrays["latents"].shape == (8, *SQUARE)
  assert arrays["text_embeds"].shape == (8, TEXT_LEN, TEXT_DIM)
  assert arrays["latents"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert len(arrays["latents"].addressable_shards) == 8
  assert arrays["latents"].addressable_shards[3].data.shape == (1, *SQUARE)
  np.testing.assert_array_equal(np.asarray(arrays["latents"]), batch["latents"])
  # Per-key specs: text replicated, latents over data only.
  specs = {"latents": jax.sharding.PartitionSpec("data"), "text_embeds": jax.sharding.PartitionSpec()}
  arrays = pipeline.to_global(batch, mesh, specs)
  assert arrays["latents"].addressable_shards[0].data.shape == (4, *SQUARE)
  assert arrays["text_embeds"].addressable_shards[0].data.shape == (8, TEXT_LEN, TEXT_DIM)
  with pytest.raises(ValueError, match="latents"):
    pipeline.to_global(batch, mesh, {"latents": "data"})


def _write_dataset(out_dir, record_dtype="bfloat16"):
  def expand(index):
    shape = (SQUARE, WIDE, IMAGE)[index % 3]
    record = _record(index, shape, np.float32)
    record.update(caption=f"clip {index}", source=f"v{index}.mp4", clip_start_s=0.0, fps=8.0,
                  num_frames=shape[0], height=8, width=2 * shape[2], is_image=shape[0] == 1)
    yield f"clip-{index}", schema.encode(record, record_dtype)

  return tfds_builder.write_dataset(
      out_dir, latent_channels=12, text_dim=TEXT_DIM, record_dtype=record_dtype,
      splits={"train": (list(range(24)), expand)},
      metadata={"schema_version": schema.SCHEMA_VERSION}, num_shards=2)


def test_make_iterator_reads_a_prepared_dataset(tmp_path):
  _write_dataset(str(tmp_path))
  config = _config(image_ratio=0.25, record_dtype="bfloat16")
  iterator = pipeline.make_iterator(config, str(tmp_path), "train", process_index=0, process_count=1,
                                    seed=0, batch_size_per_process=2)
  batches = _take(iterator, 8)
  for batch in batches:
    for i, sample in zip(_ids(batch), batch["latents"], strict=True):
      assert sample.shape == (SQUARE, WIDE, IMAGE)[i % 3]
  assert sum(b["latents"].shape[1] == 1 for b in batches) == 2
  # Without the published shape index (an older dataset) the split is scanned once, to the same
  # index, which is cached next to the shards.
  index_path = schema.latent_shapes_path(str(tmp_path), "train")
  published = np.load(index_path)
  os.remove(index_path)
  state = iterator.get_state()
  again = pipeline.make_iterator(config, str(tmp_path), "train", process_index=0, process_count=1,
                                 seed=0, batch_size_per_process=2)
  np.testing.assert_array_equal(np.load(index_path), published)
  again.set_state(json.loads(json.dumps(state)))
  _assert_same(_take(again, 3), _take(iterator, 3))


def test_invalid_record_error_names_the_shard(tmp_path):
  _write_dataset(str(tmp_path), record_dtype="float16")
  config = _config(image_ratio=0.25, record_dtype="bfloat16")
  with pytest.raises(pipeline.InvalidRecordError,
                     match=r"shard .*array_record.*record \d+ of the shard") as error_info:
    iterator = pipeline.make_iterator(config, str(tmp_path), "train", process_index=0, process_count=1,
                                      seed=0, batch_size_per_process=2)
    next(iterator)
  # The named shard and position hold exactly the named record.
  match = re.search(r"record (\d+) \(shard (\S+), record (\d+) of the shard\)", str(error_info.value))
  index, shard, position = int(match[1]), match[2], int(match[3])
  source = schema.open_split(str(tmp_path), "train")
  shard_source = array_record_data_source.ArrayRecordDataSource([shard])
  assert shard_source[position] == source.data_source[index]


def test_bad_arguments():
  config = _config()
  with pytest.raises(ValueError, match="process_index"):
    _make(config, _source(), process_index=2, process_count=2)
  with pytest.raises(ValueError, match="no records"):
    _make(config, [])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 13), min_size=3, max_size=3), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2**31 - 1))
def test_batch_plan_epoch_covers_each_bucket_once(counts, process_count, batch_size, seed):
  table = buckets.bucket_table(_config())
  bucket_ids = np.concatenate([np.full(n, b, np.int32) for b, n in enumerate(counts)] + [[-1, -1]])
  global_batch = process_count * batch_size
  video_batches = sum(counts[b] // global_batch for b in (0, 1))
  if video_batches == 0:
    with pytest.raises(ValueError, match="video bucket with a full global batch"):
      buckets.BatchPlan(bucket_ids, table, global_batch, 0.0, seed)
    return
  plan = buckets.BatchPlan(bucket_ids, table, global_batch, 0.0, seed)
  assert plan.batches_per_epoch[buckets.VIDEO] == video_batches
  seen = []
  for step in range(video_batches):
    bucket_id, records = plan.step(step)
    assert len(records) == global_batch and (bucket_ids[records] == bucket_id).all()
    seen += records.tolist()
  assert len(set(seen)) == len(seen)
  for b in (0, 1):
    in_bucket = [r for r in seen if bucket_ids[r] == b]
    assert len(in_bucket) == counts[b] // global_batch * global_batch


def test_state_of_another_mode_is_rejected_and_closed_iterator_stops():
  bucketed = iter(_make(_config(image_ratio=0.0), _source()))
  with pytest.raises(ValueError, match="data.packing"):
    bucketed.set_state({"kind": "packed", "chunk": 0, "row": 0})
  next(bucketed)
  bucketed.close()
  with pytest.raises(ValueError, match="closed"):
    next(bucketed)


def test_tune_malloc_sets_glibc_thresholds_once():
  assert not pipeline.tune_malloc(0)  # 0 leaves malloc alone
  if not sys.platform.startswith("linux"):
    pytest.skip("mallopt thresholds are glibc-only")
  assert pipeline.tune_malloc(32)
  assert pipeline.tune_malloc(32)  # idempotent


def test_malloc_threshold_is_validated():
  from sora_jax import config as config_lib

  config = tiny.get_config()
  config.data.malloc_mmap_threshold_mb = -1
  with pytest.raises(config_lib.ConfigError, match="data.malloc_mmap_threshold_mb=-1"):
    config_lib.validate(config)


@pytest.mark.parametrize("layouts", [((2, 4), (1, 8), (4, 2)), ((1, 8), (2, 4), (8, 1))])
def test_a_bucketed_position_resumes_on_any_process_layout(layouts):
  """Global batch n depends on the dataset, seed and n only: 2x4 -> 1x8 -> 4x2 processes x rows
  continue the uninterrupted stream, and an epoch holds every clip exactly once."""
  config = _config(image_ratio=0.0)
  source = _source(((SQUARE, 16), (WIDE, 16)))  # 32 clips / global batch 8 = 4 steps per epoch

  def global_batches(processes, rows, state, steps):
    iterators = []
    for index in range(processes):
      iterator = iter(_make(config, source, process_index=index, process_count=processes, batch=rows))
      iterator.set_state(state)
      iterators.append(iterator)
    identities = {json.dumps(it.stream_identity(), sort_keys=True) for it in iterators}
    assert len(identities) == 1  # every process, every layout: the same stream
    batches = [[_ids(next(it)) for it in iterators] for _ in range(steps)]
    return [[i for part in parts for i in part] for parts in batches], iterators[0].get_state()

  reference, _ = global_batches(1, 8, {"kind": "bucketed", "step": 0}, 9)
  state, resumed = {"kind": "bucketed", "step": 0}, []
  for (processes, rows), steps in zip(layouts, (2, 3, 4), strict=True):
    batches, state = global_batches(processes, rows, json.loads(json.dumps(state)), steps)
    resumed += batches
  assert resumed == reference
  first_epoch = [i for batch in resumed[:4] for i in batch]
  assert sorted(first_epoch) == list(range(32))
  identity = iter(_make(config, source, batch=8)).stream_identity()
  assert identity["global_batch_size"] == 8 and identity["records"] == 32
  assert iter(_make(config, source, batch=4)).stream_identity() != identity
  assert iter(_make(config, source, batch=8, seed=1)).stream_identity() != identity


def _packed_ids(batch) -> list[list[int]]:
  """Per row, the record ids of its segments (the first token of each clip carries its id)."""
  rows = []
  for row in range(len(batch["segment_ids"])):
    segment_ids = batch["segment_ids"][row]
    starts = [i for i in range(len(segment_ids))
              if segment_ids[i] and (i == 0 or segment_ids[i - 1] != segment_ids[i])]
    rows.append([int(batch["latents"][row, i, 0]) for i in starts])
  return rows


@pytest.mark.parametrize("layouts", [((2, 4), (1, 8), (4, 2)), ((1, 8), (8, 1), (2, 4))])
def test_a_packed_position_resumes_on_any_process_layout(layouts):
  """Packed rows come from one global clip stream cut into global batches of rows, so 2x4 -> 1x8 ->
  4x2 processes x rows continue the uninterrupted rows, and an epoch packs every clip once."""
  config = _config(packing=True, token_budget=64, max_segments=4, image_ratio=0.25)
  source = _source(((SQUARE, 16), (WIDE, 8), (IMAGE, 8)))

  def global_batches(processes, rows, state, steps):
    iterators = []
    for index in range(processes):
      iterator = iter(_make(config, source, process_index=index, process_count=processes, batch=rows))
      if state is not None:
        iterator.set_state(state)
      iterators.append(iterator)
    assert len({json.dumps(it.stream_identity(), sort_keys=True) for it in iterators}) == 1
    batches = [[row for it in iterators for row in _packed_ids(next(it))] for _ in range(steps)]
    states = {json.dumps(it.get_state(), sort_keys=True) for it in iterators}
    assert len(states) == 1  # every process saves the same position
    return batches, json.loads(states.pop())

  reference, _ = global_batches(1, 8, None, 9)
  state, resumed = None, []
  for (processes, rows), steps in zip(layouts, (2, 3, 4), strict=True):
    batches, state = global_batches(processes, rows, state, steps)
    resumed += batches
  assert resumed == reference
  # Clips in order of the stream: the first epoch of 24 videos and 8 images, each exactly once.
  clips = [clip for batch in reference for row in batch for clip in row]
  videos = [c for c in clips if c < 24][:24]
  assert sorted(videos) == list(range(24))
  assert state["kind"] == "packed" and state["row"] == 9 * 8


def test_packed_row_positions_survive_the_bounded_offset_cache(monkeypatch):
  """The chunk -> first-row cache keeps the anchor and the newest chunks; positions found after it
  was pruned equal those counted chunk by chunk."""
  monkeypatch.setattr(pipeline, "_OFFSETS_KEPT", 4)
  config = _config(packing=True, token_budget=64, max_segments=4, image_ratio=0.25)
  chunks = _make(config, _source(), batch=2).elements.anchored(0, 0)
  starts = [0]
  for chunk in range(40):
    starts.append(starts[-1] + len(chunks._rows(chunk)[0]))  # noqa: SLF001 - the uncached count
  for chunk in range(40):
    chunks[chunk]  # reading moves the cache forward and prunes it
  assert len(chunks._offsets) <= 2 * 4 + 1  # noqa: SLF001
  for chunk in (0, 3, 17, 39):
    assert chunks.first_row(chunk) == starts[chunk]
    assert chunks.locate(starts[chunk] + 1) == (chunk, starts[chunk])
