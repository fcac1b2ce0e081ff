"""Scores checkpoints of a run: validation loss per sigma, sample videos and their scores, reports.

Owns what one evaluation of one step writes (W/eval/<step>.json, the loss-vs-sigma PNG,
W/samples/<step>/<weight set>/ videos and contact sheets, TensorBoard under W/tensorboard/eval) and
the step selection loops (one step, all steps, watch for new ones until the run's final step). The
scores of samples (adherence, CLIP score, FVD) are `sample_scores`; tables and curves are `report`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from sora_jax import config as config_lib
from sora_jax.evaluation import adherence, media, prompt_suite, report, sample_scores, sampling, val_loss
from sora_jax.evaluation import continuation as continuation_lib
from sora_jax.files import atomic, mirror, paths
from sora_jax.parallel import agreement
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import checkpoint as checkpoint_lib
from sora_jax.train import restore_choice
from sora_jax.train import run_weights as weights_lib

EVAL_DIR = "eval"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = os.path.join("tensorboard", "eval")


class EvalError(ValueError):
  """Eval input that cannot be scored: no data dir, no prompts, an unknown step."""


@dataclasses.dataclass
class Evaluator:
  """Everything that stays the same across checkpoints of one run: model, inputs, compiled functions."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: Any
  batches: list[dict[str, np.ndarray]]
  entries: list[prompt_suite.PromptEntry]  # what is sampled: the prompt suite, then adherence prompts
  cond: np.ndarray | None  # None: no encoders, so no samples (samples_skipped says why)
  uncond: np.ndarray | None
  sampler: sampling.Sampler | None
  vae: Any
  log: Callable[[str], None] = print
  samples_skipped: str = ""
  scorers: sample_scores.Scorers = dataclasses.field(default_factory=sample_scores.Scorers)
  # {prompt: the extended text sampled in its place} for --extend_prompt (config.eval.prompts only).
  extended_prompts: dict[str, str] = dataclasses.field(default_factory=dict)
  continuation: continuation_lib.Continuation | None = None  # eval.continue_clips > 0
  # Where results, plots, samples and TensorBoard events are written (uploaded for a bucket workdir).
  out: mirror.OutputMirror | None = None
  # A mixture (data.sources): {source name: (its weight, its held-out batches)}; `batches` is the first's.
  source_batches: dict[str, tuple[float, list[dict[str, np.ndarray]]]] = dataclasses.field(
      default_factory=dict)

  def __post_init__(self):
    if self.out is None:
      self.out = mirror.OutputMirror(self.workdir, "eval")

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def prompts(self) -> list[str]:
    return [entry.prompt for entry in self.entries]


def eval_entries(eval_config: ml_collections.ConfigDict) -> list[prompt_suite.PromptEntry]:
  """eval.prompt_file's entries (or eval.prompts), then eval.adherence_prompts seeded synthetic prompts
  (no duplicates)."""
  entries = prompt_suite.from_config(eval_config)
  seen = {entry.prompt for entry in entries}
  for prompt in adherence.synthetic_prompts(int(eval_config.adherence_prompts), seed=int(eval_config.seed)):
    if prompt not in seen:
      entries.append(prompt_suite.PromptEntry(prompt, dimension="adherence"))
      seen.add(prompt)
  if not entries:
    raise EvalError("no prompts to sample: set config.eval.prompts, config.eval.prompt_file or "
                    "config.eval.adherence_prompts")
  return entries


