"""Prompt extension: a short user prompt rewritten into the dense style the model was trained on.

Owns the system instruction (in the style of dense video recaptions), `extend(chat_model, prompt,
seed)`, and the `--extend_prompt` / `--extend_prompt_model` flags `sample` and `eval` both define.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from sora_jax import cli
from sora_jax.language import chat

INSTRUCTION = (
    "You expand short prompts for a text-to-video model into one dense paragraph in the style of its "
    "training captions: the subjects and their appearance, what moves and how, the camera, the "
    "background, the lighting and the visual style. Keep every detail of the user's prompt and "
    "contradict none of it. Reply with the description only, in one paragraph of at most 80 words.")


def extend(chat_model: chat.ChatModel, prompt: str, seed: int = 0, instruction: str = INSTRUCTION) -> str:
  """The extended prompt; deterministic for a model, prompt and seed. Raises ChatError on no reply."""
  reply = chat_model.complete([{"role": "system", "content": instruction},
                               {"role": "user", "content": prompt}], seed=seed)
  reply = " ".join(reply.split())
  if not reply:
    raise chat.ChatError(f"{chat_model.name} returned an empty extension of the prompt {prompt!r}")
  return reply


@dataclasses.dataclass(frozen=True)
class ExtendPromptFlags:
  """A binary's --extend_prompt (a local causal LM directory or an endpoint URL) and --extend_prompt_model."""

  source: flags.FlagHolder
  served_model: flags.FlagHolder

  def check(self) -> None:
    cli.check_model_source("extend_prompt", self.source.value, "causal LM")
    cli.check_served_model("extend_prompt_model", self.served_model.value, "extend_prompt", self.source.value)

  def open_model(self) -> chat.ChatModel | None:
    """The chat model to extend prompts with; None without --extend_prompt."""
    if not self.source.value:
      return None
    return chat.open_chat_model(self.source.value, self.served_model.value, flag="--extend_prompt")


def define_flags(what: str) -> ExtendPromptFlags:
  """Defines the two flags; `what` tells what gets rewritten and where the result goes."""
  return ExtendPromptFlags(
      flags.DEFINE_string(
          "extend_prompt", None, f"{what}, with this language model: a local Hugging Face causal LM "
          "directory, or the base URL of an OpenAI-compatible endpoint (http://HOST:PORT/v1)."),
      flags.DEFINE_string(
          "extend_prompt_model", None,
          "The served model name at an --extend_prompt endpoint (default: its first)."))
