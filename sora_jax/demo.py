"""`python -m sora_jax.demo`: runs the demo binary, which lives in sora_jax.main.demo."""

from sora_jax.main.demo import run

if __name__ == "__main__":
  run()