def build(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
          log: Callable[[str], None] = print,
          extend_prompt: Callable[[str], str] | None = None) -> Evaluator:
  """Reads the eval examples, encodes the prompts and builds the sampler (once per eval process).

  `extend_prompt` rewrites each of config.eval.prompts before it is encoded (the synthetic adherence
  prompts stay as they are: the detector reads them).
  """
  from sora_jax.encoders import text_encoder as text_encoder_lib
  from sora_jax.encoders import vae as vae_lib
  from sora_jax.model.dit import DiT

  sources = config_lib.data_sources(config.data)
  if not sources:
    raise EvalError("config.data.dir is empty; pass --config.data.dir=<prepared dataset> to score the "
                    "held-out split")
  if not paths.is_dir(workdir):
    raise EvalError(f"workdir {workdir!r} does not exist")
  source_batches = {}
  if len(sources) > 1:
    source_batches = {
        s.name: (s.weight, list(val_loss.eval_batches(config, s.path, mesh, mixture_source=True)))
        for s in sources}
    batches = source_batches[sources[0].name][1]
  else:
    batches = list(val_loss.eval_batches(config, sources[0].path, mesh))
  entries = eval_entries(config.eval)
  settings = sampling.SampleSettings.from_config(config)
  model = DiT(config.model)
  # The validation loss needs only the prepared latents and text embeddings; samples need the encoders.
  reason = ""
  try:
    vae = vae_lib.get_vae(config)
    encoder = text_encoder_lib.get_text_encoder(config)
  except (vae_lib.VAEUnavailable, text_encoder_lib.TextEncoderUnavailable) as missing:
    reason = f"no samples or adherence: {missing}"
  if agreement.any_process(bool(reason)):  # every process samples, or none does
    reason = reason or "no samples or adherence: another process has no VAE or text encoder"
    log(f"eval: {reason}; scoring the validation loss only")
    return Evaluator(config=config, workdir=workdir, mesh=mesh, model=model, batches=batches,
                     source_batches=source_batches,
                     entries=entries, cond=None, uncond=None, sampler=None, vae=None, log=log,
                     samples_skipped=reason, scorers=sample_scores.Scorers.skipped(config.eval, reason))
  extended = {}
  if extend_prompt is not None:
    for entry in entries:
      if entry.dimension != "adherence":  # the detector reads the synthetic prompts as they are
        extended[entry.prompt] = extend_prompt(entry.prompt)
        log(f"eval: extended prompt {entry.prompt!r} -> {extended[entry.prompt]!r}")
  cond, uncond = sampling.encode_entries(encoder, entries, settings, extended)
  sampler = sampling.Sampler(model, config, settings, mesh)
  evaluator = Evaluator(
      config=config, workdir=workdir, mesh=mesh, model=model, batches=batches, entries=entries,
      source_batches=source_batches, cond=cond, uncond=uncond, sampler=sampler, vae=vae, log=log,
      extended_prompts=extended,
      scorers=sample_scores.open_scorers(config, workdir, vae, log, is_main=jax.process_index() == 0),
      continuation=continuation_lib.build(config, model, batches, settings, vae, mesh))
  # Process 0 may have spent long on the FVD reference: the others wait here, not in a timed barrier.
  agreement.meet("sora_jax_eval_built")
  return evaluator


def agreed_stop(should_stop: Callable[[], bool]) -> bool:
  """`should_stop()` of any process, on every process: SIGTERM reaches the hosts at different moments, and
  they must stop between the same two steps."""
  return agreement.any_process(should_stop())


class StepVanished(Exception):
  """A checkpoint step deleted (by the run's retention) while eval read it, on this or another process."""


_READ, _GONE, _DAMAGED, _FAILED = range(4)  # a step's restore on one process; the largest code wins


