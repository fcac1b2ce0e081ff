"""Language models as one chat interface: a local random tiny LM and a real local endpoint serving it."""

import os
import signal

import pytest
from language_helpers import make_tiny_lm, serve

from sora_jax.language import chat, prompt_extension


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
  return make_tiny_lm(str(tmp_path_factory.mktemp("tiny_lm")))


@pytest.fixture(scope="module")
def endpoint(tiny_lm):
  process, url = serve(tiny_lm)
  yield url
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()


def test_local_extension_is_deterministic_and_not_the_prompt(tiny_lm):
  model = chat.open_chat_model(tiny_lm, flag="--extend_prompt")
  first = prompt_extension.extend(model, "a red ball", seed=3)
  assert first and first == prompt_extension.extend(model, "a red ball", seed=3)
  assert first != "a red ball" and "\n" not in first  # one paragraph


def test_the_endpoint_serves_the_same_replies_as_the_local_model(tiny_lm, endpoint):
  local = chat.open_chat_model(tiny_lm)
  served = chat.open_chat_model(endpoint)  # no model name: the server's first
  assert served.name == "tiny-lm"
  messages = [{"role": "system", "content": prompt_extension.INSTRUCTION},
              {"role": "user", "content": "a cat runs across the grass"}]
  assert served.complete(messages, seed=1) == local.complete(messages, seed=1)
  with pytest.raises(chat.ChatError, match=r"HTTP 404.*'other' is not served"):
    chat.open_chat_model(endpoint, "other").complete(messages)


def test_bad_models_are_one_clear_error(tmp_path):
  with pytest.raises(chat.ChatError, match=r"--extend_prompt='missing' is neither a directory nor"):
    chat.open_chat_model("missing", flag="--extend_prompt")
  with pytest.raises(chat.ChatError, match="has no config.json"):
    chat.open_chat_model(str(tmp_path))
  import socket

  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(chat.ChatError, match=rf"127.0.0.1:{port}/v1/models did not answer"):
    chat.open_chat_model(f"http://127.0.0.1:{port}/v1")
