"""`python -m sora_jax.compile`: runs the compile binary, which lives in sora_jax.main.compile."""

from sora_jax.main.compile import run

if __name__ == "__main__":
  run()
