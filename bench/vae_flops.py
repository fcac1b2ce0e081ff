"""FLOPs of the Wan2.1 VAE's chunk programs at 480x832, as XLA counts them with native 3D convolutions.

Compiles (never runs) the four chunk functions of `sora_jax/encoders/wan_vae.py` for the real-size
architecture with the "direct" convolution method the GPU / TPU path uses, and prints XLA's FLOP count
of each and of one 81-frame clip: the cost docs/data.md derives accelerator encode throughput from.

  python bench/vae_flops.py [OUT_JSON] [--write_docs] [--from_results=JSON]
      (OUT_JSON defaults to bench/results/vae_flops_480x832.json)

`--write_docs` puts the counts, and what they cost at 40% of a chip's bf16 peak, in docs/data.md's
`vae_flops` section; `--from_results` renders a results file without compiling.
"""

import argparse
import json
import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"

import diffusers  # noqa: E402
import docs_section  # noqa: E402  (bench/, beside this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sora_jax.encoders import wan_vae, wan_vae_convs  # noqa: E402
from sora_jax.train import metrics  # noqa: E402

HEIGHT, WIDTH, FRAMES = 480, 832, 81
MFU = 0.4  # a realistic share of peak for the VAE's convolutions, to turn FLOPs into seconds
CHIPS = (("TPU v5p", "one v5p chip"), ("H100", "one H100"))


def _flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def measure(out: str) -> dict:
  """XLA's FLOPs of each chunk program and of one clip; written to `out`."""
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
  with open(out, "w") as f:
    json.dump(flops, f, indent=2)
  return flops


def report(flops: dict) -> str:
  """The docs/data.md section: the per-clip counts and the encode time per chip they imply."""
  encode, decode = flops[f"encode_clip_{FRAMES}"], flops[f"decode_clip_{FRAMES}"]
  per_chip = []
  for kind, name in CHIPS:
    seconds = encode / (MFU * metrics.peak_flops_per_device(kind))
    per_chip.append(f"{seconds:.1f} s of {name} ({metrics.peak_flops_per_device(kind) / 1e12:.0f} TFLOP/s)")
  return (f"XLA counts {encode / 1e12:.0f} TFLOP to encode and {decode / 1e12:.0f} TFLOP to decode one "
          f"{FRAMES}-frame {HEIGHT}x{WIDTH} clip with the Wan2.1 VAE (`python bench/vae_flops.py "
          f"--write_docs`; native 3D convolutions, as on GPU / TPU). At {MFU:.0%} of bf16 peak the encode "
          f"takes {' or '.join(per_chip)} per clip, before the text encoder.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", nargs="?", default="bench/results/vae_flops_480x832.json")
  parser.add_argument("--write_docs", action="store_true")
  parser.add_argument("--from_results", default=None, help="render this results file instead of compiling")
  args = parser.parse_args()
  if args.from_results:
    with open(args.from_results) as f:
      flops = json.load(f)
  else:
    flops = measure(args.out)
  text = report(flops)
  print(text)
  if args.write_docs:
    docs_section.write("vae_flops", text, docs_section.DATA)


if __name__ == "__main__":
  main()
