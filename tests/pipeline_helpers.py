"""A small Wan pipeline directory for tests (needs the [torch] extra): random weights, real file layout."""

from __future__ import annotations

import json
import os
import pathlib


def perturb(model, seed):
  """Adds small seeded noise to every float weight (so zero-initialised layers matter too)."""
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for tensor in model.state_dict().values():
      if tensor.is_floating_point():
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))


def make_pipeline(root: str, captions: list[str], text_dim: int = 16, wan22: bool = False,
                  experts: bool = False) -> str:
  """A Wan pipeline directory of random small weights (vae/, text_encoder/, tokenizer/, transformer/),
  as diffusers / transformers save_pretrained write them, with a sentencepiece model of `captions`.

  `wan22`: the TI2V-5B kind: the Wan2.2 VAE (2x2 patches, residual blocks, 48 channels, 16x spatial)
  and a transformer on its 48 channels. `experts`: the A14B kind: a second transformer (the low-noise
  expert) in transformer_2/ and model_index.json's boundary_ratio 0.875."""
  import diffusers
  import torch
  import transformers

  from sora_jax.encoders import tokenizer as tokenizer_lib

  root = pathlib.Path(root)
  torch.manual_seed(0)
  channels = 48 if wan22 else 16
  if wan22:
    vae = diffusers.AutoencoderKLWan(
        base_dim=16, decoder_base_dim=24, z_dim=channels, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        attn_scales=[], temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
        in_channels=12, out_channels=12, scale_factor_spatial=16, latents_mean=[0.1] * channels,
        latents_std=[1.5] * channels).eval()
  else:
    vae = diffusers.AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     attn_scales=[], temperal_downsample=[False, True, True]).eval()
  perturb(vae, 1)
  vae.save_pretrained(root / "vae")
  tokenizer = tokenizer_lib.train(captions * 4, vocab_size=96)
  os.makedirs(root / "tokenizer")
  tokenizer.save(str(root / "tokenizer" / "spiece.model"))
  umt5_config = transformers.UMT5Config(
      vocab_size=max(96, tokenizer.vocab_size), d_model=text_dim, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
      relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
      is_encoder_decoder=False)
  encoder = transformers.UMT5EncoderModel(umt5_config).eval()
  perturb(encoder, 2)
  encoder.save_pretrained(root / "text_encoder")
  transformer = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
      out_channels=channels,
      text_dim=text_dim, freq_dim=32, ffn_dim=48, num_layers=2,
      rope_max_seq_len=128 if experts else 64).eval()  # A14B samples 720p by default: an 80-patch row
  perturb(transformer, 3)
  transformer.save_pretrained(root / "transformer")
  if experts:
    perturb(transformer, 4)
    transformer.save_pretrained(root / "transformer_2")
    component = ["diffusers", "WanTransformer3DModel"]
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer": component,
             "transformer_2": component}
    (root / "model_index.json").write_text(json.dumps(index))
  return str(root)
