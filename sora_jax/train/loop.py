"""The training loop: `train(config, workdir)` from checks to the final checkpoint.

Owns the order of a run (fail-fast checks, mesh, born-sharded state, resume, data, jitted step),
the per-step bookkeeping (metrics windows, checkpoints, SIGTERM, profiling) and the rollback to the
last checkpoint after a run of non-finite steps.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sora_jax import config as config_lib
from sora_jax.choices import EXPERTS
from sora_jax.files import atomic, mirror, paths
from sora_jax.model import dit
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import checkpoint as checkpoint_lib
from sora_jax.train import metrics as metrics_lib
from sora_jax.train import run_weights as weights_lib
from sora_jax.train import stages
from sora_jax.train import state as state_lib
from sora_jax.train import step as step_lib


class TrainError(RuntimeError):
  """A run that cannot start or continue (bad workdir, bad data dir, unrecoverable divergence)."""


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and proves it writable; raises TrainError naming it otherwise."""
  if not workdir:
    raise TrainError("--workdir is empty; expected a directory for checkpoints and metrics")
  if paths.is_remote(workdir):
    _check_bucket_workdir(workdir)
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe_"):
      pass
  except OSError as error:
    raise TrainError(
        f"workdir {workdir!r} is not writable ({error.strerror or error}); expected a directory this "
        f"process can create files in") from error


def _check_bucket_workdir(workdir: str) -> None:
  """Proves a bucket workdir writable with a probe object (written, then deleted)."""
  reason = paths.bucket_write_problem(workdir)
  if reason is not None:
    raise TrainError(f"workdir {workdir!r} is not writable ({reason}); expected a bucket path this process "
                     f"can create objects in")


def check_data_dir(data: ml_collections.ConfigDict) -> None:
  """Raises TrainError unless every dataset of the run (config.data: data.dir, or each of
  data.sources) holds a prepared dataset with the train split, and a mixture's datasets share their
  encoders: one latent space and one caption embedding space."""
  sources = config_lib.data_sources(data)
  if not sources:
    raise TrainError("config.data.dir is empty; pass --config.data.dir=DIR, a dataset written by "
                     "sora_jax.prepare (or config.data.sources=((DIR, weight), ...) for a mixture)")
  from sora_jax.data import schema  # the prepare side's format

  for source in sources:
    data_dir = source.path
    if not paths.is_dir(data_dir):
      raise TrainError(f"data dir {data_dir!r} does not exist; expected a dataset written by "
                       "sora_jax.prepare")
    if not paths.list_names(data_dir):
      raise TrainError(f"data dir {data_dir!r} is empty; expected a dataset written by sora_jax.prepare")
    try:
      schema.check_shards(data_dir, data.train_split)
    except (schema.DatasetError, OSError, ValueError) as error:
      raise TrainError(f"data dir {data_dir!r}: {error}") from error
  if len(sources) > 1:
    _check_same_encoders(sources)


def _check_same_encoders(sources: list[config_lib.DataSource]) -> None:
  """One TrainError naming the first two datasets of a mixture whose VAE, text encoder or tokenizer differ."""
  from sora_jax.data import schema

  def encoders(path: str) -> dict[str, Any]:
    try:
      metadata = schema.read_metadata(path)
    except (schema.DatasetError, OSError) as error:
      raise TrainError(f"data dir {path!r}: {error}") from error
    try:
      tokenizer = hashlib.sha256(paths.read_bytes(schema.tokenizer_path(path))).hexdigest()[:12]
    except (schema.DatasetError, OSError):
      tokenizer = None  # datasets written without their tokenizer (tests, conversions) train alike
    fields = {key: metadata.get(key) for key in ("vae", "latent_channels", "text_encoder", "text_dim")}
    return {**fields, "tokenizer": tokenizer}

  first = encoders(sources[0].path)
  for source in sources[1:]:
    other = encoders(source.path)
    for key, value in first.items():
      if key == "tokenizer" and None in (value, other[key]):
        continue  # a dataset written without its tokenizer cannot be compared
      if other[key] != value:
        raise TrainError(
            f"data.sources: {sources[0].path!r} and {source.path!r} were prepared with different {key} "
            f"({value!r} vs {other[key]!r}); a mixture's datasets must share the VAE, text encoder "
            f"and tokenizer (prepare each with the same data.pretrained / data.tokenizer)")


