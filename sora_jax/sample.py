"""`python -m sora_jax.sample`: runs the sample binary, which lives in sora_jax.main.sample."""

from sora_jax.main.sample import run

if __name__ == "__main__":
  run()
