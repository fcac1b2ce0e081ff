"""A sentencepiece model as a Hugging Face fast tokenizer (`tokenizer.json`), for pipelines sora_jax writes.

Owns the conversion transformers' `T5Converter` does (Unigram or BPE model, the model's precompiled
normaliser, Metaspace pre-tokenizer and decoder, EOS appended), written as the `tokenizers` JSON
format without protobuf or the `tokenizers` package: the model's own fields are read from its
protobuf wire format directly. A pipeline whose tokenizer directory holds only `spiece.model` then
loads in transformers without converting it (a conversion that needs a protobuf runtime as new as
transformers' generated code).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import sentencepiece as spm

SPACE = "\u2581"  # sentencepiece's whitespace marker
_UNIGRAM, _BPE = 1, 2


def _varint(data: bytes, index: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = data[index]
    index += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, index
    shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
  """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
  index = 0
  while index < len(data):
    key, index = _varint(data, index)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, index = _varint(data, index)
    elif wire == 1:
      value, index = data[index:index + 8], index + 8
    elif wire == 2:
      length, index = _varint(data, index)
      value, index = data[index:index + length], index + length
    elif wire == 5:
      value, index = data[index:index + 4], index + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield field, value


def model_fields(model_proto: bytes) -> dict[str, Any]:
  """What the conversion needs of a sentencepiece ModelProto: model type, byte fallback and normaliser."""
  fields = {"model_type": _UNIGRAM, "byte_fallback": False, "precompiled_charsmap": b"",
            "add_dummy_prefix": True}
  for number, value in _fields(model_proto):
    if number == 2:  # trainer_spec
      for inner, inner_value in _fields(value):
        if inner == 3:
          fields["model_type"] = inner_value
        elif inner == 35:
          fields["byte_fallback"] = bool(inner_value)
    elif number == 3:  # normalizer_spec
      for inner, inner_value in _fields(value):
        if inner == 2:
          fields["precompiled_charsmap"] = inner_value
        elif inner == 3:
          fields["add_dummy_prefix"] = bool(inner_value)
  return fields


def _bpe_merges(processor: spm.SentencePieceProcessor, vocab: dict[str, int]) -> list[list[str]]:
  """BPE merges in rank order, recovered from the vocabulary as transformers' SentencePieceExtractor does:
  every split of a piece into two pieces of the vocabulary, ordered by the piece's score."""
  merges = []
  for piece, piece_id in vocab.items():
    local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
             if piece[:i] in vocab and piece[i:] in vocab]
    local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    merges.extend((left, right, processor.GetScore(piece_id)) for left, right in local)
  merges.sort(key=lambda merge: merge[2], reverse=True)
  return [[left, right] for left, right, _ in merges]


def tokenizer_json(model_proto: bytes) -> dict[str, Any]:
  """The `tokenizer.json` of a sentencepiece model, as transformers' T5 conversion would write it."""
  processor = spm.SentencePieceProcessor()
  processor.LoadFromSerializedProto(model_proto)
  fields = model_fields(model_proto)
  size = processor.GetPieceSize()
  pieces = [processor.IdToPiece(i) for i in range(size)]
  unk_id = processor.unk_id()
  if fields["model_type"] == _UNIGRAM:
    model = {"type": "Unigram", "unk_id": unk_id, "byte_fallback": fields["byte_fallback"],
             "vocab": [[piece, float(processor.GetScore(i))] for i, piece in enumerate(pieces)]}
  elif fields["model_type"] == _BPE:
    vocab = {piece: i for i, piece in enumerate(pieces)}
    model = {"type": "BPE", "dropout": None, "unk_token": pieces[unk_id], "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": fields["byte_fallback"],
             "ignore_merges": False, "vocab": vocab, "merges": _bpe_merges(processor, vocab)}
  else:
    raise ValueError(f"sentencepiece model type {fields['model_type']}; expected unigram (1) or bpe (2)")
  normalizers = [{"type": "Strip", "strip_left": False, "strip_right": True},
                 {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": SPACE}]
  if fields["precompiled_charsmap"]:
    normalizers.insert(0, {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(
        fields["precompiled_charsmap"]).decode("ascii")})
  metaspace = {"type": "Metaspace", "replacement": SPACE,
               "prepend_scheme": "always" if fields["add_dummy_prefix"] else "never", "split": True}
  eos = processor.IdToPiece(processor.eos_id())
  special = [i for i in (processor.pad_id(), processor.eos_id(), unk_id) if 0 <= i < size]
  sequence = lambda name: {"Sequence": {"id": name, "type_id": 0}}
  end = {"SpecialToken": {"id": eos, "type_id": 0}}
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True} for i in sorted(special)],
      "normalizer": {"type": "Sequence", "normalizers": normalizers},
      "pre_tokenizer": metaspace,
      "post_processor": {"type": "TemplateProcessing", "single": [sequence("A"), end],
                         "pair": [sequence("A"), end, sequence("B"), end],
                         "special_tokens": {eos: {"id": eos, "ids": [processor.eos_id()], "tokens": [eos]}}},
      "decoder": metaspace,
      "model": model,
  }
