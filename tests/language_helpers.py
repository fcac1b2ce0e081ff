"""Offline language models for tests: random-weight tiny models, and a chat-completions server of one.

`make_tiny_lm(directory)` writes a 2-layer Llama with a word-level tokenizer (built here, no download)
as a Hugging Face model directory; `make_tiny_vlm` a LLaVA of it with a tiny CLIP vision tower.
`serve(directory)` starts tests/chat_server.py on 127.0.0.1 in its own session: a real HTTP server
process speaking the OpenAI chat-completions protocol, which stops by itself after its time limit.
"""

import os
import subprocess
import sys
import time

WORDS = ("a the red blue green ball circle square cat dog moves left right up down across field sky city "
         "night day slowly quickly camera pans zooms bright dark light background foreground over under "
         "on in with and of while rolls runs flies water grass sand wall").split()


def make_tiny_lm(directory: str, seed: int = 0) -> str:
  import torch
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

  specials = ["<unk>", "<s>", "</s>", ":", "."]
  vocab = {token: index for index, token in enumerate(specials + [w.capitalize() for w in
                                                                   ("system", "user", "assistant")] + WORDS)}
  tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
  config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(config)
  model.save_pretrained(directory)
  fast.save_pretrained(directory)
  return directory


def make_tiny_vlm(directory: str, seed: int = 0) -> str:
  """A random LLaVA (CLIP vision tower of 32-pixel inputs, 2-layer Llama) with its processor."""
  import torch
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
  )

  specials = ["<unk>", "<s>", "</s>", "<image>", ":", "."]
  vocab = {token: index for index, token in enumerate(specials + ["User", "Assistant"] + WORDS)}
  tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
  fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
  config = LlavaConfig(
      vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
      text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              max_position_embeddings=1024, bos_token_id=1, eos_token_id=2),
      image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="full")
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(config)
  template = ("{% for m in messages %}{{ m['role'] | capitalize }}: {% if m['content'] is string %}"
              "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
              "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
              "{% if add_generation_prompt %}Assistant:{% endif %}")
  processor = LlavaProcessor(
      image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
      tokenizer=fast, patch_size=8, vision_feature_select_strategy="full", chat_template=template,
      num_additional_image_tokens=1)
  model.save_pretrained(directory)
  processor.save_pretrained(directory)
  return directory


def serve(directory: str, lifetime_s: float = 300.0, vision: bool = False):
  """(process, base URL) of a chat-completions server of the model in `directory`."""
  here = os.path.dirname(os.path.abspath(__file__))
  process = subprocess.Popen(
      [sys.executable, os.path.join(here, "chat_server.py"), directory, str(lifetime_s),
       "vision" if vision else "text"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
      env={**os.environ, "PYTHONPATH": os.path.dirname(here)})
  deadline = time.time() + 120
  line = ""
  while time.time() < deadline and not line.startswith("listening"):
    line = process.stdout.readline()
    if not line and process.poll() is not None:
      raise RuntimeError(f"chat server exited: {process.stderr.read()[-2000:]}")
  port = int(line.split()[-1])
  return process, f"http://127.0.0.1:{port}/v1"
