"""Offline language models for tests: a random-weight tiny causal LM, and a chat-completions server of it.

`make_tiny_lm(directory)` writes a 2-layer Llama with a word-level tokenizer (built here, no download)
as a Hugging Face model directory. `serve(directory)` starts tests/chat_server.py on 127.0.0.1 in its
own session: a real HTTP server process speaking the OpenAI chat-completions protocol, which stops by
itself after its time limit.
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


def serve(directory: str, lifetime_s: float = 300.0):
  """(process, base URL) of a chat-completions server of the model in `directory`."""
  here = os.path.dirname(os.path.abspath(__file__))
  process = subprocess.Popen(
      [sys.executable, os.path.join(here, "chat_server.py"), directory, str(lifetime_s)],
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
