"""Text encoders that turn captions into the [B, L, D_text] embeddings the DiT cross-attends to.

Owns `TextEncoder` (tokenizer + umT5 network, outputs zero past each caption's length, as Wan feeds
them), where its tokenizer comes from, and `get_text_encoder(config)`: the pretrained umT5 of a
pipeline directory (`umt5.py` reads it) or, for the demo, a small seeded instance ("tiny_umt5").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax.encoders import tokenizer as tokenizer_lib
from sora_jax.encoders import umt5
from sora_jax.encoders.umt5_network import UMT5Encoder
from sora_jax.files import layout

_ENCODE_BATCH = 32  # most captions per jitted call (the last batch is padded to a power of two)


class TextEncoderError(ValueError):
  """A text encoder that cannot be built as configured."""


class TextEncoder:
  """Tokenizer + encoder: `.encode(captions)` -> (embeds [B, L, D] float32 zero past length, lengths)."""

  def __init__(self, module: UMT5Encoder, params: Any, tokenizer: tokenizer_lib.Tokenizer,
               text_len: int, identity: dict[str, Any]):
    self.module = module
    self.params = params
    self.tokenizer = tokenizer
    self.text_len = text_len
    self.dim = module.d_model
    self.identity = identity
    self._apply = jax.jit(self._embed)

  def _embed(self, params, ids, lengths):
    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    hidden = self.module.apply({"params": params}, ids, mask)
    return jnp.where(mask[..., None], hidden, 0.0)

  def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """captions -> (embeds [B, text_len, D] float32, lengths [B] int32 incl. EOS)."""
    ids, lengths = self.tokenizer.encode(list(captions), self.text_len)
    embeds = np.zeros((len(captions), self.text_len, self.dim), np.float32)
    # Batches of 32, the last one padded to a power of two: a single prompt costs one row, not 32
    # (a row of umT5-XXL is slow on a CPU), and at most 6 batch shapes are ever compiled.
    for start in range(0, len(captions), _ENCODE_BATCH):
      chunk_ids = ids[start:start + _ENCODE_BATCH]
      chunk_lengths = lengths[start:start + _ENCODE_BATCH]
      count = len(chunk_ids)
      pad = min(_ENCODE_BATCH, 1 << (count - 1).bit_length()) - count
      if pad:
        chunk_ids = np.concatenate([chunk_ids, np.zeros((pad, self.text_len), np.int32)])
        chunk_lengths = np.concatenate([chunk_lengths, np.ones((pad,), np.int32)])
      embeds[start:start + count] = np.asarray(self._apply(self.params, chunk_ids, chunk_lengths))[:count]
    return embeds, lengths


def tiny_umt5(config: ml_collections.ConfigDict) -> UMT5Encoder:
  """The demo's small umT5 encoder; width = model.text_dim."""
  data = config.data
  d_model, heads = config.model.text_dim, data.text_encoder_heads
  if heads < 1 or d_model % heads:
    raise TextEncoderError(
        f"model.text_dim={d_model} is not divisible by data.text_encoder_heads={heads}")
  return UMT5Encoder(
      vocab_size=data.vocab_size, d_model=d_model, num_layers=data.text_encoder_layers,
      num_heads=heads, head_dim=d_model // heads, ffn_dim=data.text_encoder_ffn_dim,
      position_bias_std=float(data.text_encoder_position_bias_std))


class TextEncoderUnavailable(TextEncoderError):
  """The config names a pretrained text encoder but no weights to load it from."""


def resolve_tokenizer_path(data: ml_collections.ConfigDict) -> str:
  """data.tokenizer if set, else data.pretrained's tokenizer, else the one stored in the dataset data.dir
  (a mixture's datasets share theirs: the first one's)."""
  if data.tokenizer:
    return data.tokenizer
  if data.pretrained:
    return layout.tokenizer_path(data.pretrained)
  sources = config_lib.data_sources(data)
  if sources:
    return layout.dataset_tokenizer_path(sources[0].path)
  raise TextEncoderError(
      "no tokenizer: set data.tokenizer to a sentencepiece .model file, data.pretrained to a Wan pipeline "
      "directory, or data.dir to a prepared dataset (which stores the one its captions were encoded with)")


