"""`python -m sora_jax.data.synthetic`: runs the synthetic-data binary in sora_jax.main.synthetic.

The library (renderer, vocabularies, writer, detector) is sora_jax.offline.synthetic.
"""

from sora_jax.main.synthetic import run

if __name__ == "__main__":
  run()
