"""Small random-weight feature models written the way their libraries save them (needs the [torch] extra)."""

from __future__ import annotations

import os


def make_videomae(directory: str) -> str:
  """A VideoMAE directory (4 frames of 32x32, width 32) with its image processor."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.VideoMAEConfig(
      image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64)
  transformers.VideoMAEModel(config).eval().save_pretrained(directory)
  transformers.VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                      ).save_pretrained(directory)
  return str(directory)


def make_siglip(directory: str) -> str:
  """A SigLIP directory (32x32 images, width 16) with a sentencepiece tokenizer trained on a few captions."""
  import torch
  import transformers

  from sora_jax.encoders import tokenizer as tokenizer_lib

  os.makedirs(directory, exist_ok=True)
  captions = ["a red ball rolls", "waves on a beach", "a boat on a lake", "snow in a forest",
              "a red circle moves left on a blue background"] * 5
  spiece = os.path.join(directory, "spiece.model")
  tokenizer_lib.train(captions, vocab_size=64).save(spiece)
  tokenizer = transformers.SiglipTokenizer(vocab_file=spiece, model_max_length=16)
  image_processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
  processor = transformers.SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
  processor.save_pretrained(directory)
  torch.manual_seed(0)
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2))
  transformers.SiglipModel(config).eval().save_pretrained(directory)
  return str(directory)
