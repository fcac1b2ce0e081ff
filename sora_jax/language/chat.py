"""Chat with a language model that is either a local directory or an OpenAI-compatible endpoint.

Owns `open_chat_model(spec, model)`: a local Hugging Face causal LM (or, for messages with images,
an image-text-to-text model) directory run with transformers (the `[torch]` extra), or the base URL
of a chat-completions server (`http://HOST:PORT/v1`, what vLLM and SGLang serve). Nothing is
downloaded: a directory must hold the model, a URL must answer. Replies are deterministic: greedy
decoding locally, temperature 0 and the request's seed remotely.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

# {"role": "system" | "user" | "assistant", "content": str or a list of parts}; a part is
# {"type": "text", "text": str} or {"type": "image", "image": uint8 array [H, W, 3]}.
Message = dict[str, Any]


class ChatError(ValueError):
  """A model that cannot be opened or did not answer; the message names it."""


class ChatModel(Protocol):
  name: str

  def complete(self, messages: Sequence[Message], *, seed: int = 0, max_new_tokens: int = 160) -> str:
    """The model's reply to `messages`, stripped."""


def is_endpoint(spec: str) -> bool:
  return spec.startswith(("http://", "https://"))


def open_chat_model(spec: str, model: str | None = None, *, flag: str = "--model",
                    vision: bool = False) -> ChatModel:
  """A local model directory or an endpoint base URL -> a ChatModel; `flag` names the input in errors.

  `vision`: the messages carry images, so a local directory is loaded as an image-text-to-text model.
  """
  if not spec:
    raise ChatError(f"{flag} is empty; expected a local model directory or http://HOST:PORT/v1")
  if is_endpoint(spec):
    return EndpointChatModel(spec, model, flag=flag)
  if not os.path.isdir(spec):
    raise ChatError(f"{flag}={spec!r} is neither a directory nor an http(s):// URL; expected a local "
                    f"Hugging Face model directory or the base URL of a chat-completions endpoint")
  if not os.path.isfile(os.path.join(spec, "config.json")):
    raise ChatError(f"{flag}={spec!r} has no config.json; expected a Hugging Face model directory")
  return LocalVisionChatModel(spec, flag=flag) if vision else LocalChatModel(spec, flag=flag)


def _parts(content: Any) -> list[dict[str, Any]]:
  return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _text_only(messages: Sequence[Message]) -> list[Message]:
  def text(content: Any) -> str:
    return " ".join(part["text"] for part in _parts(content) if part["type"] == "text")

  return [{"role": m["role"], "content": text(m["content"])} for m in messages]


def png_data_url(image: Any) -> str:
  """A uint8 [H, W, 3] image as a data: URL (what chat-completions servers take as image_url)."""
  import base64
  import io

  import numpy as np
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plain_prompt(messages: Sequence[Message]) -> str:
  """A chat as text for tokenizers without a chat template."""
  lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
  return "\n".join(lines) + "\nAssistant:"


def _load_local(directory: str, flag: str, kind: str) -> tuple[Any, Any, Any, str]:
  """(torch, model, tokenizer or processor, device) of a transformers directory; `kind` is "text"
  (causal LM + tokenizer) or "vision" (image-text-to-text model + processor)."""
  try:
    import torch
    import transformers
  except ImportError as error:
    raise ChatError(f"{flag}={directory!r} is a local model, which needs the [torch] extra "
                    f"(pip install -e '.[torch]'): {error}") from None
  if kind == "vision":
    model_class, io_class = transformers.AutoModelForImageTextToText, transformers.AutoProcessor
    what = "a vision-language model (processor and image-text-to-text model)"
  else:
    model_class, io_class = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    what = "a causal language model"
  try:
    io = io_class.from_pretrained(directory, local_files_only=True)
    model = model_class.from_pretrained(directory, local_files_only=True)
  except (OSError, ValueError, KeyError) as error:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ChatError(f"{flag}={directory!r} cannot be loaded as {what}: {first_line}") from None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device).eval()
  return torch, model, io, device


