"""What FVD and CLIP scoring add to one eval of a wan_1_3b-shaped run, on this CPU.

Times the feature models eval runs on every sample (sora_jax.evaluation.feature_models) on clips of
the wan_1_3b eval size (81 x 480 x 832 uint8), counts their FLOPs per clip with torch's FLOP counter,
and sets both against what sampling one such clip costs the 1.3B model (its analytic forward FLOPs x
sampler steps x 2 for guidance) and what decoding one held-out clip for FVD's reference costs the Wan
VAE (bench/results/vae_flops_480x832.json). The feature models are the published shapes with random
weights (VideoMAE-base: 16 frames at 224, ViT-B/16; SigLIP-B/16 at 224 for the CLIP score) unless
--videomae / --clip / --i3d name local copies of the real ones.

  python bench/eval_scores.py [--clips=4] [--repeats=3] [--out_json=bench/results/eval_scores_cpu.json]
      [--write_docs]
"""

import json
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import docs_section  # noqa: E402  (bench/, beside this script)
import timing  # noqa: E402

_CLIPS = flags.DEFINE_integer("clips", 4, "clips per timed call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per model")
_VIDEOMAE = flags.DEFINE_string("videomae", None,
                                 "a local VideoMAE directory (default: random VideoMAE-base)")
_CLIP = flags.DEFINE_string("clip", None, "a local CLIP / SigLIP directory (default: random SigLIP-B/16)")
_I3D = flags.DEFINE_string("i3d", None, "a local I3D TorchScript file (timed only when given)")
_OUT_JSON = flags.DEFINE_string("out_json", None, "write the results as JSON here")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "replace its section of docs/benchmarks.md")
SIZE = (81, 480, 832)  # configs/wan_1_3b.py's eval clips: frames, height, width
CLIP_FRAMES = 8  # eval.clip_frames
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _videomae_base(directory: str) -> str:
  import transformers

  transformers.VideoMAEModel(transformers.VideoMAEConfig()).eval().save_pretrained(directory)
  transformers.VideoMAEImageProcessor().save_pretrained(directory)
  return directory


def _siglip_base(directory: str) -> str:
  import transformers

  from sora_jax.encoders import tokenizer as tokenizer_lib
  from sora_jax.evaluation import prompt_suite

  os.makedirs(directory, exist_ok=True)
  spiece = os.path.join(directory, "spiece.model")
  suite = prompt_suite.read(os.path.join(ROOT, "configs", "prompts", "video_suite.jsonl"))
  tokenizer_lib.train([entry.prompt for entry in suite], vocab_size=400).save(spiece)
  tokenizer = transformers.SiglipTokenizer(vocab_file=spiece, model_max_length=64)
  processor = transformers.SiglipProcessor(
      image_processor=transformers.SiglipImageProcessor(size={"height": 224, "width": 224}),
      tokenizer=tokenizer)
  processor.save_pretrained(directory)
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=64),
      vision_config=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12))
  transformers.SiglipModel(config).eval().save_pretrained(directory)
  return directory


def _flops(fn) -> float:
  from torch.utils.flop_counter import FlopCounterMode

  counter = FlopCounterMode(display=False)
  with counter:
    fn()
  return float(counter.get_total_flops())


def _sampling_flops() -> dict[str, float]:
  from sora_jax import config as config_lib
  from sora_jax import patches
  from sora_jax.model import flops

  config = config_lib.load(os.path.join(ROOT, "configs", "wan_1_3b.py"))
  shape = patches.latent_shape(config, SIZE)
  forward = flops.forward_flops_per_example(config.model, shape, int(config.data.text_len))
  steps = int(config.diffusion.sample_steps)
  with open(os.path.join(ROOT, "bench", "results", "vae_flops_480x832.json")) as f:
    vae = json.load(f)
  return {"sample_steps": steps, "forward_flops": forward, "sample_flops": forward * steps * 2,
          "vae_decode_flops": vae["decode_clip_81"]}


