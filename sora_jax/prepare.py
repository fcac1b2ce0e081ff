"""`python -m sora_jax.prepare`: runs the prepare binary, which lives in sora_jax.main.prepare."""

from sora_jax.main.prepare import run

if __name__ == "__main__":
  run()
