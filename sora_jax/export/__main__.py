"""`python -m sora_jax.export`: runs the export binary, which lives in sora_jax.main.export."""

from sora_jax.main.export import run

if __name__ == "__main__":
  run()
