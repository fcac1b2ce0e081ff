"""A run's checkpoint as a whole diffusers Wan pipeline directory (`export --format=diffusers_pipeline`).

Owns assembling what `diffusers.WanPipeline.from_pretrained(DIR)` reads: the trained transformer
(`conversion.write_transformer_files`), the VAE, umT5 and tokenizer of the pipeline the run encoded its
data with (`data.pretrained`, or `--pretrained`), a scheduler config that samples as the run's config
says (`diffusion.sampler`, `sample_shift`), and `model_index.json`. All of it appears at once: the
directory is staged beside `--out` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import ml_collections

from sora_jax.diffusion import experts as experts_lib
from sora_jax.encoders import fast_tokenizer, wan_vae_config
from sora_jax.files import atomic, layout
from sora_jax.offline import conversion
from sora_jax.train import run_weights as weights_lib

# What a released Wan2.1 diffusers pipeline names its parts; a source pipeline's own entries win.
COMPONENTS = {
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
}


def scheduler_config(d: ml_collections.ConfigDict) -> dict[str, Any]:
  """The diffusers scheduler that samples as sora_jax's `diffusion.sampler` does (flow UniPC or Euler)."""
  if d.sampler == "euler":
    return {"_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": int(d.num_train_timesteps), "shift": float(d.sample_shift),
            "use_dynamic_shifting": False}
  # Wan2.1's released scheduler: UniPC (bh2, order 2) on flow sigmas, predicting x0 from the flow.
  return {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": int(d.num_train_timesteps),
          "prediction_type": "flow_prediction", "use_flow_sigmas": True,
          "flow_shift": float(d.sample_shift),
          "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
          "final_sigmas_type": "zero", "timestep_spacing": "linspace", "steps_offset": 0,
          "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "disable_corrector": []}


def source_pipeline(data: ml_collections.ConfigDict, pretrained: str | None) -> str:
  """The pipeline directory whose encoders go with the run; one error naming what is missing."""
  if data.vae != "wan" or data.text_encoder != "umt5":
    raise conversion.ExportError(
        f"--format=diffusers_pipeline needs a run on the Wan VAE and umT5 (data.vae='wan', "
        f"data.text_encoder='umt5'); this run uses data.vae={data.vae!r}, data.text_encoder="
        f"{data.text_encoder!r}, which no diffusers WanPipeline can run: export --format=diffusers for "
        f"the transformer alone")
  root = pretrained or data.pretrained
  layout.required_root(root, "--format=diffusers_pipeline", "the VAE, umT5 and tokenizer it shipped with "
                       "(or pass --pretrained=DIR)", conversion.ExportError)
  field = "--pretrained" if pretrained else "data.pretrained"
  layout.vae_dir(root, field)
  layout.text_encoder_dir(root, field)
  layout.tokenizer_path(root, field)
  return root


def _copy_tokenizer(source: str, target: str, text_len: int) -> list[str] | None:
  """Copies the source pipeline's tokenizer directory; returns the model index entry it needs when a bare
  sentencepiece model had to be given the tokenizer.json and tokenizer_config.json transformers reads
  (umT5's own directory ships both), else None."""
  shutil.copytree(source, target)
  if os.path.isfile(os.path.join(target, layout.FAST_TOKENIZER_FILE)):
    return None
  with open(os.path.join(target, layout.TOKENIZER_FILE), "rb") as f:
    converted = fast_tokenizer.tokenizer_json(f.read())
  atomic.write_json(os.path.join(target, layout.FAST_TOKENIZER_FILE), converted, indent=None)
  # transformers' T5 class reads Unigram models only; the generic fast class reads any tokenizer.json.
  name = "T5TokenizerFast" if converted["model"]["type"] == "Unigram" else "PreTrainedTokenizerFast"
  settings = {"tokenizer_class": name, "model_max_length": int(text_len), "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>"}
  if name == "T5TokenizerFast":
    settings["extra_ids"] = 0  # the model's own pieces only: no sentinel tokens added on top
  atomic.write_json(os.path.join(target, layout.TOKENIZER_CONFIG_FILE), settings)
  return ["transformers", name]


def export_pipeline(workdir: str, out: str, *, step: int | None = None, ema: float | None = None,
                    dtype: str = "fp32", pretrained: str | None = None, overwrite: bool = False,
                    max_shard_bytes: int = conversion.safetensors_io.DEFAULT_MAX_SHARD_BYTES
                    ) -> conversion.ExportResult:
  """Writes the whole pipeline of checkpoint `step` (default: newest; raw or `ema` weights) to `out`."""
  conversion.check_dtype(dtype)
  conversion.check_output(out, overwrite)
  name = conversion.weight_set_name(ema)
  newest = weights_lib.resolve_step(workdir, step)
  source = source_pipeline(weights_lib.saved_config(workdir, newest).data, pretrained)  # before any restore

  def load(candidate: int):
    config = weights_lib.saved_config(workdir, candidate)
    return config, weights_lib.restore_weights(workdir, candidate, config, conversion.local_mesh(),
                                               [name])[name]

  step, (config, params) = weights_lib.readable_checkpoint(
      workdir, step, load, warn=lambda line: print(f"sora_jax.export: {line}", file=sys.stderr, flush=True))
  model_index = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0", **COMPONENTS}
  # TI2V on the Wan2.2 VAE gives its first frame by per-token timesteps (diffusers' expand_timesteps).
  vae = wan_vae_config.WanVAEConfig.from_json(os.path.join(source, layout.VAE_DIR, layout.CONFIG_FILE))
  model_index["expand_timesteps"] = vae.is_residual
  index_path = os.path.join(source, layout.MODEL_INDEX_FILE)
  if os.path.isfile(index_path):
    source_index = layout.read_json(index_path, "pipeline model index")
    model_index.update({k: v for k, v in source_index.items() if k in (*COMPONENTS, "expand_timesteps")})
  transformers = layout.TRANSFORMER_DIR  # where write_model_files puts one DiT; experts make their own
  if experts_lib.names(config.model):
    transformers = ""
    model_index["transformer_2"] = COMPONENTS["transformer"]
    model_index["boundary_ratio"] = float(config.diffusion.boundary_ratio)
  scheduler = scheduler_config(config.diffusion)
  model_index["scheduler"] = ["diffusers", scheduler["_class_name"]]
  with atomic.staged_directory(out) as staged:
    # One DiT goes to transformer/; experts to transformer/ (high noise) and transformer_2/ (low).
    conversion.write_model_files(params, config, os.path.join(staged, transformers), fmt="diffusers",
                                 dtype=dtype, max_shard_bytes=max_shard_bytes)
    for part in (layout.VAE_DIR, layout.TEXT_ENCODER_DIR):
      shutil.copytree(os.path.join(source, part), os.path.join(staged, part))
    tokenizer_entry = _copy_tokenizer(os.path.join(source, layout.TOKENIZER_DIR),
                                      os.path.join(staged, layout.TOKENIZER_DIR), config.data.text_len)
    if tokenizer_entry:
      model_index["tokenizer"] = tokenizer_entry
    atomic.write_json(os.path.join(staged, layout.SCHEDULER_DIR, layout.SCHEDULER_CONFIG_FILE), scheduler)
    atomic.write_json(os.path.join(staged, layout.MODEL_INDEX_FILE), model_index)
  specs = conversion.weight_specs(os.path.join(out, transformers), config.model, "diffusers")
  return conversion.ExportResult(
      out=os.path.abspath(out), step=step, weight_set=name,
      files=sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs),
      num_tensors=len(specs), num_bytes=sum(s.num_bytes for s in specs))


def describe(result: conversion.ExportResult) -> str:
  """One line on what a pipeline export holds."""
  parts = sorted({path.split(os.sep)[0] for path in result.files})
  loader = f"diffusers.WanPipeline.from_pretrained({json.dumps(result.out)})"
  return f"{result.out}: {', '.join(parts)}; load with {loader}"
