"""sora_jax.encoders.fast_tokenizer: a sentencepiece model as tokenizer.json gives the same ids."""

import io
import json

import pytest
import sentencepiece as spm

from sora_jax.encoders import fast_tokenizer
from sora_jax.encoders import tokenizer as tokenizer_lib

tokenizers = pytest.importorskip("tokenizers")

CAPTIONS = ["a red ball rolls across a green field", "waves break on a sandy beach at dusk",
            "a small boat drifts on a calm blue lake", "snow falls over a quiet dark forest",
            "a yellow kite flies in a windy sky", "city lights flicker at night in the rain"] * 4
PROBES = ["a red kite over a blue lake", "snow  falls   at dusk ", "Ａ ＲＥＤ ball", "zebra quokka"]


def _unigram_model():
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_writer=model, vocab_size=60,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 hard_vocab_limit=False, minloglevel=2, num_threads=1)
  return model.getvalue()


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_json_encodes_like_sentencepiece(kind):
  proto = tokenizer_lib.train(CAPTIONS, vocab_size=80).model_proto if kind == "bpe" else _unigram_model()
  processor = spm.SentencePieceProcessor()
  processor.LoadFromSerializedProto(proto)
  fields = fast_tokenizer.model_fields(proto)
  assert fields["model_type"] == (2 if kind == "bpe" else 1) and fields["precompiled_charsmap"]
  fast = tokenizers.Tokenizer.from_str(json.dumps(fast_tokenizer.tokenizer_json(proto)))
  for text in CAPTIONS[:6] + PROBES:
    assert fast.encode(text).ids == processor.EncodeAsIds(text) + [processor.eos_id()], text