def _restore_agreed(evaluator: Evaluator, step: int) -> dict[str, Any]:
  """Every weight set of `step`, or the same kind of error on every process: one process's damaged,
  deleted or unreadable step is every process's, so all of them go on to the same next step."""
  workdir = evaluator.workdir
  code, error = _READ, None
  try:
    weight_sets = weights_lib.restore_weights(workdir, step, evaluator.config, evaluator.mesh)
  except weights_lib.DamagedCheckpoint as caught:
    code, error = _DAMAGED, caught
  except Exception as caught:  # noqa: BLE001 - retention may delete a step while it is read
    code, error = (_FAILED if _still_exists(workdir, step) else _GONE), caught
  codes = agreement.every_process(code)
  worst = max(codes)
  if worst == _READ:
    return weight_sets
  if code == worst:
    if code == _GONE:
      raise StepVanished(type(error).__name__) from error
    raise error
  process = codes.index(worst)
  if worst == _DAMAGED:
    raise weights_lib.DamagedCheckpoint(f"checkpoint step {step} of {workdir!r} is unreadable on process "
                                        f"{process}")
  if worst == _GONE:
    raise StepVanished(f"on process {process}")
  raise RuntimeError(f"process {process} could not read checkpoint step {step} of {workdir!r}")


def _validation_losses(evaluator: Evaluator, weight_sets: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """val_loss.validation_loss of every weight set; for a mixture, each source's held-out split under
  "loss_by_source", and "loss" / "loss_by_sigma" their mean by the mixture's weights."""
  cfg, mesh = evaluator.config, evaluator.mesh
  if not evaluator.source_batches:
    return val_loss.validation_loss(weight_sets, evaluator.model, cfg, evaluator.batches, mesh)
  by_source = {source: val_loss.validation_loss(weight_sets, evaluator.model, cfg, batches, mesh)
               for source, (_, batches) in evaluator.source_batches.items()}
  results = {}
  for name in weight_sets:
    by_sigma = sum(weight * np.asarray(by_source[source][name]["loss_by_sigma"])
                   for source, (weight, _) in evaluator.source_batches.items())
    results[name] = {"loss": float(np.mean(by_sigma)), "loss_by_sigma": [float(v) for v in by_sigma],
                     "loss_by_source": {source: losses[name] for source, losses in by_source.items()}}
  return results


def result_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, EVAL_DIR, f"{step}.json")


def evaluated_steps(workdir: str) -> set[int]:
  """Steps that already have W/eval/<step>.json."""
  directory = os.path.join(workdir, EVAL_DIR)
  if not paths.is_dir(directory):
    return set()
  return {int(name[:-5]) for name in paths.list_names(directory)
          if name.endswith(".json") and name[:-5].isdigit()}


def _write_json(path: str, data: dict[str, Any]) -> None:
  """Atomic, so a reader (or a --watch restart) never sees half a result."""
  atomic.write_json(path, data)


