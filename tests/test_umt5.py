"""The pretrained umT5 loader against transformers: parity in fp32 and bf16, layouts, errors, tokenizer."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from sora_jax.config import load as load_config  # noqa: E402
from sora_jax.encoders import text_encoder as text_encoder_lib  # noqa: E402
from sora_jax.encoders import tokenizer as tokenizer_lib  # noqa: E402
from sora_jax.encoders import umt5, umt5_network  # noqa: E402
from sora_jax.files import safetensors_io  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(1)

# max_distance 64 with L = 80: distances 0-7 are exact buckets, 8-63 log-spaced, 64-79 the clamped last one.
ARCH = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
            relative_attention_num_buckets=32, relative_attention_max_distance=64,
            feed_forward_proj="gated-gelu", dropout_rate=0.0)
LENGTHS = (80, 37, 5)
CAPTIONS = ["a red ball rolls across a green field", "waves break on a sandy beach at dusk",
            "a small boat drifts on a calm blue lake", "snow falls over a quiet dark forest"]


def _perturb(model, seed):
  """Random weights far from init: norm weights around 1 but not 1, position biases that matter."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
      if "relative_attention_bias" in name:
        tensor.mul_(5.0)


def _inputs(lengths=LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, ARCH["vocab_size"], (len(lengths), max(lengths))).astype(np.int32)
  mask = np.arange(ids.shape[1])[None] < np.asarray(lengths)[:, None]
  ids[~mask] = tokenizer_lib.PAD_ID
  return ids, mask


