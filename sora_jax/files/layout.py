"""The on-disk layouts of the directories sora_jax reads besides its runs, and one name per file kind.

Owns a diffusers Wan pipeline directory (`data.pretrained`, `sample --pretrained`: `vae/`,
`text_encoder/`, `tokenizer/spiece.model`, `transformer/`, `scheduler/`, `model_index.json`), a
transformer directory (`train.init_from`), the weight and config file names of each part, and where a
prepared dataset keeps its version directory and tokenizer. Every check says what is missing the same
way: one `PretrainedError` (or `DatasetLayoutError`) naming the path and what was expected. jax-free.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sora_jax.files import paths

VAE_DIR = "vae"
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
TRANSFORMER_DIR = "transformer"
TRANSFORMER_2_DIR = "transformer_2"  # Wan2.2 A14B's low-noise expert in a diffusers pipeline
# Each denoising expert's directory: diffusers' (pipeline, or `export --format=diffusers`) and the original
# Wan2.2 A14B release's.
EXPERT_DIRS = {"diffusers": {"high": TRANSFORMER_DIR, "low": TRANSFORMER_2_DIR},
               "wan": {"high": "high_noise_model", "low": "low_noise_model"}}
SCHEDULER_DIR = "scheduler"
MODEL_INDEX_FILE = "model_index.json"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"  # in scheduler/
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # in tokenizer/, beside the sentencepiece model
FAST_TOKENIZER_FILE = "tokenizer.json"  # in tokenizer/: the same model as a Hugging Face fast tokenizer
CONFIG_FILE = "config.json"
# The sentencepiece model, in a pipeline's tokenizer/ (transformers' T5 name) and beside a dataset's shards.
TOKENIZER_FILE = "spiece.model"
# Weight file prefixes (`PREFIX.safetensors`, or shards with `PREFIX.safetensors.index.json`):
# diffusers' models (transformer, VAE) and transformers' (the umT5 text encoder).
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
LAYOUT = (f"{VAE_DIR}/, {TEXT_ENCODER_DIR}/, {TOKENIZER_DIR}/{TOKENIZER_FILE} and optionally "
          f"{TRANSFORMER_DIR}/, as in Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


class PretrainedError(ValueError):
  """A pipeline directory, or one of its parts, that is missing or not what its loader reads."""


def _root(root: str, field: str) -> str:
  if not root:
    raise PretrainedError(f"{field} is empty; expected a Wan pipeline directory with {LAYOUT}")
  if not os.path.isdir(root):
    raise PretrainedError(f"{field}={root!r} is not a directory; expected a Wan pipeline directory with "
                          f"{LAYOUT}")
  return root


def _weights_present(directory: str, prefix: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, name))
             for name in (f"{prefix}.safetensors", f"{prefix}.safetensors.index.json"))


def _model_dir(root: str, name: str, prefix: str, what: str, field: str) -> str:
  directory = os.path.join(_root(root, field), name)
  if not os.path.isdir(directory):
    raise PretrainedError(
        f"{field}={root!r} has no {name}/ subdirectory; expected {what} there ({LAYOUT})")
  read_config(directory, what)
  if not _weights_present(directory, prefix):
    raise PretrainedError(
        f"{directory} holds no {prefix}.safetensors (or {prefix}.safetensors.index.json); expected the "
        f"{what} weights in safetensors, as save_pretrained writes them")
  return directory


def read_json(path: str, what: str, error: type[Exception] | None = None) -> dict[str, Any]:
  """The JSON object in `path` (a model's config.json), or one error naming the file and `what` it is.

  `error` is the class raised (a model's own error type); PretrainedError by default.
  """
  error = error or PretrainedError
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise error(f"{path} does not exist; expected the {what} config there") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"cannot read {path} ({what} config): {e}") from None
  if not isinstance(config, dict):
    raise error(f"{path} is not a JSON object; expected the {what} config")
  return config


def read_config(directory: str, what: str) -> dict[str, Any]:
  """The parsed config.json of a model directory, or one clear error."""
  if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    raise PretrainedError(f"{directory} has no {CONFIG_FILE}; expected the {what} config there")
  return read_json(os.path.join(directory, CONFIG_FILE), what)


def apply_updates(config: Any, updates: dict[str, Any]) -> None:
  """Sets {"group.field": value} updates on a ConfigDict in place."""
  for name, value in updates.items():
    group, key = name.split(".")
    config[group][key] = value


def required_root(root: str, setting: str, what: str, error: type[Exception]) -> str:
  """`root` (data.pretrained) when set; else `error` saying that `setting` needs `what` from a pipeline."""
  if not root:
    raise error(f"{setting} needs {what}: set data.pretrained to a Wan pipeline directory ({LAYOUT})")
  return root


def vae_dir(root: str, field: str = "data.pretrained") -> str:
  """`root/vae`, checked to hold config.json and diffusers safetensors weights."""
  return _model_dir(root, VAE_DIR, DIFFUSERS_WEIGHTS, "Wan2.1 VAE (AutoencoderKLWan)", field)


def text_encoder_dir(root: str, field: str = "data.pretrained") -> str:
  """`root/text_encoder`, checked to hold config.json and transformers safetensors weights."""
  return _model_dir(root, TEXT_ENCODER_DIR, TRANSFORMERS_WEIGHTS, "umT5 text encoder (UMT5EncoderModel)",
                    field)


def tokenizer_path(root: str, field: str = "data.pretrained") -> str:
  """`root/tokenizer/spiece.model`, checked to exist."""
  path = os.path.join(_root(root, field), TOKENIZER_DIR, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise PretrainedError(
        f"{field}={root!r} has no {TOKENIZER_DIR}/{TOKENIZER_FILE}; expected the umT5 sentencepiece model")
  return path


def transformer_dir(path: str, field: str = "train.init_from") -> str:
  """The transformer weights directory of `path`: `path/transformer` in a pipeline, else `path` itself."""
  if not path or not os.path.isdir(path):
    raise PretrainedError(
        f"{field}={path!r} is not a directory; expected a Wan pipeline directory or its {TRANSFORMER_DIR}/ "
        f"(diffusers or original Wan2.1 layout)")
  nested = os.path.join(path, TRANSFORMER_DIR)
  directory = nested if os.path.isdir(nested) else path
  if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    raise PretrainedError(
        f"{field}={path!r} holds neither {TRANSFORMER_DIR}/{CONFIG_FILE} nor {CONFIG_FILE}; expected a Wan "
        f"pipeline directory or its transformer/ (diffusers or original Wan2.1 layout)")
  return directory


def expert_dirs(path: str, field: str = "train.init_from") -> dict[str, str] | None:
  """{"high": dir, "low": dir} of a two-expert directory (`transformer/` + `transformer_2/`, or Wan2.2's
  `high_noise_model/` + `low_noise_model/`); None when `path` holds one transformer."""
  if not path or not os.path.isdir(path):
    return None
  for fmt, dirs in EXPERT_DIRS.items():
    present = {name: os.path.join(path, sub) for name, sub in dirs.items()
               if os.path.isfile(os.path.join(path, sub, CONFIG_FILE))}
    if len(present) == 2:
      return present
    # transformer/ alone is a one-DiT pipeline; any other lone expert lacks its partner.
    if "low" in present or (fmt == "wan" and present):
      have, lacking = (dirs["low"], dirs["high"]) if "low" in present else (dirs["high"], dirs["low"])
      raise PretrainedError(f"{field}={path!r} has {have}/ but no {lacking}/{CONFIG_FILE}; expected both "
                            f"experts of a two-expert model (Wan2.2 A14B)")
  return None


# A prepared dataset: DIR/sora_clips/1.0.0/ holds dataset_info.json, the shards, metadata and tokenizer.
DATASET_NAME = "sora_clips"
DATASET_VERSION = "1.0.0"
DATASET_INFO_FILE = "dataset_info.json"
# Datasets written before the tokenizer took its one name keep it here; readers still find it.
LEGACY_DATASET_TOKENIZER_FILE = "tokenizer.model"


class DatasetLayoutError(ValueError):
  """A dataset directory that does not hold what `sora_jax.prepare` writes."""


def dataset_version_dir(data_dir: str, error: type[Exception] | None = None) -> str:
  """The TFDS version dir (holding dataset_info.json and shards) of a prepared dataset dir.

  Accepts the directory prepare wrote (`DIR`, holding `sora_clips/1.0.0/`) or the version dir itself.
  """
  error = error or DatasetLayoutError
  if paths.is_file(os.path.join(data_dir, DATASET_INFO_FILE)):
    return data_dir
  candidate = os.path.join(data_dir, DATASET_NAME, DATASET_VERSION)
  if paths.is_file(os.path.join(candidate, DATASET_INFO_FILE)):
    return candidate
  if not paths.is_dir(data_dir):
    raise error(f"dataset dir {data_dir!r} does not exist; expected the --out dir of sora_jax.prepare")
  raise error(
      f"dataset dir {data_dir!r} holds no prepared dataset; expected "
      f"{os.path.join(candidate, DATASET_INFO_FILE)} (written by sora_jax.prepare)")


def dataset_tokenizer_path(data_dir: str, error: type[Exception] | None = None) -> str:
  """The sentencepiece model stored with a prepared dataset."""
  error = error or DatasetLayoutError
  version_dir = dataset_version_dir(data_dir, error)
  for name in (TOKENIZER_FILE, LEGACY_DATASET_TOKENIZER_FILE):
    path = os.path.join(version_dir, name)
    if paths.is_file(path):
      return path
  raise error(f"dataset dir {data_dir!r} has no {TOKENIZER_FILE}; expected one copied by prepare")
