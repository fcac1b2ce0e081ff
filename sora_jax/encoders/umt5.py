"""The pretrained umT5 encoder (Wan2.1's text encoder, google/umt5-xxl) loaded from a Hugging Face directory.

Owns reading a transformers UMT5 / T5 `config.json` into the Flax `UMT5Encoder` architecture, mapping the
checkpoint's torch tensor names onto its parameter tree, the `UMT5` callable (ids + mask ->
last_hidden_state, as transformers' `UMT5EncoderModel`) and the `TextEncoder` built from a directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sora_jax.encoders.umt5_network import UMT5Encoder
from sora_jax.files import layout, safetensors_io

CONFIG_FILE = layout.CONFIG_FILE
WEIGHTS_PREFIX = layout.TRANSFORMERS_WEIGHTS
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# transformers maps feed_forward_proj "gated-gelu" to gelu_new; both names are the tanh GELU JAX computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_SIZE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
# Bytes hashed at each end of every weight file for the identity (see `weights_fingerprint`).
_SAMPLE_BYTES = 1 << 20


class UMT5Error(ValueError):
  """A umT5 directory whose config or weights this loader cannot read, or inputs of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """The fields of a transformers UMT5 / T5 encoder config.json that shape the network."""

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # T5 computes one position bias in block 0 and reuses it in every layer; umT5 has one per layer.
  shared_position_bias: bool = False

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> UMT5Config:
    """Reads a transformers config dict; refuses what the Flax encoder does not implement."""
    model_type = raw.get("model_type")
    if model_type not in ("umt5", "t5"):
      raise UMT5Error(f"{source}: model_type={model_type!r}; expected 'umt5' (or 't5')")
    # transformers' defaults and parsing: "gated-ACT" or "ACT", and "gated-gelu" means gelu_new.
    projection = raw.get("feed_forward_proj", "gated-gelu" if model_type == "umt5" else "relu")
    parts = str(projection).split("-")
    activation = "gelu_new" if projection == "gated-gelu" else parts[-1]
    if len(parts) != 2 or parts[0] != "gated" or activation not in _TANH_GELUS:
      raise UMT5Error(
          f"{source}: feed_forward_proj={projection!r}; expected a gated tanh-GELU feed-forward "
          f"('gated-gelu', as umT5 uses; or gated-{' / gated-'.join(_TANH_GELUS)})")
    missing = [field for field in _SIZE_FIELDS if field not in raw]
    if missing:
      raise UMT5Error(f"{source} lacks {', '.join(missing)}; expected the sizes of the encoder")
    try:
      config = cls(
          **{field: int(raw[field]) for field in _SIZE_FIELDS},
          relative_attention_num_buckets=int(raw.get("relative_attention_num_buckets", 32)),
          relative_attention_max_distance=int(raw.get("relative_attention_max_distance", 128)),
          layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-6)),
          shared_position_bias=model_type == "t5")
    except (TypeError, ValueError) as e:
      raise UMT5Error(f"{source}: malformed size field: {e}") from None
    config.validate(source)
    return config

  @classmethod
  def from_json(cls, path: str) -> UMT5Config:
    raw = layout.read_json(path, "transformers umT5 encoder (UMT5EncoderModel)", UMT5Error)
    return cls.from_dict(raw, source=path)

  def validate(self, source: str = "config") -> None:
    sizes = {field: getattr(self, field) for field in _SIZE_FIELDS}
    bad = {field: value for field, value in sizes.items() if value < 1}
    if bad:
      raise UMT5Error(f"{source}: {bad}; expected positive sizes")
    buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
    # The bucket formula needs exact buckets on each side and a log range beyond them.
    if buckets < 4 or distance <= buckets // 4:
      raise UMT5Error(
          f"{source}: relative_attention_num_buckets={buckets}, relative_attention_max_distance="
          f"{distance}; expected at least 4 buckets and max_distance > num_buckets // 4")
    if not self.layer_norm_epsilon > 0:
      raise UMT5Error(f"{source}: layer_norm_epsilon={self.layer_norm_epsilon}; expected > 0")

  def summary(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def module(self, dtype: str = "float32") -> UMT5Encoder:
    """The Flax encoder of this architecture, its matmuls in `dtype`."""
    return UMT5Encoder(
        vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
        num_heads=self.num_heads, head_dim=self.d_kv, ffn_dim=self.d_ff, eps=self.layer_norm_epsilon,
        num_buckets=self.relative_attention_num_buckets,
        max_distance=self.relative_attention_max_distance, dtype=jnp.dtype(_dtype(dtype)))


def _dtype(dtype: str) -> np.dtype:
  if dtype not in DTYPES:
    raise UMT5Error(f"umT5 dtype={dtype!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[dtype]


# ------------------------------------------------------------------------------------------ weights


@dataclasses.dataclass(frozen=True)
class _Tensor:
  names: tuple[str, ...]  # checkpoint names, the first present is read
  shape: tuple[int, ...]  # torch shape
  path: tuple[str, ...]  # Flax parameter path
  kind: str  # "linear": transposed, in dtype; "embedding": in dtype; "vector": float32


def tensor_table(config: UMT5Config) -> list[_Tensor]:
  """Every tensor the encoder reads: checkpoint names, torch shape, Flax path and conversion."""
  d_model, inner, d_ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  # UMT5EncoderModel writes the tied embedding once, as shared.weight; the stack's own copy is the same.
  table = [_Tensor(("shared.weight", "encoder.embed_tokens.weight"), (config.vocab_size, d_model),
                   ("shared", "embedding"), "embedding")]
  for index in range(config.num_layers):
    block, flax = f"encoder.block.{index}.layer", f"block_{index}"
    attention = f"{flax}_SelfAttention"
    for name, shape in (("q", (inner, d_model)), ("k", (inner, d_model)), ("v", (inner, d_model)),
                        ("o", (d_model, inner))):
      table.append(_Tensor((f"{block}.0.SelfAttention.{name}.weight",), shape, (attention, name, "kernel"),
                           "linear"))
    bias_block = 0 if config.shared_position_bias else index
    table.append(_Tensor(
        (f"encoder.block.{bias_block}.layer.0.SelfAttention.relative_attention_bias.weight",),
        (config.relative_attention_num_buckets, config.num_heads),
        (attention, "relative_attention_bias", "embedding"), "vector"))
    table.append(_Tensor((f"{block}.0.layer_norm.weight",), (d_model,), (f"{flax}_attention_norm", "weight"),
                         "vector"))
    ffn = f"{flax}_DenseReluDense"
    for name, shape in (("wi_0", (d_ff, d_model)), ("wi_1", (d_ff, d_model)), ("wo", (d_model, d_ff))):
      table.append(_Tensor((f"{block}.1.DenseReluDense.{name}.weight",), shape, (ffn, name, "kernel"),
                           "linear"))
    table.append(_Tensor((f"{block}.1.layer_norm.weight",), (d_model,), (f"{flax}_ffn_norm", "weight"),
                         "vector"))
  table.append(_Tensor(("encoder.final_layer_norm.weight",), (d_model,), ("final_layer_norm", "weight"),
                       "vector"))
  return table


def _unused(names: set[str], table: list[_Tensor]) -> list[str]:
  """Encoder tensors of the checkpoint the table does not read (decoder and lm_head are expected)."""
  known = {name for tensor in table for name in tensor.names}
  return sorted(name for name in names if name.startswith("encoder.") and name not in known)


def convert_weights(config: UMT5Config, reader: safetensors_io.Reader, *, source: str,
                    dtype: str = "float32") -> dict[str, Any]:
  """The checkpoint's encoder tensors -> the Flax params tree of `config.module(dtype)`, on the device.

  Matrices and the embedding are stored in `dtype`; norm weights and position bias tables (a few KB)
  stay float32. Every name and shape is checked before any tensor is read, so a wrong checkpoint fails
  in one message naming `source`. Tensors are converted one at a time: host memory peaks at one tensor.
  """
  target = _dtype(dtype)
  table = tensor_table(config)
  specs = reader.specs()
  problems = []
  for tensor in table:
    name = next((name for name in tensor.names if name in specs), None)
    if name is None:
      problems.append(f"{' or '.join(tensor.names)} (missing; expected shape {list(tensor.shape)})")
    elif specs[name].shape != tensor.shape:
      problems.append(f"{name} (shape {list(specs[name].shape)}; expected {list(tensor.shape)})")
  if problems:
    raise UMT5Error(
        f"{source} does not hold the umT5 encoder its config.json describes: {len(problems)} tensor(s) "
        f"missing or of the wrong shape, e.g. {'; '.join(problems[:4])}")
  unused = _unused(set(specs), table)
  if unused:
    raise UMT5Error(
        f"{source} holds {len(unused)} encoder tensor(s) the umT5 encoder of its config.json does not "
        f"have, e.g. {', '.join(unused[:4])}; is the checkpoint from another architecture?")
  params: dict[str, Any] = {}
  for tensor in table:
    name = next(name for name in tensor.names if name in specs)
    value = reader.read(name)
    if tensor.kind == "linear":
      value = value.T  # torch Linear [out, in] -> Flax Dense kernel [in, out]
    value = np.ascontiguousarray(value, np.float32 if tensor.kind == "vector" else target)
    node = params
    for key in tensor.path[:-1]:
      node = node.setdefault(key, {})
    node[tensor.path[-1]] = jnp.asarray(value)
    del value
  return params


# ------------------------------------------------------------------------------------------ encoder


class UMT5:
  """umT5 encoder ready to run: `umt5(input_ids [B, L], attention_mask [B, L]) -> last_hidden_state`.

  As transformers' `UMT5EncoderModel`: the mask hides keys only, so padded positions still get hidden
  states (callers that follow Wan zero them). The output is float32 [B, L, d_model] whatever `dtype`.
  One compile per input shape.
  """

  def __init__(self, config: UMT5Config, params: Mapping[str, Any], *, dtype: str = "float32",
               source: str = "<memory>"):
    config.validate(source)
    self.config = config
    self.dtype = dtype
    self.source = source
    self.module = config.module(dtype)
    self.params = params
    self.dim = config.d_model
    self._forward = jax.jit(lambda params, ids, mask: self.module.apply({"params": params}, ids, mask))

  def __call__(self, input_ids: Any, attention_mask: Any = None) -> jax.Array:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise UMT5Error(f"input_ids has dtype {ids.dtype} and shape {list(ids.shape)}; expected integer [B, L]")
    if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
      # A gather would clamp silently where torch raises.
      raise UMT5Error(
          f"input_ids range over [{ids.min()}, {ids.max()}]; expected ids in [0, {self.config.vocab_size}) "
          f"for the vocabulary of {self.source}")
    if attention_mask is None:
      mask = np.ones(ids.shape, bool)
    else:
      mask = np.asarray(attention_mask)
      if mask.shape != ids.shape:
        raise UMT5Error(f"attention_mask has shape {list(mask.shape)}; expected input_ids' {list(ids.shape)}")
      mask = mask.astype(bool)
    return self._forward(self.params, ids.astype(np.int32), mask)


def load(directory: str, *, dtype: str = "float32") -> UMT5:
  """The umT5 encoder of a transformers directory: config.json + model.safetensors (or sharded
  model-0000N-of-0000M.safetensors with model.safetensors.index.json), as `save_pretrained` writes them for
  UMT5EncoderModel, UMT5Model or UMT5ForConditionalGeneration (the decoder and lm_head are ignored).
  """
  _dtype(dtype)
  if not os.path.isdir(directory):
    raise UMT5Error(f"umT5 directory {directory} does not exist; expected a transformers model directory")
  config = UMT5Config.from_json(os.path.join(directory, CONFIG_FILE))
  try:
    reader = safetensors_io.Reader(directory, prefix=WEIGHTS_PREFIX)
  except safetensors_io.SafetensorsError as e:
    raise UMT5Error(
        f"cannot read the umT5 weights of {directory}: {e} (expected safetensors, as save_pretrained "
        f"writes them)") from None
  params = convert_weights(config, reader, source=directory, dtype=dtype)
  return UMT5(config, params, dtype=dtype, source=directory)


def _weight_files(directory: str) -> list[str]:
  index = os.path.join(directory, safetensors_io.index_file_name(WEIGHTS_PREFIX))
  if os.path.isfile(index):
    with open(index) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  return safetensors_io.shard_file_names(WEIGHTS_PREFIX, 1)


def weights_fingerprint(directory: str) -> list[dict[str, Any]]:
  """Name, size and a sha256 of the first and last MiB of each weight file.

  Not a hash of every parameter: that reads 11 GB (bf16) to 23 GB (fp32) for umT5-XXL on every
  prepare / eval / sample start. The ends of each file hold its header (names, shapes, dtypes) and the
  bytes of its first and last tensors, which tell any two trained checkpoints apart.
  """
  files = []
  for name in _weight_files(directory):
    path = os.path.join(directory, name)
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      digest.update(f.read(_SAMPLE_BYTES))
      f.seek(max(0, size - _SAMPLE_BYTES))
      digest.update(f.read(_SAMPLE_BYTES))
    files.append({"file": name, "bytes": size, "sampled_sha256": digest.hexdigest()})
  return files
