"""Data mixtures: data.sources parsing, the seeded source schedule, mixed bucketed and packed streams
(exact resume on any process layout), per-source caption dropout and loss, a mixed run end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_tiny_train_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from sora_jax.configs import tiny

from sora_jax import config as config_lib
from sora_jax.data import buckets, pipeline, schema
from sora_jax.diffusion import training_inputs

SQUARE, IMAGE = (4, 4, 4, 12), (1, 4, 4, 12)
TEXT_LEN, TEXT_DIM = 4, 8
OFFSET = 1000  # record ids of source 1 start here, of source 2 at 2000


# ---------------------------------------------------------------- config


def _data(**fields):
  data = tiny.get_config().data
  for key, value in fields.items():
    data[key] = value
  return data


def test_sources_are_parsed_named_and_normalised():
  sources = config_lib.data_sources(_data(sources=(("gs://b/web/", 3), ("/d/web", 1, 0.5), ("/d/hq", 4.0))))
  assert [s.name for s in sources] == ["web_0", "web_1", "hq"]
  assert [s.weight for s in sources] == [0.375, 0.125, 0.5]
  assert [s.caption_dropout for s in sources] == [None, 0.5, None]
  # The one-source shorthand, and a config saved as JSON (lists) read back.
  assert config_lib.data_sources(_data(dir="/d/one")) == [config_lib.DataSource("one", "/d/one", 1.0, None)]
  assert len(config_lib.data_sources(_data(sources=[["/a", 1], ["/b", 2]]))) == 2
  assert config_lib.data_sources(_data()) == []


@pytest.mark.parametrize("fields, message", [
    ({"dir": "/a", "sources": (("/b", 1.0),)}, "data.dir='/a' and data.sources are both set"),
    ({"sources": (("/a", 0.0),)}, r"entry \('/a', 0.0\): weight 0.0"),
    ({"sources": (("/a", -1),)}, "weight -1"),
    ({"sources": (("/a", float("nan")),)}, "weight nan"),
    ({"sources": (("/a", 1.0, 1.5),)}, r"caption_dropout 1.5 must lie in \[0, 1\]"),
    ({"sources": (("/a",),)}, r"entry \('/a',\); expected \(path, weight\)"),
    ({"sources": (("", 1.0),)}, "the path must be a non-empty string"),
    ({"sources": (("/a", 1.0), ("/a/", 2.0))}, r"names \['/a'\] more than once"),
])
def test_bad_sources_are_one_config_error(fields, message):
  config = tiny.get_config()
  for key, value in fields.items():
    config.data[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


# ---------------------------------------------------------------- the schedule


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       start=st.integers(0, 10**6))
def test_the_schedule_counts_what_it_places_and_keeps_every_window_near_its_weights(weights, seed, start):
  mixture = buckets.SourceMixture(weights, seed)
  shares = np.asarray(weights) / np.sum(weights)
  placed = [mixture.position(p) for p in range(start, start + 400)]
  counts = np.asarray(mixture.counts(start))
  for p, (source, index) in zip(range(start, start + 400), placed, strict=True):
    assert index == counts[source]  # each source's positions come in order, none skipped
    counts[source] += 1
    assert counts.sum() == p + 1
  assert counts.tolist() == mixture.counts(start + 400)
  taken = np.bincount([source for source, _ in placed], minlength=len(weights))
  assert np.all(np.abs(taken - 400 * shares) <= len(weights) + 1)
  assert buckets.SourceMixture(weights, seed).position(start) == placed[0]  # the same on every process


# ---------------------------------------------------------------- the pipeline


def _config(**data):
  config = tiny.get_config()
  config.model.patch_size = (1, 2, 2)
  config.data.buckets = ((4, 8, 8),)
  config.data.image_buckets = ((1, 8, 8),)
  config.data.text_len = TEXT_LEN
  config.model.text_dim = TEXT_DIM
  config.data.read_threads = 1
  for key, value in data.items():
    config.data[key] = value
  return config


def _records(first_id, videos, images=0):
  records = []
  for index in range(videos + images):
    shape = SQUARE if index < videos else IMAGE
    latents = np.random.default_rng(first_id + index).normal(size=shape).astype(np.float32)
    latents.flat[0] = first_id + index
    text = np.zeros((TEXT_LEN, TEXT_DIM), np.float32)
    text[0, 0] = first_id + index
    records.append({"latents": latents.astype(np.float16), "text_embeds": text.astype(np.float16),
                    "text_len": np.int32(1), "is_image": index >= videos})
  return records


SIZES = ((16, 4), (8, 4), (24, 0))  # (videos, images) of each source


def _sources(weights=(0.5, 0.3, 0.2)):
  return [pipeline.SourceRecords(_records(OFFSET * k, *SIZES[k]), weight=w, name=f"s{k}")
          for k, w in enumerate(weights)]


def _make(config, process_index=0, process_count=1, rows=4, weights=(0.5, 0.3, 0.2)):
  return pipeline.make_mixture(config, _sources(weights), process_index=process_index,
                               process_count=process_count, seed=7, batch_size_per_process=rows)


def _clip_ids(batch):
  """Record ids of a batch: per clip (bucketed) or of every segment of every row (packed)."""
  if "segment_ids" not in batch:
    return [int(v) for v in batch["latents"].reshape(len(batch["latents"]), -1)[:, 0]]
  ids = []
  for row in range(len(batch["segment_ids"])):
    segments = batch["segment_ids"][row]
    ids += [int(batch["latents"][row, i, 0]) for i in range(len(segments))
            if segments[i] and (i == 0 or segments[i - 1] != segments[i])]
  return ids


def _clip_sources(batch):
  if "segment_ids" not in batch:
    return batch["source"].tolist()
  return [int(s) for row, grid in zip(batch["source"], batch["segment_grid"], strict=True)
          for s, g in zip(row, grid, strict=True) if np.prod(g) > 0]


def _global_batches(config, processes, rows, state, steps):
  iterators = []
  for index in range(processes):
    iterator = iter(_make(config, index, processes, rows))
    if state is not None:
      iterator.set_state(state)
    iterators.append(iterator)
  assert len({json.dumps(it.stream_identity(), sort_keys=True) for it in iterators}) == 1
  batches = []
  for _ in range(steps):
    parts = [next(it) for it in iterators]
    batches.append({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
  states = {json.dumps(it.get_state(), sort_keys=True) for it in iterators}
  assert len(states) == 1
  seen = {tuple(it.clips_seen()) for it in iterators}
  assert len(seen) == 1
  return batches, json.loads(states.pop()), list(seen.pop())


@pytest.mark.parametrize("packing", [False, True])
def test_a_mixed_stream_resumes_exactly_on_any_layout_and_counts_its_sources(packing):
  config = _config(packing=packing, token_budget=32, max_segments=4, image_ratio=0.25 if packing else 0.0)
  reference, _, seen = _global_batches(config, 1, 8, None, 12)
  state, resumed = None, []
  for (processes, rows), steps in zip(((2, 4), (1, 8), (4, 2)), (3, 4, 5), strict=True):
    batches, state, _ = _global_batches(config, processes, rows, state, steps)
    resumed += batches
  assert [_clip_ids(b) for b in resumed] == [_clip_ids(b) for b in reference]
  tallies = np.zeros(3, np.int64)
  for batch in reference:
    ids, sources = _clip_ids(batch), _clip_sources(batch)
    assert [i // OFFSET for i in ids] == sources  # every clip is labelled with the source it came from
    if not packing:
      assert len(set(sources)) == 1  # a bucketed batch comes whole from one source
    tallies += np.bincount(sources, minlength=3)
  assert seen == tallies.tolist()
  shares = tallies / tallies.sum()
  assert np.all(np.abs(shares - [0.5, 0.3, 0.2]) < 0.1)
  if not packing:  # 12 batches: 6 / 3.6 / 2.4 of them by weight, to within the schedule's slack
    assert np.all(np.abs(tallies / 8 - np.array([0.5, 0.3, 0.2]) * 12) <= 3)


def test_each_source_runs_through_its_own_epochs():
  config = _config(image_ratio=0.0)
  batches = [next(it) for it in [iter(_make(config, rows=4))] for _ in range(30)]
  by_source = {k: [i for b in batches if b["source"][0] == k for i in _clip_ids(b)] for k in range(3)}
  for k, (videos, _) in enumerate(SIZES):
    epoch = by_source[k][:videos]
    assert sorted(epoch) == [OFFSET * k + i for i in range(videos)]  # each clip once per epoch


@pytest.mark.parametrize("packing", [False, True])
def test_an_image_only_source_mixes_its_images_into_a_video_run(packing):
  """data.image_ratio=0 and a source of images alone: that source's weight sets the image share."""
  config = _config(image_ratio=0.0, packing=packing, token_budget=32, max_segments=8)
  sources = [pipeline.SourceRecords(_records(0, 16), weight=0.75, name="videos"),
             pipeline.SourceRecords(_records(OFFSET, 0, 16), weight=0.25, name="images")]
  iterator = iter(pipeline.make_mixture(config, sources, process_index=0, process_count=1, seed=1,
                                        batch_size_per_process=4))
  frames = {0: set(), 1: set()}
  for _ in range(16):
    batch = next(iterator)
    if packing:
      for grid, source in zip(batch["segment_grid"].reshape(-1, 3), batch["source"].reshape(-1), strict=True):
        if np.prod(grid) > 0:
          frames[int(source)].add(int(grid[0]))
    else:
      frames[int(batch["source"][0])].add(batch["latents"].shape[1])
  assert frames == {0: {4}, 1: {1}}