def evaluate_step(evaluator: Evaluator, step: int) -> dict[str, Any]:
  """Evaluates every weight set of checkpoint `step`; returns (and on process 0 writes) the results."""
  cfg, workdir = evaluator.config, evaluator.workdir
  start = time.time()
  weight_sets = _restore_agreed(evaluator, step)
  losses = _validation_losses(evaluator, weight_sets)
  loss_seconds = time.time() - start
  sigmas = [round(float(s), 6) for s in val_loss.sigma_grid(cfg.eval)]
  scored = [batches for _, batches in evaluator.source_batches.values()] or [evaluator.batches]
  # Processes that hold the same rows (context or tensor parallelism across hosts) count them once.
  shards = val_loss.process_shard(evaluator.mesh, sharding_lib.logical_rules(cfg.mesh))[1]
  num_examples = sum(b["latents"].shape[0] for batches in scored for b in batches) * shards
  sampler = evaluator.sampler
  results: dict[str, Any] = {
      "step": step, "sigma_grid": sigmas, "num_examples": num_examples,
      "prompts": evaluator.prompts if sampler else [],
      "sampler": dataclasses.asdict(sampler.settings) if sampler else None, "weight_sets": {}}
  if evaluator.extended_prompts:
    results["extended_prompts"] = dict(evaluator.extended_prompts)
  if any(entry.dimension and entry.dimension != "adherence" for entry in evaluator.entries):
    results["dimensions"] = [entry.dimension for entry in evaluator.entries]
  if not sampler:
    results["samples_skipped"] = evaluator.samples_skipped
  results.update(evaluator.scorers.skipped_fields())
  for name, params in weight_sets.items():
    if not sampler:
      results["weight_sets"][name] = {**losses[name]}
      continue
    entry: dict[str, Any] = {**losses[name]}
    entry.update(_sample_and_score(evaluator, step, name, params))
    if evaluator.continuation is not None:
      continued_scores, continued = continuation_lib.run(evaluator.continuation, params, evaluator.vae,
                                                         cfg.data)
      if evaluator.is_main:
        entry["continuation"] = continued_scores
        entry["files"]["continuation"] = _write_continuation(evaluator, step, name, continued)
    results["weight_sets"][name] = entry
  results["seconds"] = {"val_loss": round(loss_seconds, 2), "total": round(time.time() - start, 2)}
  if evaluator.is_main:
    plot = evaluator.out.path(EVAL_DIR, f"{step}_loss_vs_sigma.png")
    media.write_loss_plot(plot, sigmas, {n: e["loss_by_sigma"] for n, e in results["weight_sets"].items()},
                          title=f"validation loss vs sigma, step {step}")
    results["loss_plot"] = plot
    _write_tensorboard(evaluator, step, results)
    results = evaluator.out.final(results)  # the files named where they end up (in a bucket workdir)
    results["json"] = result_path(workdir, step)
    _write_json(evaluator.out.path(EVAL_DIR, f"{step}.json"), results)
    evaluator.out.publish(prune=True)
  agreement.meet(f"sora_jax_eval_step_{step}")  # the others wait while process 0 writes, then go on together
  return results


def _sample_and_score(evaluator: Evaluator, step: int, weight_set: str, params: Any) -> dict[str, Any]:
  """Samples every entry with `params`, eval.sample_batch_size prompts per sampler call; process 0
  decodes, scores and writes each call's videos before the next: host memory holds one call's videos
  and a contact-sheet row per prompt, whatever the number of prompts. Returns (on process 0)
  "nonfinite_samples", the sample scores and "files"; the other processes only take part in sampling."""
  sampler, entries = evaluator.sampler, evaluator.entries
  # No larger than the prompts: a suite smaller than eval.sample_batch_size is one call, padded no further.
  size = sampler.call_size(min(max(int(evaluator.config.eval.sample_batch_size), 1), len(entries)))
  main = evaluator.is_main
  scoring = sample_scores.SampleScoring(evaluator.scorers, entries, evaluator.log) if main else None
  writer = _SampleWriter(evaluator, step, weight_set) if main else None
  nonfinite = 0
  for start in range(0, len(entries), size):
    part = slice(start, start + size)
    noise = sampler.entry_noise([entry.seed for entry in entries[part]], first_index=start)
    latents = sampler.latents(params, evaluator.cond[part], evaluator.uncond[part], noise=noise, pad_to=size)
    if not main:
      continue  # every process samples (one computation over the mesh); process 0 has the latents
    videos, bad = sampling.decode_to_frames(evaluator.vae, latents)
    nonfinite += bad
    scoring.add(videos)
    writer.add(videos)
  if not main:
    return {}
  out: dict[str, Any] = {"nonfinite_samples": nonfinite, **scoring.result()}
  out["files"] = writer.finish(out.get("clip"))
  return out


