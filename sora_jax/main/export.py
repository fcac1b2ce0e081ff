"""`python -m sora_jax.export`: a checkpoint to diffusers / original Wan2.1 / a whole WanPipeline, and back.

  python -m sora_jax.export --workdir=W [--step=N] [--ema=0.999] --format=diffusers --out=DIR
  python -m sora_jax.export --workdir=W --format=diffusers_pipeline --out=DIR [--pretrained=PIPELINE]
  python -m sora_jax.export --workdir=W --format=lora --out=DIR     # a LoRA run's adapters (PEFT file)
  python -m sora_jax.export --import_from=DIR --format=wan --workdir=NEW [--config=configs/X.py]
"""

from __future__ import annotations

import math

from absl import app, flags

from sora_jax import cli

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory to export from, or (with --import_from) the new run directory to create.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest.")
_EMA = flags.DEFINE_float(
    "ema", None, "Export the EMA weights of this decay (e.g. 0.999) instead of the raw ones.")
_FORMAT = flags.DEFINE_enum(
    "format", "diffusers", ["diffusers", "wan", "diffusers_pipeline", "lora"],
    "diffusers: WanTransformer3DModel; wan: the original Wan2.1 WanModel layout; diffusers_pipeline: a "
    "whole WanPipeline directory (transformer, VAE, umT5, tokenizer, scheduler, model_index.json); lora: "
    "a LoRA run's adapters as pytorch_lora_weights.safetensors for WanPipeline.load_lora_weights (the "
    "other formats of a LoRA run hold its adapters merged into the weights they adapt).")
_OUT = flags.DEFINE_string("out", None, "Output directory for config.json and the safetensors weights.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "With --format=diffusers_pipeline: the Wan pipeline directory whose VAE, umT5 and "
    "tokenizer go into the export (default: the run's data.pretrained).")
_DTYPE = flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "dtype of the exported tensors.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out (or import --workdir).")
_MAX_SHARD_GB = flags.DEFINE_float(
    "max_shard_gb", 10.0,
    "Largest safetensors file in GB (2**30 bytes); bigger models are sharded with an index json.")
_IMPORT_FROM = flags.DEFINE_string(
    "import_from", None, "Import this diffusers / Wan directory into a new orbax checkpoint under --workdir.")
_CONFIG = flags.DEFINE_string(
    "config", None, "With --import_from: config file whose non-model fields the imported run uses "
    "(default: configs/base.py defaults); model fields come from the imported config.json.")


def _check_flags() -> None:
  """Every flag's value, before any checkpoint or weights file is read or device touched."""
  if not _WORKDIR.value:
    raise cli.FlagError("--workdir is required")
  if _IMPORT_FROM.value:
    # Import writes step 0 of a new run from whole-precision weights: these only shape an export.
    for flag in ("out", "step", "ema", "dtype", "max_shard_gb", "pretrained"):
      if flags.FLAGS[flag].present:
        raise cli.FlagError(f"--{flag} applies to export, not to --import_from; expected it left out "
                            "(an import writes step 0 of --workdir in the source's precision)")
    cli.check_directory("import_from", _IMPORT_FROM.value,
                        "a diffusers or Wan2.1 transformer directory (config.json and safetensors)")
    cli.check_output_directory("workdir", _WORKDIR.value, "a new run directory for the imported checkpoint")
    return
  if not _OUT.value:
    raise cli.FlagError("--out is required to export (or pass --import_from to import)")
  if flags.FLAGS["config"].present:
    raise cli.FlagError("--config applies to --import_from only; an export reads the run's own config")
  if _PRETRAINED.value is not None and _FORMAT.value != "diffusers_pipeline":
    raise cli.FlagError("--pretrained applies to --format=diffusers_pipeline only")
  if _PRETRAINED.value is not None:
    cli.check_directory("pretrained", _PRETRAINED.value, "a Wan pipeline directory (vae/, text_encoder/, "
                        "tokenizer/)")
  if not (_MAX_SHARD_GB.value > 0 and math.isfinite(_MAX_SHARD_GB.value)):
    raise cli.FlagError(f"--max_shard_gb={_MAX_SHARD_GB.value}; expected > 0 GB per safetensors shard")
  cli.check_number("step", _STEP.value, "a checkpoint step >= 0", minimum=0)
  cli.check_number("ema", _EMA.value, "an EMA decay in (0, 1), e.g. 0.999", above=0, below=1)
  cli.check_run_directory("workdir", _WORKDIR.value, "a run directory holding checkpoints/")
  cli.check_output_directory("out", _OUT.value, "a directory for config.json and the safetensors weights")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  _check_flags()
  from sora_jax.offline import conversion

  if _IMPORT_FROM.value:
    from sora_jax import config as config_lib
    from sora_jax.configs import base

    base_config = config_lib.load(_CONFIG.value) if _CONFIG.value else base.get_config()
    source, fmt = _IMPORT_FROM.value, _FORMAT.value
    if fmt == "diffusers_pipeline":  # a pipeline directory's transformer/, in diffusers' layout
      from sora_jax.files import layout

      if layout.expert_dirs(source, "--import_from") is None:
        source = layout.transformer_dir(source, "--import_from")
      fmt = "diffusers"
    config = conversion.import_weights(source, fmt, _WORKDIR.value, base_config, overwrite=_OVERWRITE.value)
    changes = conversion.config_differences(base_config, config)
    print(f"imported {_IMPORT_FROM.value} ({_FORMAT.value}) as step 0 of {_WORKDIR.value}")
    for field, (old, new) in changes.items():
      print(f"  {field}: {old} -> {new} (from the imported config.json)")
    print(f"fine-tune with: python -m sora_jax.train --config=<config with these model fields> "
          f"--workdir={_WORKDIR.value}   (the full config is in {_WORKDIR.value}/config.json)")
    return
  if _FORMAT.value == "diffusers_pipeline":
    from sora_jax.offline import pipeline_export

    result = pipeline_export.export_pipeline(
        _WORKDIR.value, _OUT.value, step=_STEP.value, ema=_EMA.value, dtype=_DTYPE.value,
        pretrained=_PRETRAINED.value, overwrite=_OVERWRITE.value,
        max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30))
    print(f"exported step {result.step} ({result.weight_set}) of {_WORKDIR.value} as a diffusers pipeline, "
          f"transformer {_DTYPE.value} ({result.num_tensors} tensors, {result.num_bytes / 2**20:.1f} MiB) -> "
          + pipeline_export.describe(result))
    return
  if _FORMAT.value == "lora":
    result = conversion.export_lora(_WORKDIR.value, _OUT.value, step=_STEP.value, ema=_EMA.value,
                                    dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
    print(f"exported the adapters of step {result.step} ({result.weight_set}) of {_WORKDIR.value}: "
          f"{result.num_tensors // 2} adapted layers, {result.num_bytes / 2**20:.2f} MiB -> "
          f"{result.out}/{result.files[0]}")
    return
  result = conversion.export_checkpoint(
      _WORKDIR.value, _OUT.value, fmt=_FORMAT.value, step=_STEP.value, ema=_EMA.value, dtype=_DTYPE.value,
      overwrite=_OVERWRITE.value, max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30))
  print(f"exported step {result.step} ({result.weight_set}) of {_WORKDIR.value} as {_FORMAT.value} "
        f"{_DTYPE.value}: {result.num_tensors} tensors, {result.num_bytes / 2**20:.1f} MiB in "
        f"{len(result.files)} files -> {result.out}")


def run() -> None:
  cli.run(main, "export")


if __name__ == "__main__":
  run()