class _Preemption:
  """SIGTERM or a first Ctrl-C (SIGINT) -> a flag the loop polls; it then saves and returns cleanly.

  A second Ctrl-C aborts at once (exit 130): orbax commits a step atomically, so an abort mid-save
  leaves the previous step as the newest readable one.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = "SIGTERM"
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _Preemption:
    if threading.current_thread() is threading.main_thread():
      for signum in self._SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      # The second Ctrl-C: stop now, whatever is running (an exception raised here could surface
      # wrapped by a library mid-save). Orbax commits a step by renaming it into place, so the step
      # being written is never read back; the newest complete one is what a restart resumes from.
      print("sora_jax.train: interrupted twice: stopped without saving; a restart resumes from the "
            "newest complete checkpoint", file=sys.stderr, flush=True)
      os._exit(130)
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def agreed(self) -> bool:
    """Whether any process was asked to stop (every process must call this at the same steps)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def _flops_per_step(config: ml_collections.ConfigDict, lower: Any, latent_shape: tuple[int, ...],
                    global_batch: int) -> float | None:
  """Model FLOPs of one optimizer step: sora_jax.model.flops (remat not counted), else XLA's cost
  analysis of the lowered (global, unpartitioned) step; `lower()` lowers it only when needed."""
  try:
    from sora_jax.model import flops as flops_lib
    from sora_jax.model import lora as lora_lib

    frozen = lora_lib.spec_of(config.train) is not None  # a LoRA run: no gradient for the weights
    if config.data.packing:
      # A packed row attends over its whole token budget: count it as one clip of that many tokens.
      pt, ph, pw = config.model.patch_size
      row_shape = (pt, ph, pw * int(config.data.token_budget))
      per_row = flops_lib.train_flops_per_example(
          config.model, row_shape, int(config.data.max_segments) * config.data.text_len,
          per_token_timesteps=True, frozen_weights=frozen)
      return float(per_row) * global_batch
    per_example = flops_lib.train_flops_per_example(config.model, latent_shape, config.data.text_len,
                                                    frozen_weights=frozen)
    return float(per_example) * global_batch
  except (ImportError, AttributeError, TypeError, ValueError) as error:
    logging.warning("mfu: the analytic FLOPs of this config are unavailable (%s); MFU is from XLA's cost "
                    "analysis, which counts a scanned layer once and custom kernels not at all",
                    " ".join(str(error).split())[:200] or type(error).__name__)
  try:
    analysis = lower().cost_analysis()
    if isinstance(analysis, list | tuple):
      analysis = analysis[0]
    flops = float(analysis.get("flops", 0.0))
    return flops if flops > 0 else None
  except Exception:  # noqa: BLE001 - cost analysis is best effort on every backend
    return None


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    profile_steps: tuple[int, int] | None = None,
) -> dict[str, Any]:
  """Trains `config` in `workdir` until train.num_steps (resuming if checkpoints exist).

  Returns the last logged metrics plus `step` and `preempted`. Raises ConfigError / TrainError /
  CheckpointError with one clear message on bad input, before anything is compiled or written.
  """
  is_main = jax.process_index() == 0
  config_lib.validate(config, jax.device_count())
  check_data_dir(config.data)
  created = bool(workdir) and not paths.is_remote(workdir) and not os.path.exists(workdir)
  check_workdir(workdir)
  try:
    return _train(config, workdir, profile_steps, is_main)
  except BaseException:
    if created:
      _remove_if_no_files(workdir)  # a run that failed before writing anything leaves no empty workdir
    raise


def _remove_if_no_files(directory: str) -> None:
  """Deletes `directory` if nothing but (empty) directories lie below it."""
  for _, _, files in os.walk(directory):
    if files:
      return
  shutil.rmtree(directory, ignore_errors=True)