class LocalChatModel:
  """A causal LM directory run with transformers on the CPU (or the first CUDA device if torch has one)."""

  def __init__(self, directory: str, *, flag: str = "--model"):
    self._torch, self._model, self._tokenizer, self._device = _load_local(directory, flag, "text")
    self.name = directory

  def complete(self, messages: Sequence[Message], *, seed: int = 0, max_new_tokens: int = 160) -> str:
    tokenizer = self._tokenizer
    messages = _text_only(messages)
    if getattr(tokenizer, "chat_template", None):
      text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
      text = _plain_prompt(messages)
    # A chat template writes its own BOS; plain text gets the tokenizer's.
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(
        tokenizer, "chat_template", None)).to(self._device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    self._torch.manual_seed(seed)
    with self._torch.no_grad():
      output = self._model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=pad)
    reply = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(reply, skip_special_tokens=True).strip()


class LocalVisionChatModel:
  """An image-text-to-text model directory (processor + model) run with transformers; greedy decoding."""

  def __init__(self, directory: str, *, flag: str = "--model"):
    self._torch, self._model, self._processor, self._device = _load_local(directory, flag, "vision")
    self.name = directory

  def complete(self, messages: Sequence[Message], *, seed: int = 0, max_new_tokens: int = 160) -> str:
    from PIL import Image

    images, templated = [], []
    for message in messages:
      parts = []
      for part in _parts(message["content"]):
        if part["type"] == "image":
          images.append(Image.fromarray(part["image"]))
          parts.append({"type": "image"})
        else:
          parts.append(part)
      templated.append({"role": message["role"], "content": parts})
    text = self._processor.apply_chat_template(templated, add_generation_prompt=True)
    inputs = self._processor(images=images or None, text=text, return_tensors="pt").to(self._device)
    self._torch.manual_seed(seed)
    with self._torch.no_grad():
      output = self._model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    reply = output[0, inputs["input_ids"].shape[1]:]
    return self._processor.decode(reply, skip_special_tokens=True).strip()


class EndpointChatModel:
  """POST {base}/chat/completions of an OpenAI-compatible server; `model` defaults to its first served one."""

  def __init__(self, base_url: str, model: str | None, *, flag: str = "--model", timeout_s: float = 300.0):
    self._base = base_url.rstrip("/")
    self._flag = flag
    self._timeout_s = timeout_s
    self.name = model or self._first_served_model()

  def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"{self._base}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
        return json.loads(response.read())
    except urllib.error.HTTPError as error:
      detail = error.read().decode(errors="replace")[:200]
      raise ChatError(f"{self._flag}={self._base!r}: {url} answered HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
      reason = getattr(error, "reason", error)
      raise ChatError(f"{self._flag}={self._base!r}: {url} did not answer ({reason}); expected an "
                      f"OpenAI-compatible server such as vLLM or SGLang") from None
    except json.JSONDecodeError as error:
      raise ChatError(f"{self._flag}={self._base!r}: {url} did not return JSON ({error})") from None

  def _first_served_model(self) -> str:
    served = self._request("/models").get("data") or []
    if not served:
      raise ChatError(f"{self._flag}={self._base!r} serves no model; name one with the model flag")
    return str(served[0]["id"])

  def complete(self, messages: Sequence[Message], *, seed: int = 0, max_new_tokens: int = 160) -> str:
    wire = []
    for message in messages:
      content = message["content"]
      if not isinstance(content, str):
        content = [{"type": "image_url", "image_url": {"url": png_data_url(p["image"])}}
                   if p["type"] == "image" else p for p in content]
      wire.append({"role": message["role"], "content": content})
    reply = self._request("/chat/completions", {
        "model": self.name, "messages": wire, "temperature": 0.0, "seed": int(seed),
        "max_tokens": int(max_new_tokens)})
    try:
      content = reply["choices"][0]["message"]["content"]
      # null content (a tool call, a refusal): no text, which callers report as an empty reply
      return content.strip() if isinstance(content, str) else ""
    except (KeyError, IndexError, TypeError):
      raise ChatError(f"{self._flag}={self._base!r}: the reply has no choices[0].message.content: "
                      f"{json.dumps(reply)[:200]}") from None