class _SampleWriter:
  """Writes one weight set's sample videos (mp4 and GIF) as they are decoded, keeping only each one's
  contact-sheet row (`media.sheet_row`) for the sheets written at the end."""

  def __init__(self, evaluator: Evaluator, step: int, weight_set: str):
    self.evaluator = evaluator
    self.directory = evaluator.out.path(SAMPLES_DIR, str(step), weight_set)
    os.makedirs(self.directory, exist_ok=True)
    self.rows: list[np.ndarray] = []
    self.mp4s: list[str] = []
    self.gifs: list[str] = []

  def add(self, videos: list[np.ndarray]) -> None:
    evaluator = self.evaluator
    fps = float(evaluator.config.data.fps)
    for video in videos:
      index = len(self.rows)
      prompt = evaluator.prompts[index]
      base = os.path.join(self.directory, f"{index:02d}_{sampling.slug(prompt)}")
      media.write_mp4(base + ".mp4", video, fps)
      media.write_gif(base + ".gif", video, fps)
      if prompt in evaluator.extended_prompts:
        atomic.write_json(base + ".prompt.json",
                          {"prompt": prompt, "extended_prompt": evaluator.extended_prompts[prompt]})
      self.mp4s.append(base + ".mp4")
      self.gifs.append(base + ".gif")
      self.rows.append(media.sheet_row(video))

  def finish(self, clip: dict[str, Any] | None) -> dict[str, Any]:
    """The contact sheets (all prompts, and per prompt-suite dimension); the files written."""
    evaluator, rows = self.evaluator, self.rows
    labels = list(evaluator.prompts)
    if clip:  # the sheet shows what the CLIP score saw
      labels = [f"{label}  [clip {score['clip_score']:.1f}]"
                for label, score in zip(labels, clip["per_prompt"], strict=True)]
    sheet = os.path.join(self.directory, "contact_sheet.png")
    media.write_png(sheet, media.compose_sheet(rows, labels))
    files: dict[str, Any] = {"mp4": self.mp4s, "gif": self.gifs, "contact_sheet": sheet}
    groups = prompt_suite.by_dimension(evaluator.entries)
    if len(groups) > 1:
      files["contact_sheets_by_dimension"] = {}
      for dimension, indices in groups.items():
        path = os.path.join(self.directory, f"contact_sheet_{sampling.slug(dimension)}.png")
        media.write_png(path, media.compose_sheet([rows[i] for i in indices], [labels[i] for i in indices]))
        files["contact_sheets_by_dimension"][dimension] = path
    return files


def _write_continuation(evaluator: Evaluator, step: int, weight_set: str,
                        continued: dict[int, list[np.ndarray]]) -> dict[str, str]:
  """Per given-frame count: a contact sheet (the real held-out clip above each continuation) and the
  continued clips as mp4 and gif, `continued_given_<k>/<clip>.mp4`."""
  directory = evaluator.out.path(SAMPLES_DIR, str(step), weight_set)
  fps = float(evaluator.config.data.fps)
  files: dict[str, Any] = {}
  for k, videos in continued.items():
    clips = os.path.join(directory, f"continued_given_{k}")
    os.makedirs(clips, exist_ok=True)
    path = os.path.join(directory, f"continuation_given_{k}.png")
    real = evaluator.continuation.real_videos
    pairs = [video for pair in zip(real, videos, strict=True) for video in pair]
    labels = [label for i in range(len(videos)) for label in (f"real clip {i}", f"from {k} latent frames")]
    media.write_png(path, media.contact_sheet(pairs, labels))
    mp4s = []
    for index, video in enumerate(videos):
      base = os.path.join(clips, f"{index:02d}")
      media.write_mp4(base + ".mp4", video, fps)
      media.write_gif(base + ".gif", video, fps)
      mp4s.append(base + ".mp4")
    files[f"given_{k}"] = {"contact_sheet": path, "mp4": mp4s}
  return files


