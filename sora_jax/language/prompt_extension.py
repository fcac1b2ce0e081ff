"""Prompt extension: a short user prompt rewritten into the dense style the model was trained on.

Owns the system instruction (in the style of dense video recaptions) and `extend(chat_model, prompt,
seed)`, which `sample` and `eval` call for `--extend_prompt`.
"""

from __future__ import annotations

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