def test_the_stream_identity_names_the_mixture_and_one_dataset_keeps_its_own():
  config = _config(image_ratio=0.0)
  identity = iter(_make(config)).stream_identity()
  assert [s["weight"] for s in identity["sources"]] == [0.5, 0.3, 0.2]
  assert [s["records"] for s in identity["sources"]] == [20, 12, 24]
  assert iter(_make(config, weights=(0.4, 0.4, 0.2))).stream_identity() != identity
  single = pipeline.make_dataset(config, _records(0, 16), process_index=0, process_count=1, seed=7,
                                 batch_size_per_process=4)
  single_identity = iter(single).stream_identity()
  assert "sources" not in single_identity and single_identity["records"] == 16
  assert "source" not in next(iter(single))  # one dataset's batches are as they always were


def test_an_invalid_record_names_its_source():
  config = _config(image_ratio=0.0)
  broken = _sources()
  broken[1].records[3]["latents"][0, 0, 0, 1] = np.inf
  dataset = pipeline.make_mixture(config, broken, process_index=0, process_count=1, seed=7,
                                  batch_size_per_process=4)
  iterator = iter(dataset)
  with pytest.raises(pipeline.InvalidRecordError, match="source 's1' split 'train' record 3"):
    for _ in range(40):
      next(iterator)