def _write_tensorboard(evaluator: Evaluator, step: int, results: dict[str, Any]) -> None:
  from tensorboardX import SummaryWriter

  writer = SummaryWriter(evaluator.out.path(TENSORBOARD_DIR))
  try:
    for name, entry in results["weight_sets"].items():
      writer.add_scalar(f"{name}/val_loss", entry["loss"], global_step=step)
      for sigma, loss in zip(results["sigma_grid"], entry["loss_by_sigma"], strict=True):
        writer.add_scalar(f"{name}/val_loss_sigma_{sigma:.2f}", loss, global_step=step)
      for source, losses in entry.get("loss_by_source", {}).items():
        writer.add_scalar(f"{name}/val_loss_source/{source}", losses["loss"], global_step=step)
      for attribute, value in (entry.get("adherence") or {}).items():
        if attribute != "num_samples" and value is not None:
          writer.add_scalar(f"{name}/adherence_{attribute}", value, global_step=step)
      for tag, value in sample_scores.scalars(entry).items():
        writer.add_scalar(f"{name}/{tag}", value, global_step=step)
      sheet = entry.get("files", {}).get("contact_sheet")
      if sheet:
        from PIL import Image

        with Image.open(sheet) as image:
          writer.add_image(f"{name}/contact_sheet", np.asarray(image.convert("RGB")), global_step=step,
                           dataformats="HWC")
  finally:
    writer.close()


def summary_line(results: dict[str, Any]) -> str:
  """One human line per weight set: loss, adherence and where the videos are."""
  lines = []
  for name, entry in results["weight_sets"].items():
    text = f"step {results['step']} {name}: val_loss {entry['loss']:.4f}"
    if entry.get("fvd"):
      fvd = entry["fvd"]
      text += f" | FVD {fvd['fvd']:.1f} ({fvd['generated_clips']} clips, {fvd['model']})"
    if entry.get("clip"):
      text += (f" | clip_score {entry['clip']['clip_score']:.2f}, consistency "
               f"{entry['clip']['clip_consistency']:.2f}")
    score = entry.get("adherence")
    if score:
      parts = [f"{a} {score[a]:.0%}" for a in adherence.ATTRIBUTES if score.get(a) is not None]
      text += f" | adherence ({score['num_samples']} samples): " + ", ".join(parts)
    lines.append(text)
  return "\n".join(lines)


def where_line(results: dict[str, Any]) -> str:
  """Where one step's results, videos and contact sheets are, for the end of a run."""
  step = results["step"]
  lines = [f"eval results:   {results.get('json', '')}  (loss vs sigma: {results.get('loss_plot', '')})"]
  for name, entry in results["weight_sets"].items():
    files = entry.get("files")
    if files:
      lines.append(f"{name} videos:  {os.path.dirname(files['contact_sheet'])}/*.mp4 and *.gif "
                   f"({len(files['mp4'])} prompts, step {step})")
      lines.append(f"{name} contact sheet: {files['contact_sheet']}")
  return "\n".join(lines)


def _still_exists(workdir: str, step: int) -> bool:
  return paths.is_dir(os.path.dirname(checkpoint_lib.item_path(workdir, step, checkpoint_lib.STATE_ITEM)))


def evaluate_steps(evaluator: Evaluator, steps: list[int], *, skip_damaged: bool = False,
                   first_readable: bool = False) -> list[dict[str, Any]]:
  """Evaluates `steps` in order; a checkpoint deleted while being read is skipped with a warning.

  A damaged checkpoint raises, unless `skip_damaged` (one warning line each). `first_readable` stops
  after the first step that evaluates (pass the steps newest first for "the newest readable one").
  When every step given is damaged, that is one error listing them.
  """
  all_results, damaged = [], []
  for step in steps:
    try:
      results = evaluate_step(evaluator, step)
    except StepVanished as error:
      evaluator.log(f"checkpoint step {step} was deleted while being evaluated ({error}); skipped")
      continue
    except weights_lib.DamagedCheckpoint as error:
      if not (skip_damaged or first_readable):
        raise
      damaged.append(f"step {step}: {error}")
      evaluator.log(f"warning: checkpoint step {step} is unreadable ({error}); skipped")
      continue
    except Exception as error:  # noqa: BLE001 - retention may delete a step while it is read
      if _still_exists(evaluator.workdir, step):
        raise
      evaluator.log(f"checkpoint step {step} was deleted while being evaluated ({type(error).__name__}); "
                    f"skipped")
      logging.warning("checkpoint step %d vanished during eval: %s", step, error)
      continue
    evaluator.log(summary_line(results))
    all_results.append(results)
    if first_readable:
      break
  if damaged and not all_results and len(damaged) == len(steps):
    raise weights_lib.DamagedCheckpoint(
        f"no readable checkpoint in {evaluator.workdir!r}: " + "; ".join(damaged))
  return all_results


