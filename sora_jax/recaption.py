"""`python -m sora_jax.recaption`: runs the recaption binary, which lives in sora_jax.main.recaption."""

from sora_jax.main.recaption import run

if __name__ == "__main__":
  run()
