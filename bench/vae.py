"""Wan VAE benchmark: encode + decode with sora_jax's JAX VAE against diffusers' AutoencoderKLWan.

Owns the speed comparison (real-size architecture, random weights, fp32, one clip) and the peak-memory
comparison of a short and a long clip, and the docs/benchmarks.md section they write.

Every measurement runs in its own child process of this one, sides alternating (A B, B A, ...), so thread
pools never spin against each other, both sides see the same machine load, and each child's peak
resident memory (ru_maxrss) is its own:

  python bench/vae.py [--variant=wan2.1|wan2.2] [--frames=17 --size=256 --repeats=3
                      --memory_frames=17,81 --memory_size=128] [--write_docs] [--json=out.json]
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import docs_section  # bench/, beside this script
from absl import app, flags

_VARIANT = flags.DEFINE_enum("variant", "wan2.1", ["wan2.1", "wan2.2"],
                             "which real-size VAE: Wan2.1's (16 channels, 8x) or Wan2.2's (48 channels, 16x)")
_FRAMES = flags.DEFINE_integer("frames", 17, "frames of the timed clip (1 + 4k)")
_SIZE = flags.DEFINE_integer("size", 256, "height = width of the timed clip, pixels")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed encode + decode rounds per side (after a warm-up)")
_MEMORY_FRAMES = flags.DEFINE_list("memory_frames", ["17", "81"], "clip lengths of the peak-memory rows")
_MEMORY_SIZE = flags.DEFINE_integer("memory_size", 128, "height = width of the peak-memory clips")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace the vae section of docs/benchmarks.md")
_JSON = flags.DEFINE_string("json", None, "also write the measured rows as JSON here")
_CHILD = flags.DEFINE_string("child", None, "internal: run one side in this process (jax | torch)")
_WEIGHTS = flags.DEFINE_string("weights", None, "internal: the saved diffusers VAE directory")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "internal: timed rounds of a child")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(side: str, weights: str, frames: int, size: int, rounds: int) -> dict:
  """Times `rounds` encode + decode of one random clip after an untimed warm-up; reports peak RSS."""
  import numpy as np

  video = np.random.default_rng(0).uniform(-1, 1, (1, frames, size, size, 3)).astype(np.float32)
  if side == "jax":
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                     os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    from sora_jax.encoders import wan_vae

    vae = wan_vae.load(weights)

    def round_trip():
      encode_start = time.perf_counter()
      latents = vae.encode(video, normalize=False)
      decode_start = time.perf_counter()
      vae.decode(latents, normalize=False)
      return decode_start - encode_start, time.perf_counter() - decode_start
  else:
    import diffusers
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = diffusers.AutoencoderKLWan.from_pretrained(weights).eval()

    def round_trip():
      pixels = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3)))
      with torch.no_grad():
        encode_start = time.perf_counter()
        latents = model.encode(pixels).latent_dist.mode()
        decode_start = time.perf_counter()
        model.decode(latents)
      return decode_start - encode_start, time.perf_counter() - decode_start
  start = time.perf_counter()
  # Warm-up on the clip's first 5 frames: the chunk programs depend on the frame size, not the clip
  # length, so this compiles everything the timed rounds run, at a fraction of their cost.
  timed_video, video = video, video[:, :5]
  round_trip()
  warmup_s = time.perf_counter() - start
  video = timed_video
  times = [round_trip() for _ in range(rounds)]
  return {"side": side, "frames": frames, "size": size, "warmup_s": warmup_s, "times": times,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _run_child(side: str, weights: str, frames: int, size: int, rounds: int) -> dict:
  command = [sys.executable, os.path.abspath(__file__), f"--child={side}", f"--weights={weights}",
             f"--frames={frames}", f"--size={size}", f"--rounds={rounds}"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{side} child failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _save_reference(variant: str, directory: str) -> None:
  """The real-size architecture of `variant` with random weights, as diffusers saves it."""
  import diffusers
  import numpy as np
  import torch

  torch.manual_seed(0)
  if variant == "wan2.1":
    diffusers.AutoencoderKLWan().save_pretrained(directory)
    return
  rng = np.random.default_rng(0)  # Wan2.2's published statistics are not needed to time it
  diffusers.AutoencoderKLWan(
      base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
      temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
      out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
      latents_mean=rng.normal(0, 0.5, 48).tolist(), latents_std=rng.uniform(0.5, 2, 48).tolist(),
  ).save_pretrained(directory)


def _stats(values: list[float]) -> str:
  return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def _report(rows: dict, loads: tuple[float, float]) -> str:
  speed = rows["speed"]
  frames, size = speed["jax"][0]["frames"], speed["jax"][0]["size"]
  totals = {side: [e + d for run in runs for e, d in run["times"]] for side, runs in speed.items()}
  encode = {side: [e for run in runs for e, _ in run["times"]] for side, runs in speed.items()}
  decode = {side: [d for run in runs for _, d in run["times"]] for side, runs in speed.items()}
  ratio = statistics.median(totals["jax"]) / statistics.median(totals["torch"])
  fastest = min(totals["jax"]) / min(totals["torch"])
  variant = rows.get("variant", "wan2.1")
  title, architecture = {
      "wan2.1": ("Wan2.1", "`AutoencoderKLWan()` defaults"),
      "wan2.2": ("Wan2.2", "base 160, decoder base 256, `is_residual`, patch 2, 48 channels"),
  }[variant]
  lines = [
      f"## {title} VAE against diffusers (bench/vae.py --variant={variant})",
      "",
      f"Encode + decode of one random {frames}x{size}x{size} clip (fp32, batch 1) with the real-size",
      f"{title} VAE architecture ({architecture}, random weights): sora_jax's",
      "`encoders/wan_vae.py` (jit, one CPU device) against diffusers + torch, each run in its own",
      f"process, sides alternating. Load average {loads[0]:.1f} before, {loads[1]:.1f} after.",
      "",
      "| side | encode s median [min, max] | decode s median [min, max] | total s median [min, max] | "
      "warm-up s (5 frames, compile included) |",
      "|---|---|---|---|---|",
  ]
  for side, label in (("jax", "sora_jax"), ("torch", "diffusers")):
    warmup = statistics.median(run["warmup_s"] for run in speed[side])
    lines.append(f"| {label} | {_stats(encode[side])} | {_stats(decode[side])} | {_stats(totals[side])} | "
                 f"{warmup:.1f} |")
  lines += ["", f"sora_jax / diffusers: {ratio:.2f} (medians), {fastest:.2f} (fastest rounds); goal <= 1.0.",
            "", f"Peak resident memory of the whole process (encode + decode, {rows['memory_size']}x"
            f"{rows['memory_size']} frames):", "",
            "| frames | sora_jax GiB | diffusers GiB |", "|---|---|---|"]
  for frames_row in sorted({run["frames"] for run in rows["memory"]}):
    peak = {run["side"]: run["peak_rss_gib"] for run in rows["memory"] if run["frames"] == frames_row}
    lines.append(f"| {frames_row} | {peak['jax']:.3f} | {peak['torch']:.3f} |")
  return "\n".join(lines + closing(rows, variant)) + "\n"


def closing(rows: dict, variant: str) -> list[str]:
  """The section's last paragraphs: the machine, the raw rows, and where the speed and memory go."""
  extra = [jax_run["peak_rss_gib"] - torch_run["peak_rss_gib"]
           for jax_run in rows["memory"] if jax_run["side"] == "jax"
           for torch_run in rows["memory"]
           if torch_run["side"] == "torch" and torch_run["frames"] == jax_run["frames"]]
  return [
      "",
      f"Machine: {os.cpu_count()} CPUs (the load rises towards that as the benchmark uses every core). Raw "
      f"rows: the `--json` file (`bench/results/vae{'' if variant == 'wan2.1' else '_wan22'}_cpu.json` for "
      "`make bench-docs`).",
      "Where the JAX side's speed comes from (`encoders/wan_vae.py`): on CPU the 3x3x3 causal convolutions "
      "run as 2D convolutions over time taps with a Winograd transform along time (4 output frames from 6 2D "
      "convolutions instead of 12), the three time taps of a few-channel input stacked into one "
      "convolution's channels, the 2x nearest upsample + 3x3 convolution as four 2x2 convolutions at the "
      "input size (4/9 of the work), and only the one time tap that sees real frames on the first chunk. "
      "On GPU / TPU the code uses XLA's native 3D convolution. Peak memory does not grow with the clip: "
      "both sides hold one chunk of frames and the per-convolution caches; sora_jax's extra "
      f"{min(extra):.2f}-{max(extra):.2f} GiB is XLA's compiled programs and their buffers, a fixed cost "
      "per frame size.",
  ]