def run_final_step(workdir: str, steps: list[int], fallback: int | None) -> int | None:
  """train.num_steps of the run, as the config saved with its newest readable checkpoint gives it;
  `fallback` (the --config's) before any checkpoint is readable."""
  for step in reversed(steps):
    try:
      return int(weights_lib.saved_config(workdir, step).train.num_steps)
    except (weights_lib.DamagedCheckpoint, ValueError, OSError):
      continue
  return fallback


def watch(evaluator: Evaluator, interval_s: float, should_stop: Callable[[], bool],
          final_step: int | None = None) -> list[dict[str, Any]]:
  """Polls for new checkpoints and evaluates each exactly once (also across restarts of the binary).

  Stops when `should_stop()` (SIGTERM) or once the run's final step has been evaluated: train.num_steps
  of the config saved with the run's checkpoints (`final_step` until one is readable). After each new
  step the metric curves across steps are redrawn. In a multi-process eval, process 0's listings and
  any process's stop hold for all (`agreed_stop`), so every process evaluates the same steps.
  """
  stop = lambda: agreed_stop(should_stop)
  done = set(restore_choice.agreed_steps(evaluated_steps(evaluator.workdir)))
  all_results = []
  stopping = stop()
  while not stopping:
    steps = restore_choice.agreed_steps(weights_lib.list_steps(evaluator.workdir))
    new = [s for s in steps if s not in done]
    for step in new:
      stopping = stop()
      if stopping:
        break
      try:
        all_results += evaluate_steps(evaluator, [step], skip_damaged=True)
      except weights_lib.DamagedCheckpoint:
        pass  # warned; a damaged step is not retried
      done.add(step)
    if new and evaluator.is_main:
      write_curves(evaluator)
    if stopping:
      break
    last = agreement.process_0_json(run_final_step(evaluator.workdir, steps, final_step))
    if last is not None and any(s >= last for s in done):
      evaluator.log(f"evaluated the final step {max(done)}; watch ends")
      break
    deadline = time.time() + interval_s
    while time.time() < deadline and not should_stop():  # this process's own signal: no collective
      time.sleep(min(0.2, interval_s))
    stopping = stop()
  return all_results


def write_curves(evaluator: Evaluator) -> dict[str, str]:
  """Redraws W/eval/<metric>_vs_step.png from every saved result; {metric: where it ends up}."""
  curves = report.write_curves(evaluator.out.local, saved_results(evaluator.workdir))
  evaluator.out.publish(prune=True)
  return evaluator.out.final(curves)


def saved_results(workdir: str) -> list[dict[str, Any]]:
  """Every W/eval/<step>.json of the run (unreadable ones left out), oldest step first."""
  results = []
  for step in sorted(evaluated_steps(workdir)):
    try:
      results.append(json.loads(paths.read_text(result_path(workdir, step))))
    except (OSError, ValueError):
      continue
  return results


def wait_for_workdir(workdir: str, interval_s: float, should_stop: Callable[[], bool],
                     log: Callable[[str], None] = print) -> bool:
  """Waits until `workdir` exists (a watch started before the trainer); False if stopped first."""
  if paths.is_dir(workdir):
    return True
  log(f"waiting for {workdir} to appear (every {interval_s:g} s; SIGTERM stops)")
  while not should_stop():
    if paths.is_dir(workdir):
      return True
    deadline = time.time() + interval_s
    while time.time() < deadline and not should_stop():
      time.sleep(min(0.2, interval_s))
  return paths.is_dir(workdir)
