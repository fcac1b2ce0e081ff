"""The binaries: one module per command, each owning its flags, their checks and a `run()` for `cli.run`.

  train     python -m sora_jax.train       sora-train       sora_jax.train.loop does the work
  eval      python -m sora_jax.eval        sora-eval        sora_jax.evaluation
  sample    python -m sora_jax.sample      sora-sample      sora_jax.evaluation.sampling
  prepare   python -m sora_jax.prepare     sora-prepare     sora_jax.offline.preparation
  export    python -m sora_jax.export      sora-export      sora_jax.export
  compile   python -m sora_jax.compile     sora-compile     sora_jax.tpu_fit
  recaption python -m sora_jax.recaption   sora-recaption   sora_jax.offline.recaptioning
  demo      python -m sora_jax.demo        sora-demo        runs the binaries above as stages
  synthetic python -m sora_jax.data.synthetic  sora-synthetic  sora_jax.offline.synthetic

Library packages never import from here. The `python -m sora_jax.<name>` modules (and
`sora_jax.data.synthetic`, `sora_jax.train.__main__`, `sora_jax.export.__main__`) are two-line shims
that call `run()` of the module here, so the documented commands keep working.
"""