def main(argv: list[str]) -> None:
  del argv
  import numpy as np
  import torch

  from sora_jax.evaluation import feature_models, frechet

  torch.set_num_threads(os.cpu_count() or 1)
  load = os.getloadavg()[0]
  rng = np.random.default_rng(0)
  clips = [rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for _ in range(_CLIPS.value)]
  prompts = ["a golden retriever puppy chases a red ball across a sunlit lawn"] * len(clips)
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    videomae_dir = _VIDEOMAE.value or _videomae_base(os.path.join(scratch, "videomae-base"))
    label = "FVD features: VideoMAE" + ("" if _VIDEOMAE.value else "-base, random weights")
    video_models = [(label, feature_models.open_video_model(videomae_dir))]
    if _I3D.value:
      video_models.append(("FVD features: I3D TorchScript", feature_models.open_video_model(_I3D.value)))
    for label, model in video_models:
      times = timing.time_calls(lambda model=model: model.features(clips), _REPEATS.value)
      frames = np.stack([feature_models.spread_frames(clips[0], model.num_frames)])
      per_clip = [t / len(clips) for t in timing.median_and_min(times)]
      rows.append({"what": label, "model": model.name, "seconds_per_clip": per_clip,
                   "flops_per_clip": _flops(lambda model=model, frames=frames: model.embed(frames))})
    clip_dir = _CLIP.value or _siglip_base(os.path.join(scratch, "siglip-b16-224"))
    clip_model = feature_models.open_image_text_model(clip_dir)
    times = timing.time_calls(lambda: feature_models.clip_scores(clip_model, clips, prompts, CLIP_FRAMES),
                              _REPEATS.value)
    rows.append({"what": f"CLIP score: {clip_model.name}" + ("" if _CLIP.value else " (SigLIP-B/16 shape)"),
                 "model": clip_model.name,
                 "seconds_per_clip": [t / len(clips) for t in timing.median_and_min(times)],
                 "flops_per_clip": _flops(
                     lambda: feature_models.clip_scores(clip_model, clips[:1], prompts[:1], CLIP_FRAMES))})
    features = rng.normal(size=(64, 768))
    times = timing.time_calls(lambda: frechet.distance(frechet.statistics(features),
                                                       frechet.statistics(features[:len(clips)] + 1)),
                              _REPEATS.value)
    rows.append({"what": "Frechet distance, 64 x 768 against 4 x 768 (one per weight set, not per clip)",
                 "model": "numpy", "seconds_per_clip": list(timing.median_and_min(times)),
                 "flops_per_clip": None})
  results = {"load_before": load, "load_after": os.getloadavg()[0], "clip_size": SIZE, "clips": len(clips),
             "threads": torch.get_num_threads(), "rows": rows, "wan_1_3b": _sampling_flops()}
  print(_report(results))
  if _OUT_JSON.value:
    with open(_OUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if _WRITE_DOCS.value:
    docs_section.write("eval_scores", _report(results))


def _report(results: dict) -> str:
  wan = results["wan_1_3b"]
  frames, height, width = results["clip_size"]
  lines = [
      "### What FVD and CLIP scoring add to an eval (bench/eval_scores.py)",
      "",
      f"Feature models on {results['clips']} random uint8 clips of the wan_1_3b eval size ({frames} x "
      f"{height} x {width}), preprocessing included, {results['threads']} torch threads, load "
      f"{results['load_before']:.1f} -> {results['load_after']:.1f}. FLOPs per clip from torch's FLOP "
      f"counter. For scale: sampling one such clip with the 1.3B model is {wan['sample_flops']:.3g} FLOPs "
      f"({wan['sample_steps']} steps x 2 for guidance x {wan['forward_flops']:.3g} per forward), and "
      f"decoding one held-out clip for FVD's reference (once per run, then cached) "
      f"{wan['vae_decode_flops']:.3g}.",
      "",
      "| scoring | s per clip, median [min] | GFLOPs per clip | share of sampling the clip |",
      "|---|---|---|---|",
  ]
  for row in results["rows"]:
    median, minimum = row["seconds_per_clip"]
    flops = row["flops_per_clip"]
    gflops = f"{flops / 1e9:.1f}" if flops else "-"
    share = f"{flops / wan['sample_flops']:.1e}" if flops else "-"
    lines.append(f"| {row['what']} | {median:.3f} [{minimum:.3f}] | {gflops} | {share} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