def _reference(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(directory, model): a perturbed UMT5EncoderModel written by save_pretrained."""
  torch.manual_seed(0)
  model = transformers.UMT5EncoderModel(transformers.UMT5Config(**ARCH)).eval()
  _perturb(model, 1)
  directory = str(tmp_path_factory.mktemp("umt5") / "text_encoder")
  model.save_pretrained(directory)
  return directory, model


@pytest.fixture(scope="module")
def loaded(checkpoint):
  return umt5.load(checkpoint[0])


def test_fp32_parity_with_transformers(checkpoint, loaded):
  _, model = checkpoint
  ids, mask = _inputs()
  reference = _reference(model, ids, mask)
  ours = np.asarray(loaded(ids, mask))
  assert ours.shape == (3, 80, ARCH["d_model"]) and ours.dtype == np.float32
  error = relative_error(ours[mask], reference[mask])
  assert error < 1e-5, error
  # Padded positions attend to the real keys only, so they match too (Wan zeroes them afterwards).
  assert relative_error(ours, reference) < 1e-5
  # Without a mask every position is a key, as in transformers.
  unmasked = _reference(model, ids[:1], np.ones_like(mask[:1]))
  assert relative_error(np.asarray(loaded(ids[:1])), unmasked) < 1e-5


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 64), (16, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  config = transformers.UMT5Config(**{**ARCH, "relative_attention_num_buckets": num_buckets,
                                      "relative_attention_max_distance": max_distance})
  attention = transformers.models.umt5.modeling_umt5.UMT5Attention(config, has_relative_attention_bias=True)
  relative = np.arange(-600, 601)
  expected = attention._relative_position_bucket(torch.from_numpy(relative)).numpy()
  ours = umt5_network.relative_position_bucket(jnp.asarray(relative), num_buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(ours), expected)


def test_sharded_and_full_model_checkpoints_load_the_same(checkpoint, loaded, tmp_path):
  directory, model = checkpoint
  ids, mask = _inputs()
  expected = np.asarray(loaded(ids, mask))
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  np.testing.assert_array_equal(np.asarray(umt5.load(sharded)(ids, mask)), expected)
  # An encoder-decoder checkpoint: the decoder and lm_head are there and ignored.
  full = transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(**ARCH)).eval()
  missing, _ = full.load_state_dict(model.state_dict(), strict=False)
  assert not [name for name in missing if name.startswith("encoder.block")]
  full_dir = str(tmp_path / "full")
  full.save_pretrained(full_dir)
  names = safetensors_io.Reader(full_dir, prefix="model").specs()
  assert any(name.startswith("decoder.") for name in names)
  np.testing.assert_array_equal(np.asarray(umt5.load(full_dir)(ids, mask)), expected)


def test_a_bfloat16_checkpoint_loads_in_float32(checkpoint, tmp_path):
  _, model = checkpoint
  stored = transformers.UMT5EncoderModel(transformers.UMT5Config(**ARCH)).eval()
  stored.load_state_dict(model.state_dict())
  stored.to(torch.bfloat16).save_pretrained(str(tmp_path))
  specs = safetensors_io.Reader(str(tmp_path), prefix="model").specs()
  assert specs["shared.weight"].dtype.name == "bfloat16"
  ids, mask = _inputs()
  reference = _reference(stored.float(), ids, mask)  # the bf16-rounded weights, run in float32
  error = relative_error(np.asarray(umt5.load(str(tmp_path))(ids, mask))[mask], reference[mask])
  assert error < 1e-5, error


def test_t5_shares_block_0_position_bias(tmp_path):
  config = transformers.T5Config(**ARCH)
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(config).eval()
  _perturb(model, 2)
  model.save_pretrained(str(tmp_path))
  ids, mask = _inputs()
  loaded = umt5.load(str(tmp_path))
  assert loaded.config.shared_position_bias
  error = relative_error(np.asarray(loaded(ids, mask))[mask], _reference(model, ids, mask)[mask])
  assert error < 1e-5, error


def test_bfloat16(checkpoint):
  directory, model = checkpoint
  encoder = umt5.load(directory, dtype="bfloat16")
  shared = encoder.params["shared"]["embedding"]
  assert shared.dtype == jnp.bfloat16
  assert encoder.params["block_0_DenseReluDense"]["wo"]["kernel"].dtype == jnp.bfloat16
  assert encoder.params["final_layer_norm"]["weight"].dtype == jnp.float32
  ids, mask = _inputs()
  ours = np.asarray(encoder(ids, mask))
  assert ours.dtype == np.float32
  reference = _reference(model, ids, mask)[mask]
  error = relative_error(ours[mask], reference)
  assert 0 < error < 5e-2, error
  # No worse than transformers itself in bfloat16 (which also keeps its residual stream in bfloat16).
  torch_bf16 = transformers.UMT5EncoderModel(transformers.UMT5Config(**ARCH)).eval()
  torch_bf16.load_state_dict(model.state_dict())
  torch_bf16_out = _reference(torch_bf16.to(torch.bfloat16), ids, mask)
  assert error <= 1.1 * relative_error(torch_bf16_out[mask], reference)


def _copy(directory, tmp_path, name):
  target = str(tmp_path / name)
  shutil.copytree(directory, target)
  return target


def _edit_config(directory, **fields):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(fields)
  with open(path, "w") as f:
    json.dump(config, f)


def test_errors_name_the_path_and_the_expectation(checkpoint, tmp_path):
  directory, _ = checkpoint
  with pytest.raises(umt5.UMT5Error, match="does not exist"):
    umt5.load(str(tmp_path / "absent"))
  no_config = _copy(directory, tmp_path, "no_config")
  os.remove(os.path.join(no_config, "config.json"))
  with pytest.raises(umt5.UMT5Error, match=f"{no_config}/config.json does not exist"):
    umt5.load(no_config)
  relu = _copy(directory, tmp_path, "relu")
  _edit_config(relu, feed_forward_proj="relu")
  with pytest.raises(umt5.UMT5Error, match=r"relu/config.json: feed_forward_proj='relu'; expected a gated"):
    umt5.load(relu)
  bert = _copy(directory, tmp_path, "bert")
  _edit_config(bert, model_type="bert")
  with pytest.raises(umt5.UMT5Error, match=r"bert/config.json: model_type='bert'; expected 'umt5'"):
    umt5.load(bert)
  wider = _copy(directory, tmp_path, "wider")
  _edit_config(wider, d_ff=40)
  with pytest.raises(umt5.UMT5Error, match=r"wider does not hold .*encoder.block.0.layer.1.DenseReluDense"
                                           r".wi_0.weight \(shape \[48, 32\]; expected \[40, 32\]\)"):
    umt5.load(wider)
  # One tensor short: rewrite the file without the last block's FFN norm.
  missing = _copy(directory, tmp_path, "missing")
  reader = safetensors_io.Reader(missing, prefix="model")
  dropped = "encoder.block.2.layer.1.layer_norm.weight"
  tensors = {name: np.array(value) for name, value in reader.items() if name != dropped}
  path = os.path.join(missing, "model.safetensors")
  specs = [safetensors_io.TensorSpec(name, value.shape, value.dtype) for name, value in tensors.items()]
  safetensors_io.write_file(path, specs, tensors.__getitem__)
  with pytest.raises(umt5.UMT5Error, match=rf"missing does not hold .*{dropped} \(missing; expected shape"):
    umt5.load(missing)
  os.remove(path)
  with pytest.raises(umt5.UMT5Error, match="cannot read the umT5 weights of .*missing.*safetensors"):
    umt5.load(missing)
  with pytest.raises(umt5.UMT5Error, match="dtype='float16'"):
    umt5.load(directory, dtype="float16")


def test_input_errors(loaded):
  ids, mask = _inputs()
  with pytest.raises(umt5.UMT5Error, match=r"expected ids in \[0, 100\)"):
    loaded(ids + 50, mask)
  with pytest.raises(umt5.UMT5Error, match="attention_mask has shape"):
    loaded(ids, mask[:, :10])
  with pytest.raises(umt5.UMT5Error, match=r"expected integer \[B, L\]"):
    loaded(ids[0])


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.train(CAPTIONS * 3, vocab_size=80)


def test_text_encoder_from_pretrained(checkpoint, tokenizer):
  directory, model = checkpoint
  assert tokenizer.vocab_size <= ARCH["vocab_size"]
  encoder = text_encoder_lib.umt5_text_encoder(directory, tokenizer, 16)
  embeds, lengths = encoder.encode(CAPTIONS)
  ids, _ = tokenizer.encode(CAPTIONS, 16)
  mask = np.arange(16)[None] < lengths[:, None]
  reference = _reference(model, ids, mask) * mask[..., None]  # Wan zeroes the padding positions
  assert embeds.shape == (4, 16, ARCH["d_model"]) and not embeds[~mask].any()
  assert relative_error(embeds, reference) < 1e-5
  identity = encoder.identity
  assert identity["name"] == "umt5" and identity["dtype"] == "float32"
  assert identity["architecture"]["d_ff"] == ARCH["d_ff"]
  assert [entry["file"] for entry in identity["weights"]] == ["model.safetensors"]
  assert identity["weights"][0]["bytes"] == os.path.getsize(os.path.join(directory, "model.safetensors"))
  json.dumps(identity)  # goes into the dataset metadata
  big = tokenizer_lib.train(CAPTIONS * 3 + [" ".join(f"w{i}" for i in range(300))], vocab_size=160)
  assert big.vocab_size > ARCH["vocab_size"]
  with pytest.raises(umt5.UMT5Error, match="more than the 100 embedding rows"):
    text_encoder_lib.umt5_text_encoder(directory, big, 16)


def test_get_text_encoder_reads_a_pipeline_directory(checkpoint, tokenizer, tmp_path):
  shutil.copytree(checkpoint[0], tmp_path / "text_encoder")
  os.makedirs(tmp_path / "tokenizer")
  tokenizer.save(str(tmp_path / "tokenizer" / "spiece.model"))
  config = load_config("configs/wan_1_3b.py")
  config.data.pretrained = str(tmp_path)
  config.data.text_len = 16
  config.model.text_dim = ARCH["d_model"]
  encoder = text_encoder_lib.get_text_encoder(config)
  assert encoder.tokenizer.sha256 == tokenizer.sha256 and encoder.identity["name"] == "umt5"
  assert encoder.encode(CAPTIONS[:1])[0].shape == (1, 16, ARCH["d_model"])


def test_load_pretrained_tokenizer(tokenizer, tmp_path):
  tokenizer.save(str(tmp_path / "spiece.model"))
  loaded = tokenizer_lib.load_pretrained(str(tmp_path))
  assert loaded.sha256 == tokenizer.sha256
  with pytest.raises(tokenizer_lib.TokenizerError,
                     match=rf"{tmp_path}/absent/spiece.model does not exist; expected the sentencepiece"):
    tokenizer_lib.load_pretrained(str(tmp_path / "absent"))
  # Whitespace is collapsed as Wan's prompt_clean does.
  messy, _ = loaded.encode(["  a red ball\trolls\n\nacross   a green field "], 16)
  clean, _ = loaded.encode(["a red ball rolls across a green field"], 16)
  np.testing.assert_array_equal(messy, clean)