def main(argv: list[str]) -> None:
  del argv
  if _CHILD.value:
    print(json.dumps(_child(_CHILD.value, _WEIGHTS.value, _FRAMES.value, _SIZE.value, _ROUNDS.value)))
    return

  load_before = os.getloadavg()[0]
  print(f"load average {load_before:.1f}", flush=True)
  with tempfile.TemporaryDirectory() as weights:
    _save_reference(_VARIANT.value, weights)
    speed: dict[str, list] = {"jax": [], "torch": []}
    for index in range(_REPEATS.value):
      for side in (("jax", "torch") if index % 2 == 0 else ("torch", "jax")):
        run = _run_child(side, weights, _FRAMES.value, _SIZE.value, 1)
        speed[side].append(run)
        print(f"{side}: encode {run['times'][0][0]:.2f} s, decode {run['times'][0][1]:.2f} s", flush=True)
    memory = []
    for frames in (int(f) for f in _MEMORY_FRAMES.value):
      for side in ("jax", "torch"):
        run = _run_child(side, weights, frames, _MEMORY_SIZE.value, 0)
        memory.append(run)
        print(f"{side} {frames} frames: peak {run['peak_rss_gib']:.2f} GiB", flush=True)
  rows = {"variant": _VARIANT.value, "speed": speed, "memory": memory, "memory_size": _MEMORY_SIZE.value}
  section = _report(rows, (load_before, os.getloadavg()[0]))
  print(section)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=2)
  if _WRITE_DOCS.value:
    docs_section.write("vae" if _VARIANT.value == "wan2.1" else "vae_wan22", section)


if __name__ == "__main__":
  app.run(main)
