"""FLOPs of the Wan2.1 VAE's chunk programs at 480x832, as XLA counts them with native 3D convolutions.

Compiles (never runs) the four chunk functions of `sora_jax/encoders/wan_vae.py` for the real-size
architecture with the "direct" convolution method the GPU / TPU path uses, and prints XLA's FLOP count
of each and of one 81-frame clip: the cost docs/data.md derives accelerator encode throughput from.

  python bench/vae_flops.py [OUT_JSON]   (default bench/results/vae_flops_480x832.json)
"""

import json
import os
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sora_jax.encoders import wan_vae, wan_vae_convs  # noqa: E402

HEIGHT, WIDTH, FRAMES = 480, 832, 81


def _flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def main() -> None:
  wan_vae_convs.conv_method = lambda *args: "direct"  # what GPU / TPU run; the CPU path saves FLOPs
  with tempfile.TemporaryDirectory() as directory:
    diffusers.AutoencoderKLWan().save_pretrained(directory)
    vae = wan_vae.load(directory)
  spec = jax.ShapeDtypeStruct
  params = jax.tree.map(lambda a: spec(a.shape, a.dtype), vae.params)
  frame = spec((1, 1, HEIGHT, WIDTH, 3), jnp.float32)
  chunk = spec((1, 4, HEIGHT, WIDTH, 3), jnp.float32)
  latent = spec((1, 1, HEIGHT // 8, WIDTH // 8, 16), jnp.float32)
  encode_caches = jax.eval_shape(vae._encode_first, params, frame)[1]
  decode_caches = jax.eval_shape(vae._decode_first, params, latent)[1]
  flops = {
      "encode_first": _flops(vae._encode_first, params, frame),
      "encode_step": _flops(vae._encode_step, params, chunk, encode_caches),
      "decode_first": _flops(vae._decode_first, params, latent),
      "decode_step": _flops(vae._decode_step, params, latent, decode_caches),
  }
  steps = (FRAMES - 1) // 4
  flops[f"encode_clip_{FRAMES}"] = flops["encode_first"] + steps * flops["encode_step"]
  flops[f"decode_clip_{FRAMES}"] = flops["decode_first"] + steps * flops["decode_step"]
  for name, value in flops.items():
    print(f"{name}: {value / 1e12:.2f} TFLOP")
  out = sys.argv[1] if len(sys.argv) > 1 else "bench/results/vae_flops_480x832.json"
  with open(out, "w") as f:
    json.dump(flops, f, indent=2)


if __name__ == "__main__":
  main()