# ---------------------------------------------------------------- the step


def _mixture_config(dropouts):
  config = _config()
  config.data.sources = tuple((f"/d/s{k}", 1.0, *([] if p is None else [p])) for k, p in enumerate(dropouts))
  config.diffusion.caption_dropout = 0.0
  return config


def test_each_source_drops_captions_at_its_own_rate():
  config = _mixture_config([None, 1.0])
  batch = {"latents": jnp.ones((6, *SQUARE)), "text_embeds": jnp.ones((6, TEXT_LEN, TEXT_DIM)),
           "source": jnp.asarray([0, 1, 0, 1, 1, 0], jnp.int32)}
  text = training_inputs.bucketed(batch, jax.random.PRNGKey(0), jnp.asarray(0), config)["text_embeds"]
  kept = np.asarray(jnp.any(text != 0, axis=(1, 2)))
  assert kept.tolist() == [True, False, True, False, False, True]
  # Packed: per segment, by each segment's source.
  packed = {"latents": jnp.ones((2, 8, 48)), "segment_ids": jnp.asarray([[1] * 4 + [2] * 4] * 2),
            "segment_grid": jnp.asarray([[[1, 2, 2], [1, 2, 2]]] * 2),
            "loss_mask": jnp.ones((2, 8)), "text_embeds": jnp.ones((2, 2 * TEXT_LEN, TEXT_DIM)),
            "source": jnp.asarray([[1, 0], [0, 1]], jnp.int32)}
  text = training_inputs.packed(packed, jax.random.PRNGKey(0), jnp.asarray(0), config)["text_embeds"]
  slots = np.asarray(jnp.any(text.reshape(2, 2, TEXT_LEN, TEXT_DIM) != 0, axis=(2, 3)))
  assert slots.tolist() == [[False, True], [True, False]]
  # One source with its own rate: batches carry no source, the rate still applies.
  alone = _mixture_config([1.0])
  text = training_inputs.bucketed({k: v for k, v in batch.items() if k != "source"}, jax.random.PRNGKey(0),
                                  jnp.asarray(0), alone)["text_embeds"]
  assert not np.any(np.asarray(text))
  # Without own rates, the draws are the ones a run without sources makes.
  same = _mixture_config([None, None])
  plain = training_inputs.bucketed({k: v for k, v in batch.items() if k != "source"}, jax.random.PRNGKey(3),
                                   jnp.asarray(0), same)
  mixed = training_inputs.bucketed(batch, jax.random.PRNGKey(3), jnp.asarray(0), same)
  np.testing.assert_array_equal(plain["text_embeds"], mixed["text_embeds"])