def _train(config: ml_collections.ConfigDict, workdir: str, profile_steps: tuple[int, int] | None,
           is_main: bool) -> dict[str, Any]:
  from sora_jax.data import pipeline  # data/ never imports train/; the loop imports data/

  config = stages.agree(config)  # every process starts a new stage from the same source step
  mesh = mesh_lib.create_mesh(config)
  trainable = step_lib.build(config, mesh)
  rules, setup = trainable.rules, trainable.setup

  t = config.train
  # Processes that hold the same rows of the batch (context / tensor parallel across hosts) read the
  # same data; the others disjoint shares.
  shard_index, shard_count = sharding_lib.process_batch_shard(trainable.batch_sharding, t.global_batch_size)
  sources = config_lib.data_sources(config.data)
  data_iterator = pipeline.make_iterator(
      config, [(s.path, s.weight) for s in sources], config.data.train_split, process_index=shard_index,
      process_count=shard_count, seed=int(config.data.shuffle_seed),
      batch_size_per_process=t.global_batch_size // shard_count)

  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  restored = checkpointer.restore_latest(setup.abstract_state, setup.shardings, data_iterator)
  if restored is None and trainable.frozen is not None:
    state = setup.init(jax.random.PRNGKey(int(t.seed)))  # fresh adapters on the weights of init_from
    start_step = 0
  elif restored is None and t.init_from and stages.parse_run(t.init_from) is not None:
    state = stages.initial_state(config, trainable.optimizer, setup, mesh)  # the next stage of a recipe
    start_step = 0
    logging.info("initialised from run %s (%s weights, optimizer %s)", t.init_from, t.init_weights,
                 t.init_optimizer)
  elif restored is None and t.init_from:
    from sora_jax.export import pretrained  # deferred: only runs that start from pretrained weights

    state = state_lib.state_from_params(pretrained.load_params(t.init_from, config.model), config,
                                        trainable.optimizer, setup)
    start_step = 0
    logging.info("initialised the DiT from %s", t.init_from)
  elif restored is None:
    state = setup.init(jax.random.PRNGKey(int(t.seed)))
    start_step = 0
  else:
    state, start_step = restored
    logging.info("resumed from checkpoint step %d", start_step)

  # A LoRA run's frozen weights: read from train.init_from at every start, never checkpointed.
  frozen = () if trainable.frozen is None else (
      state_lib.place_frozen(weights_lib.origin_weights(config, mesh, config.train.lora_base_dtype),
                             trainable.frozen),)
  if is_main:
    atomic.write_json(os.path.join(workdir, "config.json"), checkpoint_lib.config_to_json(config),
                      sort_keys=True)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, resume_step=start_step)
  progress = metrics_lib.Progress(int(t.num_steps), start_step, enabled=is_main)
  num_params = dit.count_params(state.params)
  adapted = f" adapter parameters on {dit.count_params(frozen[0]):,} frozen" if frozen else ""
  if start_step:
    progress.message(f"resuming from step {start_step} ({num_params:,}{adapted} parameters)")
  else:
    origin = f" from {t.init_from}" if t.init_from else ""
    progress.message(f"training {num_params:,}{adapted} parameters{origin} on {jax.device_count()} devices, "
                     f"mesh {dict(mesh.shape)}")

  batch_sharding, train_step = trainable.batch_sharding, trainable.train_step

  device_kind = jax.devices()[0].device_kind
  peak_flops = metrics_lib.peak_flops_per_device(device_kind)
  flops_per_step = None
  timer = metrics_lib.StepTimer()
  window_clips: list[jax.Array] = []
  window_tokens: list[jax.Array] = []
  # A mixture's per-source [loss sum, clips] of every step of the window (sources differ step to step).
  window_sources: list[tuple[jax.Array, jax.Array]] = []
  source_names = [s.name for s in sources] if len(sources) > 1 else []
  last_logged: dict[str, Any] = {}
  step = start_step
  preempted = False
  profiling = False
  # Multi-process runs agree on stopping through a collective, so poll it less often.
  preempt_every = 1 if jax.process_count() == 1 else max(1, min(int(t.log_every), 10))
  nonfinite_every = max(1, min(int(t.log_every), int(t.max_nonfinite_steps)))

  with _Preemption() as preemption, sharding_lib.mesh_context(mesh, rules):
    while step < t.num_steps:
      if profile_steps and step == profile_steps[0] and is_main:
        # The trace is written locally and, for a bucket workdir, uploaded when it stops.
        profile_out = mirror.OutputMirror(workdir, "profile")
        jax.profiler.start_trace(profile_out.path("profile"))
        profiling = True
      wait_start = time.perf_counter()
      local_batch = next(data_iterator)
      if step == start_step:
        _check_local_batch(local_batch, t.global_batch_size // shard_count)
      batch = pipeline.to_global(local_batch, mesh, batch_sharding)
      timer.add_data_wait(time.perf_counter() - wait_start)

      if flops_per_step is None and step == start_step:
        latent_shape = tuple(local_batch["latents"].shape[1:])
        flops_per_step = _flops_per_step(
            config, functools.partial(train_step.lower, state, batch, *frozen), latent_shape,
            t.global_batch_size) or 0.0
      state, step_metrics = train_step(state, batch, *frozen)
      step += 1
      timer.add_step()
      window_clips.append(step_metrics["num_clips"])
      window_tokens.append(step_metrics["num_tokens"])
      if "source_clips" in step_metrics:
        window_sources.append((step_metrics["source_loss_sum"], step_metrics["source_clips"]))

      if profiling and step >= profile_steps[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profile_out.close()
        profiling = False

      if step % nonfinite_every == 0 and int(step_metrics["nonfinite_run"]) >= t.max_nonfinite_steps:
        state = _roll_back(checkpointer, setup, state, step, progress)

      if step % t.log_every == 0 or step == t.num_steps:
        last_logged = _log(writer, progress, step, step_metrics, timer, window_clips, window_tokens,
                           flops_per_step, peak_flops, int(t.sigma_buckets),
                           _source_metrics(source_names, window_sources, data_iterator))

      if step % preempt_every == 0 and preemption.agreed():
        preempted = True
        progress.message(f"{preemption.signal_name}: saving step {step} and exiting")
        checkpointer.save(step, state, data_iterator)
        break
      if step % config.checkpoint.every_steps == 0:
        checkpointer.save(step, state, data_iterator)
        writer.flush()  # a bucket's metrics.jsonl holds every row up to the newest checkpoint

  if profiling:
    jax.profiler.stop_trace()
    profile_out.close()
  if not preempted and step not in checkpointer.all_steps():
    checkpointer.save(step, state, data_iterator)
  checkpointer.close()
  progress.close()
  writer.close()
  return {**last_logged, "step": step, "preempted": preempted}


def _check_local_batch(batch: dict[str, Any], local_batch_size: int) -> None:
  """One clear error (or warning) about the first batch, before the step compiles for it."""
  for key in ("latents", "text_embeds"):
    if key not in batch:
      raise TrainError(f"the data pipeline's batch has no {key!r}; got keys {sorted(batch)}")
  rows = batch["latents"].shape[0]
  if rows != local_batch_size:
    raise TrainError(
        f"the data pipeline returned {rows} clips per process; expected train.global_batch_size / "
        f"processes with distinct batch rows = {local_batch_size}")
  if not all(np.all(np.isfinite(np.asarray(batch[key], np.float32))) for key in ("latents", "text_embeds")):
    logging.warning("first batch holds non-finite latents or text embeddings; those steps will be skipped")


def _roll_back(checkpointer: checkpoint_lib.Checkpointer, setup: state_lib.StateSetup, state: Any,
               step: int, progress: metrics_lib.Progress) -> Any:
  """Restores the newest checkpoint's state after too many consecutive non-finite steps."""
  checkpointer.wait()
  restored = checkpointer.restore_latest(setup.abstract_state, setup.shardings, data_iterator=None)
  if restored is None:
    raise TrainError(
        f"step {step}: {int(state.nonfinite_run)} consecutive non-finite losses or gradients and no "
        f"checkpoint to roll back to; lower train.learning_rate or check the data for NaNs")
  good_state, good_step = restored
  progress.message(
      f"step {step}: {int(state.nonfinite_run)} consecutive non-finite steps; rolled back to the "
      f"parameters of checkpoint step {good_step} (the data stream moves on)")
  # Keep the step counter and skip count moving forward so step keys and logs stay monotonic.
  return good_state.replace(step=state.step, skipped_steps=state.skipped_steps,
                            nonfinite_run=jnp.zeros_like(state.nonfinite_run))


def _source_metrics(names: list[str], window: list[tuple[jax.Array, jax.Array]],
                    data_iterator: Any) -> dict[str, float]:
  """A mixture's `loss_source/<name>` (mean clip loss over the window's clips of that source, where
  it had any) and `clips_seen/<name>` (from the start of the stream); nothing for one dataset."""
  if not names:
    return {}
  fetched = jax.device_get(window)
  window.clear()
  loss_sums = np.sum([np.asarray(loss) for loss, _ in fetched], axis=0) if fetched else np.zeros(len(names))
  clips = np.sum([np.asarray(count) for _, count in fetched], axis=0) if fetched else np.zeros(len(names))
  record = {f"loss_source/{name}": float(loss_sums[k] / clips[k])
            for k, name in enumerate(names) if clips[k] > 0}
  seen = data_iterator.clips_seen()
  record.update({f"clips_seen/{name}": int(seen[k]) for k, name in enumerate(names)})
  return record


def _log(writer: metrics_lib.MetricsWriter, progress: metrics_lib.Progress, step: int,
         step_metrics: dict[str, jax.Array], timer: metrics_lib.StepTimer, window_clips: list,
         window_tokens: list, flops_per_step: float | None, peak_flops: float | None,
         num_buckets: int, source_metrics: dict[str, float]) -> dict[str, Any]:
  """Fetches the step's metrics (one host sync per logged step) and writes every sink."""
  fetched = jax.device_get(step_metrics)
  clips = float(sum(np.asarray(x) for x in jax.device_get(window_clips)))
  tokens = float(sum(np.asarray(x) for x in jax.device_get(window_tokens)))
  window_clips.clear()
  window_tokens.clear()
  timing = timer.summary()
  window_time = timing["step_time_s"] * max(timing["window_steps"], 1)
  examples_per_s = clips / window_time
  mfu = None
  if flops_per_step and peak_flops:
    mfu = flops_per_step / timing["step_time_s"] / (peak_flops * jax.device_count())
  loss = float(fetched["loss"])
  record = {
      "loss": loss,
      "grad_norm": float(fetched["grad_norm"]),
      "param_norm": float(fetched["param_norm"]),
      "lr": float(fetched["lr"]),
      "skipped_steps": int(fetched["skipped_steps"]),
      "spike_steps": int(fetched["spike_steps"]),
      "step_time_s": timing["step_time_s"],
      "examples_per_s": examples_per_s,
      "tokens_per_s": tokens / window_time,
      "mfu": mfu,
      "data_wait_frac": timing["data_wait_frac"],
  }
  if "expert" in fetched:
    # Two experts: which one this step trained (0 = high noise, 1 = low) and its loss under its own name.
    expert = int(fetched["expert"])
    record["expert"] = expert
    record[f"loss_expert/{EXPERTS[expert]}"] = loss
  sums, counts = fetched["sigma_bucket_loss_sum"], fetched["sigma_bucket_count"]
  for index in range(num_buckets):
    if counts[index] > 0:
      record[f"loss_sigma/{index / num_buckets:.2f}-{(index + 1) / num_buckets:.2f}"] = float(
          sums[index] / counts[index])
  record.update(source_metrics)
  record.update(metrics_lib.device_memory_stats())
  writer.write(step, record)
  progress.update(step, loss if np.isfinite(loss) else None, timing["step_time_s"], examples_per_s)
  return record


# The name flax's examples use for this entry point; kept for callers written against it.
train_and_evaluate = train