def get_text_encoder(config: ml_collections.ConfigDict,
                     tokenizer: tokenizer_lib.Tokenizer | None = None) -> TextEncoder:
  """The text encoder named by config.data.text_encoder, with its tokenizer.

  `tokenizer` overrides the lookup (prepare passes the one it just trained); otherwise it comes
  from `resolve_tokenizer_path(config.data)`. `umt5` loads data.pretrained's text_encoder/.
  """
  name = config.data.text_encoder
  if name == "umt5":
    return _pretrained_umt5(config, tokenizer)
  if name != "tiny_umt5":
    raise TextEncoderError(f"data.text_encoder={name!r}; expected 'umt5' or 'tiny_umt5'")
  if tokenizer is None:
    tokenizer = tokenizer_lib.load(resolve_tokenizer_path(config.data))
  tokenizer_lib.check_fits(tokenizer, config.data.vocab_size)
  module = tiny_umt5(config)
  seed = config.data.text_encoder_seed
  ids = jnp.zeros((1, config.data.text_len), jnp.int32)
  params = jax.jit(module.init)(jax.random.key(seed), ids, jnp.ones_like(ids, bool))["params"]
  architecture = {
      "vocab_size": module.vocab_size, "d_model": module.d_model, "num_layers": module.num_layers,
      "num_heads": module.num_heads, "head_dim": module.head_dim, "ffn_dim": module.ffn_dim,
      "position_bias_std": module.position_bias_std}
  identity = {
      "name": name, "seed": seed, "architecture": architecture, "text_len": config.data.text_len,
      "tokenizer_sha256": tokenizer.sha256, "tokenizer_vocab_size": tokenizer.vocab_size,
      "params_sha256": params_fingerprint(params)}
  return TextEncoder(module, params, tokenizer, config.data.text_len, identity)


def _pretrained_umt5(config: ml_collections.ConfigDict,
                     tokenizer: tokenizer_lib.Tokenizer | None) -> TextEncoder:
  data = config.data
  directory = layout.text_encoder_dir(layout.required_root(
      data.pretrained, "data.text_encoder='umt5'", "the umT5 weights", TextEncoderUnavailable))
  if tokenizer is None:
    tokenizer = tokenizer_lib.load(resolve_tokenizer_path(config.data))
  encoder = umt5_text_encoder(directory, tokenizer, int(data.text_len), data.encoder_dtype)
  if encoder.dim != config.model.text_dim:
    raise TextEncoderError(
        f"model.text_dim={config.model.text_dim}, but the umT5 encoder in {directory} gives "
        f"{encoder.dim}-wide embeddings")
  return encoder


def umt5_text_encoder(directory: str, tokenizer: tokenizer_lib.Tokenizer, text_len: int,
                       dtype: str = "float32") -> TextEncoder:
  """The `TextEncoder` (captions -> [B, text_len, d_model] zero past each length) of a umT5 directory."""
  if text_len < 1:
    raise umt5.UMT5Error(f"text_len={text_len}; expected >= 1")
  model = umt5.load(directory, dtype=dtype)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise umt5.UMT5Error(
        f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} pieces, more than the "
        f"{model.config.vocab_size} embedding rows of the umT5 encoder in {directory}")
  identity = {
      "name": "umt5", "directory": os.path.abspath(directory), "architecture": model.config.summary(),
      "dtype": dtype, "text_len": text_len, "tokenizer_sha256": tokenizer.sha256,
      "tokenizer_vocab_size": tokenizer.vocab_size, "weights": umt5.weights_fingerprint(directory)}
  return TextEncoder(model.module, model.params, tokenizer, text_len, identity)


def params_fingerprint(params: Any) -> str:
  """sha256 over parameter names and bytes: the same seed must give the same encoder everywhere."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    digest.update(json.dumps(jax.tree_util.keystr(path)).encode())
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()
