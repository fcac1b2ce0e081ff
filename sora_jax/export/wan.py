"""The original Wan2.1 checkpoint layout (`wan/modules/model.py` WanModel): key and config maps.

Owns the renaming between diffusers' `WanTransformer3DModel` keys and the original Wan2.1 keys
(tensors are identical; only names differ, with the block norms swapped), and WanModel's config.json.
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections

from sora_jax.export import diffusers as diffusers_lib

WAN_CLASS_NAME = "WanModel"
# What the released Wan2.1 config.json files carry; WanModel's loader ignores this field.
WAN_DIFFUSERS_VERSION = "0.30.0"

# Non-block tensors: original Wan2.1 prefix -> diffusers prefix (each followed by .weight / .bias).
_TOP_LEVEL = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
)
# Per-block tensors (after `blocks.{i}.`). Wan runs norm1, norm3 (affine, before cross-attention),
# norm2 (before the FFN); diffusers names them in call order, so Wan's norm3 is diffusers' norm2.
_BLOCK = (
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)
# Bare parameters (no .weight / .bias suffix).
_TOP_LEVEL_PARAMS = (("head.modulation", "scale_shift_table"),)
_BLOCK_PARAMS = (("modulation", "scale_shift_table"),)

_SUFFIXES = ("weight", "bias")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _tables(wan_to_diffusers: bool) -> tuple[dict[str, str], dict[str, str]]:
  top, block = {}, {}
  for table, pairs, params in ((top, _TOP_LEVEL, _TOP_LEVEL_PARAMS), (block, _BLOCK, _BLOCK_PARAMS)):
    for wan, diffusers in pairs:
      for suffix in _SUFFIXES:
        src, dst = f"{wan}.{suffix}", f"{diffusers}.{suffix}"
        table[src if wan_to_diffusers else dst] = dst if wan_to_diffusers else src
    for wan, diffusers in params:
      table[wan if wan_to_diffusers else diffusers] = diffusers if wan_to_diffusers else wan
  return top, block


_WAN_TO_DIFFUSERS = _tables(wan_to_diffusers=True)
_DIFFUSERS_TO_WAN = _tables(wan_to_diffusers=False)


def _rename(key: str, tables: tuple[dict[str, str], dict[str, str]], source: str) -> str:
  top, block = tables
  if key in top:
    return top[key]
  match = _BLOCK_KEY.match(key)
  if match and match.group(2) in block:
    return f"blocks.{match.group(1)}.{block[match.group(2)]}"
  raise KeyError(f"tensor {key!r} is not a {source} WanTransformer (text-to-video) key sora_jax knows")


def wan_to_diffusers_key(key: str) -> str:
  """Original Wan2.1 tensor name -> diffusers WanTransformer3DModel tensor name."""
  return _rename(key, _WAN_TO_DIFFUSERS, "original Wan2.1")


def diffusers_to_wan_key(key: str) -> str:
  """diffusers WanTransformer3DModel tensor name -> original Wan2.1 tensor name."""
  return _rename(key, _DIFFUSERS_TO_WAN, "diffusers")


def wan_config(model: ml_collections.ConfigDict, text_len: int) -> dict[str, Any]:
  """WanModel's config.json for a sora_jax model config (`text_len`: padded caption tokens).

  WanModel ignores patch_size, text_dim, qk_norm, cross_attn_norm and window_size in config.json
  (it assumes (1, 2, 2), 4096, True, True, global); they are written anyway so the file describes
  the weights, and `model_updates_from_wan_config` reads them back.
  """
  diffusers_lib.check_wan_architecture(model, "Wan2.1's WanModel")
  return {
      "_class_name": WAN_CLASS_NAME,
      "_diffusers_version": WAN_DIFFUSERS_VERSION,
      "model_type": "t2v",
      "patch_size": [int(p) for p in model.patch_size],
      "text_len": int(text_len),
      "in_dim": int(model.in_channels),
      "dim": int(model.dim),
      "ffn_dim": int(model.ffn_dim),
      "freq_dim": int(model.freq_dim),
      "text_dim": int(model.text_dim),
      "out_dim": int(model.out_channels),
      "num_heads": int(model.num_heads),
      "num_layers": int(model.num_layers),
      "window_size": [-1, -1],
      "qk_norm": bool(model.qk_norm),
      "cross_attn_norm": bool(model.cross_attn_norm),
      "eps": float(model.eps),
  }


# WanModel.__init__ defaults, used for fields a config.json leaves out.
_WAN_DEFAULTS = {
    "model_type": "t2v",
    "patch_size": [1, 2, 2],
    "text_len": 512,
    "in_dim": 16,
    "dim": 2048,
    "ffn_dim": 8192,
    "freq_dim": 256,
    "text_dim": 4096,
    "out_dim": 16,
    "num_heads": 16,
    "num_layers": 32,
    "window_size": [-1, -1],
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}


def model_updates_from_wan_config(config_json: dict[str, Any], source: str) -> dict[str, Any]:
  """Model config fields (and data.text_len) for a WanModel config.json; raises on what sora_jax lacks."""
  if config_json.get("_class_name", WAN_CLASS_NAME) != WAN_CLASS_NAME:
    raise ValueError(f"{source}: _class_name={config_json['_class_name']!r}; expected {WAN_CLASS_NAME!r}")
  unknown = sorted(k for k in config_json if not k.startswith("_") and k not in _WAN_DEFAULTS)
  if unknown:
    raise ValueError(f"{source}: WanModel config fields {unknown} are not ones sora_jax can represent")
  wan = {**_WAN_DEFAULTS, **config_json}
  if wan["model_type"] != "t2v":
    raise ValueError(
        f"{source}: model_type={wan['model_type']!r}; sora_jax represents only text-to-video ('t2v') models")
  if list(wan["window_size"]) != [-1, -1]:
    raise ValueError(f"{source}: window_size={wan['window_size']}; sora_jax has only global attention")
  if len(wan["patch_size"]) != 3:
    raise ValueError(f"{source}: patch_size={wan['patch_size']}; expected three ints (p_t, p_h, p_w)")
  return {
      "model.patch_size": tuple(int(p) for p in wan["patch_size"]),
      "model.in_channels": int(wan["in_dim"]),
      "model.dim": int(wan["dim"]),
      "model.ffn_dim": int(wan["ffn_dim"]),
      "model.freq_dim": int(wan["freq_dim"]),
      "model.text_dim": int(wan["text_dim"]),
      "model.out_channels": int(wan["out_dim"]),
      "model.num_heads": int(wan["num_heads"]),
      "model.num_layers": int(wan["num_layers"]),
      "model.qk_norm": bool(wan["qk_norm"]),
      "model.cross_attn_norm": bool(wan["cross_attn_norm"]),
      "model.eps": float(wan["eps"]),
      "data.text_len": int(wan["text_len"]),
  }