def test_the_step_reports_each_sources_loss_and_clips(tiny_train_config):
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import step as step_lib

  config = tiny_train_config
  config.data.sources = (("/d/a", 1.0), ("/d/b", 1.0), ("/d/c", 2.0))
  config.train.grad_accum_steps = 2
  config.train.global_batch_size = 16
  mesh = mesh_lib.create_mesh(config)
  trainable = step_lib.build(config, mesh)
  state = trainable.setup.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  source = np.asarray([0, 2, 2, 0, 2, 0, 2, 2] * 2, np.int32)
  batch = pipeline.to_global({"latents": rng.normal(size=(16, 4, 4, 4, 12)).astype(np.float32),
                              "text_embeds": rng.normal(size=(16, 8, 16)).astype(np.float32),
                              "source": source}, mesh, trainable.batch_sharding)
  _, metrics = trainable.train_step(state, batch)
  assert np.asarray(metrics["source_clips"]).tolist() == [6, 0, 10]  # summed over both micro-batches
  # Every clip has as many cells: the mean of the clips' losses is the step's loss.
  np.testing.assert_allclose(np.sum(metrics["source_loss_sum"]) / 16, metrics["loss"], rtol=1e-5)
  assert float(metrics["source_loss_sum"][1]) == 0.0


# ---------------------------------------------------------------- a mixed run


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
  from sora_jax.encoders import tokenizer as tokenizer_lib

  root = tmp_path_factory.mktemp("mixture")
  datasets = (write_tiny_train_dataset(str(root / "web"), num_train=32),
              write_tiny_train_dataset(str(root / "curated"), num_train=16, marked=True))
  tokenizer = tokenizer_lib.train([f"clip {i} of a mixture" for i in range(40)], vocab_size=64)
  for path in datasets:  # one tokenizer, as prepare with one data.tokenizer writes
    tokenizer.save(os.path.join(schema.version_dir(path), schema.TOKENIZER_FILE))
  return datasets


