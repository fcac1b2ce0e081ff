"""Tests of the original Wan2.1 key and config maps against Wan's own key list and diffusers."""

import pytest
from sora_jax.configs import tiny

from sora_jax.export import wan

# State-dict keys of the original Wan2.1 `WanModel(model_type='t2v', num_layers=2, qk_norm=True,
# cross_attn_norm=True)`, read off wan/modules/model.py (Wan-Video/Wan2.1): norm1 / norm2 are
# non-affine (no tensors), norm3 is the affine LayerNorm before cross-attention, `freqs` is a plain
# attribute (not a buffer).
WAN_T2V_KEYS_2_LAYERS = [
    "patch_embedding.weight", "patch_embedding.bias",
    "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias",
] + [
    f"blocks.{i}.{name}" for i in range(2) for name in (
        "modulation",
        "self_attn.q.weight", "self_attn.q.bias", "self_attn.k.weight", "self_attn.k.bias",
        "self_attn.v.weight", "self_attn.v.bias", "self_attn.o.weight", "self_attn.o.bias",
        "self_attn.norm_q.weight", "self_attn.norm_k.weight",
        "norm3.weight", "norm3.bias",
        "cross_attn.q.weight", "cross_attn.q.bias", "cross_attn.k.weight", "cross_attn.k.bias",
        "cross_attn.v.weight", "cross_attn.v.bias", "cross_attn.o.weight", "cross_attn.o.bias",
        "cross_attn.norm_q.weight", "cross_attn.norm_k.weight",
        "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias",
    )
] + ["head.head.weight", "head.head.bias", "head.modulation"]


def test_key_map_round_trips_every_wan_key():
  diffusers_keys = [wan.wan_to_diffusers_key(k) for k in WAN_T2V_KEYS_2_LAYERS]
  assert len(set(diffusers_keys)) == len(diffusers_keys)
  assert [wan.diffusers_to_wan_key(k) for k in diffusers_keys] == WAN_T2V_KEYS_2_LAYERS


def test_norms_swap_between_layouts():
  assert wan.wan_to_diffusers_key("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
  assert wan.diffusers_to_wan_key("blocks.3.norm2.bias") == "blocks.3.norm3.bias"
  # Wan's norm2 (before the FFN) and diffusers' norm3 are non-affine: no tensor may carry either name.
  with pytest.raises(KeyError, match="norm2"):
    wan.wan_to_diffusers_key("blocks.0.norm2.weight")
  with pytest.raises(KeyError, match="norm3"):
    wan.diffusers_to_wan_key("blocks.0.norm3.weight")


def test_unknown_keys_are_rejected_by_name():
  with pytest.raises(KeyError, match="img_emb"):
    wan.wan_to_diffusers_key("img_emb.proj.0.weight")
  with pytest.raises(KeyError, match="blocks.0.attn2.add_k_proj.weight"):
    wan.diffusers_to_wan_key("blocks.0.attn2.add_k_proj.weight")


@pytest.mark.torch
def test_key_map_matches_diffusers_model_and_converter():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

  model = diffusers.WanTransformer3DModel(
      num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=8, freq_dim=16,
      ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
  ours = {wan.wan_to_diffusers_key(k) for k in WAN_T2V_KEYS_2_LAYERS}
  assert ours == set(model.state_dict())
  # diffusers' own single-file converter agrees with the map, key by key.
  converted = convert_wan_transformer_to_diffusers({k: torch.zeros(1) for k in WAN_T2V_KEYS_2_LAYERS})
  assert sorted(converted) == sorted(ours)
  for key in WAN_T2V_KEYS_2_LAYERS:
    assert wan.wan_to_diffusers_key(key) in converted


def test_config_round_trip_and_unrepresentable_models():
  config = tiny.get_config()
  config_json = wan.wan_config(config.model, config.data.text_len)
  assert config_json["_class_name"] == "WanModel" and config_json["in_dim"] == 12
  updates = wan.model_updates_from_wan_config(config_json, "test")
  for field, value in updates.items():
    group, name = field.split(".")
    assert config[group][name] == value, field
  # A released Wan2.1 config.json leaves out what WanModel ignores; the defaults fill it in.
  released = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
              "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
              "num_layers": 30, "out_dim": 16, "text_len": 512}
  updates = wan.model_updates_from_wan_config(released, "released")
  assert updates["model.text_dim"] == 4096 and updates["model.patch_size"] == (1, 2, 2)
  with pytest.raises(ValueError, match="model_type='i2v'"):
    wan.model_updates_from_wan_config({**released, "model_type": "i2v"}, "x")
  with pytest.raises(ValueError, match="window_size"):
    wan.model_updates_from_wan_config({**released, "window_size": [4, 4]}, "x")
  with pytest.raises(ValueError, match="vace_layers"):
    wan.model_updates_from_wan_config({**released, "vace_layers": [0, 2]}, "x")
  config.model.abs_pos_embedding = True
  with pytest.raises(ValueError, match="abs_pos_embedding=True has no equivalent in Wan2.1"):
    wan.wan_config(config.model, config.data.text_len)
  config.model.abs_pos_embedding = False
  config.model.prediction = "x0"
  with pytest.raises(ValueError, match="prediction='x0' has no equivalent in Wan2.1"):
    wan.wan_config(config.model, config.data.text_len)
