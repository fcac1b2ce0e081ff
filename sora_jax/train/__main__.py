"""`python -m sora_jax.train`: runs the train binary, which lives in sora_jax.main.train."""

from sora_jax.main.train import run

if __name__ == "__main__":
  run()