def test_a_mixed_run_logs_each_source_refuses_a_reweighted_resume_and_evaluates_each_split(
    tmp_path, tiny_train_config, two_datasets):
  from sora_jax.evaluation import evaluator as evaluator_lib
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import checkpoint as checkpoint_lib
  from sora_jax.train import loop

  web, curated = two_datasets
  config = tiny_train_config
  config.data.sources = ((web, 0.75), (curated, 0.25, 0.0))
  config.train.num_steps = 8
  config.checkpoint.every_steps = 4
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, 9))
  last = rows[-1]
  assert last["clips_seen/web"] + last["clips_seen/curated"] == 8 * 8
  assert last["clips_seen/web"] == 6 * 8  # 8 batches at 3:1, each whole from one source
  assert sum(1 for r in rows if "loss_source/curated" in r) == 2
  for row in rows:
    source = [k for k in ("web", "curated") if f"loss_source/{k}" in row]
    assert len(source) == 1 and row[f"loss_source/{source[0]}"] == pytest.approx(row["loss"], rel=1e-5)

  # A restart that reweights the mixture is refused in one line, and the checkpoints stay.
  config.data.sources = ((web, 0.5), (curated, 0.5))
  config.train.num_steps = 10
  with pytest.raises(checkpoint_lib.CheckpointError) as refused:
    loop.train(config, workdir)
  message = str(refused.value)
  assert "\n" not in message
  assert "2 sources (weights [0.75, 0.25], clips [32, 16]) -> 2 sources (weights [0.5, 0.5]" in message
  assert f"--config.train.init_from={workdir}" in message
  assert checkpoint_lib.Checkpointer(workdir, config).all_steps() == [4, 8]

  # The next stage may reweight: a new workdir started from this run.
  config.train.init_from = f"{workdir}@8"  # the binary pins RUN to its newest step
  config.train.num_steps = 2
  stage = loop.train(config, str(tmp_path / "stage2"))
  assert stage["step"] == 2 and stage["clips_seen/web"] == stage["clips_seen/curated"] == 8

  # eval scores each source's held-out split, and their mean by weight.
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = config_lib.from_json(json.load(f))
  config.eval.update(num_examples=8, batch_size=8, sigma_grid=4, num_frames=4, height=8, width=8,
                     prompts=("a red circle",), adherence_prompts=0)
  config.diffusion.sample_steps = 2
  built = evaluator_lib.build(config, workdir, mesh_lib.create_mesh(config), log=lambda line: None)
  entry = evaluator_lib.evaluate_step(built, 8)["weight_sets"]["raw"]
  by_source = entry["loss_by_source"]
  assert set(by_source) == {"web", "curated"}
  expected = 0.75 * np.asarray(by_source["web"]["loss_by_sigma"]) + \
      0.25 * np.asarray(by_source["curated"]["loss_by_sigma"])
  np.testing.assert_allclose(entry["loss_by_sigma"], expected, rtol=1e-6)
  assert by_source["web"]["loss"] != by_source["curated"]["loss"]


def test_datasets_of_other_encoders_do_not_mix(tmp_path, tiny_train_config, two_datasets):
  from sora_jax.train import loop

  web, _ = two_datasets
  other = write_tiny_train_dataset(str(tmp_path / "other"), num_train=16)
  path = schema.version_dir(other) + "/" + schema.METADATA_FILE
  with open(path, encoding="utf-8") as f:
    metadata = json.load(f)
  metadata["text_encoder"] = {"name": "umt5-xxl"}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(metadata, f)
  tiny_train_config.data.sources = ((web, 1.0), (other, 1.0))
  with pytest.raises(loop.TrainError, match="prepared with different text_encoder"):
    loop.check_data_dir(tiny_train_config.data)


@pytest.mark.parametrize("packing", [False, True])
def test_the_compile_report_plans_a_mixtures_batch_with_its_sources(packing):
  from jax.sharding import PartitionSpec

  from sora_jax import tpu_fit

  config = _config(packing=packing, token_budget=32, max_segments=4)
  config.data.sources = (("/d/a", 1.0), ("/d/b", 1.0))
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  batch = tpu_fit.abstract_batch(config, jax.sharding.NamedSharding(mesh, PartitionSpec()))
  rows = config.train.global_batch_size
  assert batch["source"].shape == ((rows, batch["segment_grid"].shape[1]) if packing else (rows,))
  config.data.sources = (("/d/a", 1.0),)
  assert "source" not in tpu_fit.abstract_batch(config, jax.sharding.NamedSharding(mesh, PartitionSpec()))
