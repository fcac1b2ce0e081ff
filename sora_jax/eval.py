"""`python -m sora_jax.eval`: runs the eval binary, which lives in sora_jax.main.eval."""

from sora_jax.main.eval import run

if __name__ == "__main__":
  run()
