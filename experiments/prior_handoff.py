"""Does a learnt high-noise prior give motion direction? The demo model samples, a high-noise model
takes the steps above a handoff sigma.

`experiments/high_sigma_probe.py --save_params=P` trains a DiT at sigma 0.99 only (the conditional mean
E[x0 | caption]); this samples the adherence prompts with a trainer checkpoint, handing every step
with sigma >= each `--handoff` to that model (unguided: it never saw the empty caption), and prints
prompt adherence per handoff (experiments/README.md, "Fifth round"):

  python experiments/high_sigma_probe.py --clips=clips.npz --data_dir=DIR --text=bias:1.0 --steps=3000 \\
      --save_params=/tmp/prior.msgpack
  python experiments/prior_handoff.py --workdir=W --step=1200 --prior_params=/tmp/prior.msgpack \\
      --prior_text=bias:1.0 --handoff=2,0.9,0.75,0.6
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="trainer workdir of the demo model")
  parser.add_argument("--step", type=int, required=True)
  parser.add_argument("--weights", default="raw", help="raw or ema_<decay>")
  parser.add_argument("--prior_params", required=True, help="high_sigma_probe.py --save_params output")
  parser.add_argument("--prior_text", default="bias:1.0", help="the probe's --text (bias:STD or dataset)")
  parser.add_argument("--prior_no_abs_pos", action="store_true", help="the probe ran with --no_abs_pos")
  parser.add_argument("--handoff", default="2,0.9,0.75,0.6",
                      help="sigmas from which down the demo model takes over (> 1: demo model only)")
  parser.add_argument("--num_prompts", type=int, default=40)
  args = parser.parse_args()

  import high_sigma_probe
  import jax.numpy as jnp
  from flax import serialization

  from sora_jax.diffusion import samplers
  from sora_jax.encoders import text_encoder as text_encoder_lib
  from sora_jax.encoders import vae as vae_lib
  from sora_jax.evaluation import adherence, sampling, weights
  from sora_jax.model.dit import DiT
  from sora_jax.parallel import mesh as mesh_lib

  config = weights.saved_config(args.workdir, args.step)
  params = weights.restore_weights(args.workdir, args.step, config, mesh_lib.create_mesh(config),
                                   [args.weights])[args.weights]
  if not (args.prior_text == "dataset" or args.prior_text.startswith("bias:")):
    raise ValueError(f"--prior_text={args.prior_text!r}; expected bias:STD or dataset")
  prior_config, _ = high_sigma_probe.probe_config(
      "configs/tiny.py", config.data.dir, args.prior_text, not args.prior_no_abs_pos)
  with open(args.prior_params, "rb") as f:
    prior_params = serialization.msgpack_restore(f.read())

  prompts = adherence.synthetic_prompts(args.num_prompts, seed=7)
  text = text_encoder_lib.get_text_encoder(config).encode(prompts)[0]
  prior_text = text_encoder_lib.get_text_encoder(prior_config).encode(prompts)[0]
  width = text.shape[-1]
  # Both models' captions ride in one text array; the prior's half is the same in cond and uncond,
  # so guidance leaves its steps unguided.
  cond = jnp.asarray(np.concatenate([text, prior_text], -1), jnp.float32)
  uncond = jnp.asarray(np.concatenate([np.zeros_like(text), prior_text], -1), jnp.float32)
  model, prior = DiT(config.model), DiT(prior_config.model)
  settings = sampling.SampleSettings.from_config(config)
  shape = (len(prompts), *sampling.latent_shape(config, settings))
  vae = vae_lib.get_vae(config)
  print(f"{args.workdir} step {args.step} ({args.weights}), {len(prompts)} prompts, "
        f"{settings.sample_kwargs(config)}")
  for handoff in (float(value) for value in args.handoff.split(",")):
    def velocity_fn(latents, timesteps, text_embeds, handoff=handoff):
      demo = model.apply({"params": params}, latents, timesteps, text_embeds[..., :width])
      high = prior.apply({"params": prior_params}, latents, timesteps, text_embeds[..., width:])
      return jnp.where((timesteps >= 1000 * handoff)[:, None, None, None, None], high, demo)

    latents = samplers.sample(velocity_fn, samplers.seeded_noise(0, shape), cond=cond, uncond=uncond,
                              **settings.sample_kwargs(config))
    result = adherence.score(list(np.asarray(vae.decode(np.asarray(latents)))), prompts)
    print(f"handoff sigma {handoff}: " + ", ".join(
        f"{name} {result[name]:.0%}" for name in ("color", "background", "direction", "shape")), flush=True)


if __name__ == "__main__":
  main()
