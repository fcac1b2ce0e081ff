"""Tokenizer training/loading and the umT5 text encoder: determinism, shapes, zero padding, parity."""

import numpy as np
import pytest

from sora_jax.config import load
from sora_jax.encoders import text_encoder as text_encoder_lib
from sora_jax.encoders import tokenizer as tokenizer_lib
from sora_jax.encoders import umt5_network

CAPTIONS = [
    "a red circle moves left on a blue background",
    "a green square moves up quickly on a black background",
    "a yellow triangle moves down slowly on a gray background",
    "a white circle moves right on a black background",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.train(CAPTIONS, vocab_size=128)


@pytest.fixture(scope="module")
def config():
  return load("configs/tiny.py")


def test_tokenizer_train_save_load(tokenizer, tmp_path):
  assert tokenizer.vocab_size <= 128
  ids, lengths = tokenizer.encode(["a red circle moves left on a blue background", ""], 16)
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  # Whole words are pieces: 9 words + EOS.
  assert lengths.tolist() == [10, 1]
  assert ids[0, 9] == tokenizer_lib.EOS_ID and not ids[0, 10:].any()
  assert tokenizer.decode(ids[0]) == "a red circle moves left on a blue background"
  path = str(tmp_path / "tokenizer.model")
  tokenizer.save(path)
  loaded = tokenizer_lib.load(path)
  assert loaded.sha256 == tokenizer.sha256
  np.testing.assert_array_equal(loaded.encode(CAPTIONS, 16)[0], tokenizer.encode(CAPTIONS, 16)[0])
  # Training is deterministic and independent of caption order.
  assert tokenizer_lib.train(CAPTIONS[::-1], vocab_size=128).sha256 == tokenizer.sha256


def test_tokenizer_truncates_keeping_eos(tokenizer):
  ids, lengths = tokenizer.encode([" ".join(["red"] * 40)], 8)
  assert lengths.tolist() == [8] and ids[0, -1] == tokenizer_lib.EOS_ID


def test_tokenizer_errors(tmp_path, tokenizer):
  with pytest.raises(tokenizer_lib.TokenizerError, match="cannot read tokenizer"):
    tokenizer_lib.load(str(tmp_path / "missing.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(tokenizer_lib.TokenizerError, match="not a sentencepiece model"):
    tokenizer_lib.load(str(bad))
  with pytest.raises(tokenizer_lib.TokenizerError, match="no non-empty captions"):
    tokenizer_lib.train(["", "  "], 64)
  with pytest.raises(tokenizer_lib.TokenizerError, match="more than data.vocab_size=8"):
    tokenizer_lib.check_fits(tokenizer, 8)


def test_encoder_shape_padding_and_determinism(config, tokenizer):
  encoder = text_encoder_lib.get_text_encoder(config, tokenizer)
  captions = CAPTIONS[:3] + [""]
  embeds, lengths = encoder.encode(captions)
  assert embeds.shape == (4, config.data.text_len, config.model.text_dim)
  assert embeds.dtype == np.float32
  for row, length in enumerate(lengths):
    assert np.abs(embeds[row, :length]).min(axis=-1).max() > 0  # every valid token is non-zero
    assert not embeds[row, length:].any()
  assert np.isfinite(embeds).all()
  # RMSNorm with unit weights: each valid token has unit root-mean-square.
  rms = np.sqrt(np.mean(embeds[0, : lengths[0]] ** 2, axis=-1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-3)
  again = text_encoder_lib.get_text_encoder(config, tokenizer)
  assert again.identity == encoder.identity
  np.testing.assert_array_equal(again.encode(captions)[0], embeds)
  # A caption's embedding does not depend on its batch neighbours or on batch padding.
  single, _ = encoder.encode([captions[1]])
  np.testing.assert_allclose(single[0], embeds[1], atol=1e-6)
  # Different captions give different embeddings; a different seed a different encoder.
  assert not np.allclose(embeds[0], embeds[1])
  other = config.copy_and_resolve_references()
  other.data.text_encoder_seed = 1
  reseeded = text_encoder_lib.get_text_encoder(other, tokenizer)
  assert reseeded.identity["params_sha256"] != encoder.identity["params_sha256"]


def test_encoder_loads_tokenizer_from_config(config, tokenizer, tmp_path):
  path = str(tmp_path / "tok.model")
  tokenizer.save(path)
  with_path = config.copy_and_resolve_references()
  with_path.data.tokenizer = path
  assert text_encoder_lib.get_text_encoder(with_path).tokenizer.sha256 == tokenizer.sha256
  with pytest.raises(text_encoder_lib.TextEncoderError, match="no tokenizer"):
    text_encoder_lib.get_text_encoder(config)


def test_umt5_without_a_pipeline_directory_is_a_clear_error(tmp_path):
  with pytest.raises(text_encoder_lib.TextEncoderUnavailable, match="set data.pretrained"):
    text_encoder_lib.get_text_encoder(load("configs/wan_1_3b.py"))
  config = load("configs/wan_1_3b.py")
  config.data.pretrained = str(tmp_path)
  with pytest.raises(ValueError, match="has no text_encoder/ subdirectory"):
    text_encoder_lib.get_text_encoder(config)


def test_relative_position_buckets_match_t5():
  import jax.numpy as jnp

  relative = jnp.arange(-200, 201)
  buckets = np.asarray(umt5_network.relative_position_bucket(relative))
  expected = []
  for position in range(-200, 201):  # T5 reference formula, bidirectional, 32 buckets, 128 distance
    bucket = 16 if position > 0 else 0
    distance = abs(position)
    if distance < 8:
      bucket += distance
    else:
      bucket += min(15, 8 + int(np.log(distance / 8) / np.log(128 / 8) * 8))
    expected.append(bucket)
  np.testing.assert_array_equal(buckets, expected)


@pytest.mark.torch
def test_parity_with_transformers_umt5(config, tokenizer):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  encoder = text_encoder_lib.get_text_encoder(config, tokenizer)
  module = encoder.module
  hf_config = transformers.UMT5Config(
      vocab_size=module.vocab_size, d_model=module.d_model, d_kv=module.head_dim, d_ff=module.ffn_dim,
      num_layers=module.num_layers, num_heads=module.num_heads, feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
  model = transformers.UMT5EncoderModel(hf_config).eval()
  params = encoder.params
  state = {"shared.weight": params["shared"]["embedding"],
           "encoder.final_layer_norm.weight": params["final_layer_norm"]["weight"]}
  for i in range(module.num_layers):
    attention = params[f"block_{i}_SelfAttention"]
    prefix = f"encoder.block.{i}.layer"
    for name in ("q", "k", "v", "o"):
      state[f"{prefix}.0.SelfAttention.{name}.weight"] = attention[name]["kernel"].T
    state[f"{prefix}.0.SelfAttention.relative_attention_bias.weight"] = (
        attention["relative_attention_bias"]["embedding"])
    state[f"{prefix}.0.layer_norm.weight"] = params[f"block_{i}_attention_norm"]["weight"]
    ffn = params[f"block_{i}_DenseReluDense"]
    for name in ("wi_0", "wi_1", "wo"):
      state[f"{prefix}.1.DenseReluDense.{name}.weight"] = ffn[name]["kernel"].T
    state[f"{prefix}.1.layer_norm.weight"] = params[f"block_{i}_ffn_norm"]["weight"]
  state = {key: torch.from_numpy(np.array(value, np.float32)) for key, value in state.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
  model.encoder.embed_tokens.weight = model.shared.weight
  captions = CAPTIONS[:4]
  ids, lengths = tokenizer.encode(captions, config.data.text_len)
  mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int64)
  with torch.no_grad():
    reference = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  ours, _ = encoder.encode(captions)
  reference = reference * mask[..., None]  # Wan zeroes the padding positions
  np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=1e-4)


def _role_gap(config, tokenizer):
  """How far apart a caption and its colour/background swap are, seen as a set of tokens."""
  encoder = text_encoder_lib.get_text_encoder(config, tokenizer)
  embeds, lengths = encoder.encode(["a blue circle moves left on a white background",
                                    "a white circle moves left on a blue background"])
  pooled = [embeds[row, :length].mean(axis=0) for row, length in enumerate(lengths)]
  return float(np.linalg.norm(pooled[0] - pooled[1]) / np.linalg.norm(pooled[0]))


def test_position_bias_std_sets_the_init_and_separates_word_roles(config, tokenizer):
  sharp = config.copy_and_resolve_references()
  sharp.data.text_encoder_position_bias_std = 1.0
  encoder = text_encoder_lib.get_text_encoder(sharp, tokenizer)
  table = np.asarray(encoder.params["block_0_SelfAttention"]["relative_attention_bias"]["embedding"])
  assert 0.7 < table.std() < 1.3
  assert encoder.identity["architecture"]["position_bias_std"] == 1.0
  umt5 = config.copy_and_resolve_references()
  umt5.data.text_encoder_position_bias_std = 0.0  # umT5's own init (configs/tiny.py sets 1.0)
  default = text_encoder_lib.get_text_encoder(umt5, tokenizer)
  default_table = default.params["block_0_SelfAttention"]["relative_attention_bias"]["embedding"]
  assert np.std(default_table) < 0.25  # umT5's d_model**-0.5 = 0.125 at width 64
  # Cross-attention sees the caption as a set of tokens: only context tells "blue" the colour from
  # "blue" the background. A sharper position bias keeps more of that context.
  assert _role_gap(sharp, tokenizer) > 1.5 * _role_gap(umt5, tokenizer)
