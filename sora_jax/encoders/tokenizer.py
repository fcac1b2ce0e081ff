"""SentencePiece tokenization of captions into fixed-length id rows, umT5 style (pad 0, eos 1, unk 2).

Owns loading an existing `.model` file (or a Hugging Face tokenizer directory's spiece.model), training a
small one on the captions for the demo (deterministic: one thread, sorted sentences), and
`Tokenizer.encode` -> (ids, lengths).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from sora_jax.files import atomic, layout, paths

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPIECE_FILE = layout.TOKENIZER_FILE  # the sentencepiece model of a transformers T5 / umT5 tokenizer directory
_WHITESPACE = re.compile(r"\s+")


class TokenizerError(ValueError):
  """A tokenizer file that cannot be loaded or trained, or one that does not fit the config."""


class Tokenizer:
  """A sentencepiece model; `encode` appends EOS, truncates and zero-pads to a fixed length."""

  def __init__(self, model_proto: bytes, path: str = "<memory>"):
    self.processor = spm.SentencePieceProcessor()
    try:
      self.processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"tokenizer {path!r} is not a sentencepiece model: {e}") from None
    self.model_proto = model_proto
    self.path = path
    self.vocab_size = self.processor.GetPieceSize()
    self.sha256 = hashlib.sha256(model_proto).hexdigest()
    if self.processor.eos_id() != EOS_ID or self.processor.pad_id() not in (PAD_ID, -1):
      raise TokenizerError(
          f"tokenizer {path!r} has eos_id={self.processor.eos_id()}, pad_id={self.processor.pad_id()}; "
          f"expected the umT5 layout eos_id={EOS_ID}, pad_id={PAD_ID}")

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (ids [B, max_len] int32, zero past each length; lengths [B] int32, EOS included)."""
    if max_len < 1:
      raise TokenizerError(f"max_len={max_len}; expected >= 1")
    ids = np.full((len(texts), max_len), PAD_ID, np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    # As Wan's prompt_clean: any run of whitespace is one space, whatever the model's own normaliser does.
    cleaned = [_WHITESPACE.sub(" ", text).strip() for text in texts]
    for row, pieces in enumerate(self.processor.EncodeAsIds(cleaned)):
      # Keep the EOS even when the caption is cut, as umT5 saw it in training.
      pieces = [*pieces[: max_len - 1], EOS_ID]
      ids[row, : len(pieces)] = pieces
      lengths[row] = len(pieces)
    return ids, lengths

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.DecodeIds([int(i) for i in ids if i not in (PAD_ID, EOS_ID)])

  def save(self, path: str) -> None:
    atomic.write_bytes(path, self.model_proto)


def load(path: str) -> Tokenizer:
  """Loads a sentencepiece `.model` file."""
  try:
    proto = paths.read_bytes(path)
  except OSError as e:
    raise TokenizerError(f"cannot read tokenizer {path!r}: {e.strerror or e}") from None
  return Tokenizer(proto, path)


def load_pretrained(directory: str) -> Tokenizer:
  """Loads `directory/spiece.model`, the sentencepiece model of a Hugging Face T5 / umT5 tokenizer dir."""
  path = os.path.join(directory, SPIECE_FILE)
  if not os.path.isfile(path):
    raise TokenizerError(
        f"{path} does not exist; expected the sentencepiece {SPIECE_FILE} of a T5 / umT5 tokenizer directory "
        f"(as in a Wan pipeline's tokenizer/)")
  return load(path)


def train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a BPE sentencepiece model on `texts` with at most `vocab_size` pieces.

  BPE rather than umT5's unigram: on a small caption corpus the unigram trainer keeps only a few
  dozen sub-word pieces and splits every word into characters, while BPE learns the whole words.
  The vocabulary is a soft limit: a small corpus may support fewer pieces, which is fine as long as
  it fits the text encoder's embedding table.
  """
  sentences = sorted(text.strip() for text in texts if text.strip())
  if not sentences:
    raise TokenizerError("cannot train a tokenizer: no non-empty captions")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, num_threads=1,
        minloglevel=2, shuffle_input_sentence=False)
  except RuntimeError as e:
    raise TokenizerError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from None
  return Tokenizer(model.getvalue())


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Raises if the tokenizer has more pieces than the text encoder's embedding table rows."""
  if tokenizer.vocab_size > vocab_size:
    raise TokenizerError(
        f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} pieces, more than "
        f"data.vocab_size={vocab_size} embedding rows of the text encoder")
