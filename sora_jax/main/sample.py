"""`python -m sora_jax.sample`: one prompt to one video with a run's checkpoint or a Wan pipeline.

  python -m sora_jax.sample --workdir=W --prompt="a red circle moves left on a blue background" \
      --out=video.mp4 [--step=N --ema=0.99 --steps=20 --guidance=4 --seed=0 --sampler=unipc]
  python -m sora_jax.sample --pretrained=Wan2.1-T2V-1.3B-Diffusers --prompt="a cat surfing" \
      --num_frames=33 --height=480 --width=832 --out=cat.mp4
  python -m sora_jax.sample --workdir=W --prompt="..." --image=first.png        # image-to-video
  python -m sora_jax.sample --workdir=W --prompt="..." --video=clip.mp4 --extend_frames=16
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from sora_jax import cli
from sora_jax.files import atomic, mirror, paths
from sora_jax.language import prompt_extension

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "Instead of --workdir: a diffusers Wan pipeline directory (transformer/, vae/, "
    "text_encoder/, tokenizer/) to sample as it is, without a run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_EMA = flags.DEFINE_float(
    "ema", None, "Use the EMA weights of this decay (e.g. 0.999) instead of the raw ones.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt of the video.")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", None, "Negative prompt for classifier-free guidance (default: config.eval's; "
    "empty = the dropped-caption embedding).")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", None, "Pixel frames (default: config.eval.num_frames).")
_HEIGHT = flags.DEFINE_integer("height", None, "Pixel height (default: config.eval.height).")
_WIDTH = flags.DEFINE_integer("width", None, "Pixel width (default: config.eval.width).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: config.diffusion.sample_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance scale; 1 = none (default: config's).")
_GUIDANCE_2 = flags.DEFINE_float(
    "guidance_2", None, "Two-expert models: the low-noise expert's guidance scale (default: config's "
    "diffusion.guidance_scale_2, else --guidance).")
_SHIFT = flags.DEFINE_float("shift", None, "Inference flow shift (default: config.diffusion.sample_shift).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed: the same seed and settings give the same video.")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["unipc", "euler"], "ODE sampler (default: config's).")
_OUT = flags.DEFINE_string("out", "video.mp4", "Output file: .mp4 (H.264) or .gif.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Prepared dataset whose tokenizer to use (default: the run's config.data.dir).")
_EXTEND = prompt_extension.define_flags(
    "Rewrite --prompt into a dense description first (printed, saved beside the video and sampled)")
_IMAGE = flags.DEFINE_string(
    "image", None, "Image-to-video: the video starts from this image (resized to cover the sample's "
    "size, centre-cropped), kept as the first frame while the rest is generated.")
_VIDEO = flags.DEFINE_string(
    "video", None, "Video extension: the output starts with this video's last frames (resized and "
    "centre-cropped) and continues them by --extend_frames.")
_LORA = flags.DEFINE_string(
    "lora", None, "A LoRA file (PEFT / diffusers safetensors, as `export --format=lora` writes) folded "
    "into the weights sampled.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "Strength of --lora (1 = as trained).")
_EXTEND_FRAMES = flags.DEFINE_integer(
    "extend_frames", None, "With --video: new frames after the given ones. The given ones are "
    "--num_frames - N of the video's last frames, or all that fit when --num_frames is left out.")


def _check_flags() -> None:
  """Every flag's value, before any checkpoint or pipeline is read or device touched; the sizes a
  config constrains (VAE and patch factors) are checked once its config is read, before the weights."""
  if _WORKDIR.value and _PRETRAINED.value:
    raise cli.FlagError("pass --workdir (a run to sample) or --pretrained (a Wan pipeline directory), "
                        "not both")
  if not _WORKDIR.value and not _PRETRAINED.value:
    raise cli.FlagError("--workdir is required (the run directory whose checkpoint to sample), unless "
                        "--pretrained names a Wan pipeline directory")
  if not _PROMPT.value or not _PROMPT.value.strip():
    raise cli.FlagError("--prompt is required and must not be empty")
  out = _OUT.value
  if os.path.splitext(out)[1].lower() not in (".mp4", ".gif"):
    raise cli.FlagError(f"--out={out!r}: expected a .mp4 or .gif file name")
  if out.startswith("gs://"):
    reason = paths.bucket_write_problem(os.path.dirname(out))
    if reason is not None:
      raise cli.FlagError(f"--out={out!r} is not writable ({reason}); expected a path in a bucket this "
                          f"process can create objects in")
  elif "://" in out:
    raise cli.FlagError(f"--out={out!r}: expected a local file or a Cloud Storage path gs://BUCKET/NAME")
  else:
    if os.path.isdir(out):
      raise cli.FlagError(f"--out={out!r} is a directory; expected a .mp4 or .gif file name")
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):  # the nearest existing ancestor must be a folder to create it in
      folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
      raise cli.FlagError(f"--out={out!r}: {folder!r} is a file; expected a path in a folder")
  if _PRETRAINED.value and (_STEP.value is not None or _EMA.value is not None or _DATA_DIR.value):
    raise cli.FlagError("--step, --ema and --data_dir choose weights of a run; --pretrained has one set")
  cli.check_run_directory("workdir", _WORKDIR.value, "a run directory holding checkpoints/")
  cli.check_run_directory("data_dir", _DATA_DIR.value,
                          "a dataset written by sora_jax.prepare (its tokenizer)")
  cli.check_number("step", _STEP.value, "a checkpoint step >= 0", minimum=0)
  cli.check_number("ema", _EMA.value, "an EMA decay in (0, 1), e.g. 0.999", above=0, below=1)
  cli.check_number("num_frames", _NUM_FRAMES.value, "at least 1 frame", minimum=1)
  cli.check_number("height", _HEIGHT.value, "a height of at least 1 pixel", minimum=1)
  cli.check_number("width", _WIDTH.value, "a width of at least 1 pixel", minimum=1)
  cli.check_number("steps", _STEPS.value, "at least 1 sampler step", minimum=1)
  cli.check_number("guidance", _GUIDANCE.value, "a guidance scale >= 0 (1 = none)", minimum=0)
  cli.check_number("guidance_2", _GUIDANCE_2.value, "a guidance scale >= 0 (1 = none)", minimum=0)
  cli.check_number("shift", _SHIFT.value, "a flow shift > 0", above=0)
  cli.check_number("seed", _SEED.value, "a seed in [0, 2**32)", minimum=0, below=2**32)
  _EXTEND.check()
  if _IMAGE.value and _VIDEO.value:
    raise cli.FlagError("pass --image (image-to-video) or --video (extension), not both")
  cli.check_file("lora", _LORA.value, "a LoRA safetensors file (export --format=lora writes one)")
  cli.check_number("lora_scale", _LORA_SCALE.value, "a finite LoRA strength")
  cli.check_file("image", _IMAGE.value, "an image file (PNG, JPEG, WebP, BMP) to start the video from")
  cli.check_file("video", _VIDEO.value, "a video file whose last frames the output continues")
  if _VIDEO.value and _EXTEND_FRAMES.value is None:
    raise cli.FlagError("--video needs --extend_frames=N, the number of new frames to generate")
  if _EXTEND_FRAMES.value is not None and not _VIDEO.value:
    raise cli.FlagError(f"--extend_frames={_EXTEND_FRAMES.value} extends a --video; pass one")
  cli.check_number("extend_frames", _EXTEND_FRAMES.value, "at least 1 new frame", minimum=1)
  if _NUM_FRAMES.value is not None and _EXTEND_FRAMES.value is not None and (
      _NUM_FRAMES.value <= _EXTEND_FRAMES.value):
    raise cli.FlagError(f"--num_frames={_NUM_FRAMES.value} leaves no given frame before "
                        f"--extend_frames={_EXTEND_FRAMES.value}; expected --num_frames > --extend_frames")


def _given(config, height: int, width: int) -> tuple[object | None, int | None]:
  """(uint8 frames the sample starts from or None, the sample's frame count or None for the default)."""
  from sora_jax.offline import video_io

  if _IMAGE.value:
    try:
      return video_io.read_frames(_IMAGE.value, height, width), _NUM_FRAMES.value
    except video_io.MediaError as error:
      raise cli.FlagError(f"--image={_IMAGE.value!r}: {error}") from None
  if not _VIDEO.value:
    return None, _NUM_FRAMES.value
  extend, tf = _EXTEND_FRAMES.value, int(config.data.vae_temporal_factor)
  if extend % tf:
    raise cli.FlagError(f"--extend_frames={extend}: the VAE compresses time by {tf}; expected a multiple "
                        f"of {tf}")
  # The video resampled to the run's frame rate, as prepare made its training clips; only the last
  # frames that can lead the sample are kept.
  wanted = (_NUM_FRAMES.value - extend) if _NUM_FRAMES.value is not None else max(
      1, int(config.eval.num_frames) - extend)
  try:
    frames = video_io.read_frames(_VIDEO.value, height, width, max_frames=wanted, fps=float(config.data.fps))
  except video_io.MediaError as error:
    raise cli.FlagError(f"--video={_VIDEO.value!r}: {error}") from None
  if _NUM_FRAMES.value is not None:
    given = _NUM_FRAMES.value - extend
    if given > len(frames):
      raise cli.FlagError(f"--video={_VIDEO.value!r} has {len(frames)} frames; --num_frames="
                          f"{_NUM_FRAMES.value} with --extend_frames={extend} needs {given} of them")
  else:  # the config's sample length where the video is long enough, else the whole video
    given = min(len(frames), max(1, int(config.eval.num_frames) - extend))
  given = 1 + (given - 1) // tf * tf  # the VAE encodes 1 + tf*k frames
  return frames[len(frames) - given:], given + extend


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  _check_flags()
  extension = os.path.splitext(_OUT.value)[1].lower()
  from sora_jax.evaluation import media, sampling
  from sora_jax.offline import conversion
  from sora_jax.train import run_weights as weights_lib

  start = time.time()
  prompt = _PROMPT.value
  extender = _EXTEND.open_model()
  if extender is not None:
    prompt = prompt_extension.extend(extender, _PROMPT.value, seed=_SEED.value)
    print(f"extended prompt: {prompt}", flush=True)

  given_frames = None

  def settings_of(config):
    nonlocal given_frames
    size = sampling.SampleSettings.from_config(config, height=_HEIGHT.value, width=_WIDTH.value)
    given_frames, num_frames = _given(config, size.height, size.width)
    settings = sampling.SampleSettings.from_config(
        config, num_frames=num_frames, height=_HEIGHT.value, width=_WIDTH.value,
        sampler=_SAMPLER.value, steps=_STEPS.value, shift=_SHIFT.value, guidance_scale=_GUIDANCE.value,
        guidance_scale_2=_GUIDANCE_2.value,
        seed=_SEED.value, negative_prompt=_NEGATIVE.value, encode_empty_negative=bool(_PRETRAINED.value))
    sampling.latent_shape(config, settings)  # a bad size fails before the restore
    return settings

  if _PRETRAINED.value:
    from sora_jax.export import pretrained

    config = pretrained.pipeline_config(_PRETRAINED.value)
    settings = settings_of(config)
    params = pretrained.load_params(_PRETRAINED.value, config.model, field="--pretrained")
    origin = _PRETRAINED.value
  else:
    name = conversion.weight_set_name(_EMA.value)

    def load(step):
      config = weights_lib.saved_config(_WORKDIR.value, step)
      if _DATA_DIR.value:
        config.data.dir, config.data.sources = _DATA_DIR.value, ()
      settings = settings_of(config)
      mesh = conversion.local_mesh()  # the first device query: after the flags and the sizes are checked
      return config, settings, weights_lib.restore_weights(_WORKDIR.value, step, config, mesh, [name])[name]

    step, (config, settings, params) = weights_lib.readable_checkpoint(
        _WORKDIR.value, _STEP.value, load,
        warn=lambda line: print(f"sora_jax.sample: {line}", file=sys.stderr))
    origin = f"step {step} ({name})"
  if _LORA.value:
    from sora_jax.export import peft_lora

    if int(config.model.experts) != 1:
      raise cli.FlagError(f"--lora={_LORA.value}: a LoRA file adapts one DiT; this model has two experts")
    try:
      params = peft_lora.merge_file(params, _LORA.value, config.model, _LORA_SCALE.value)
    except ValueError as error:
      raise cli.FlagError(f"--lora={_LORA.value}: {error}") from None
    origin += f" with LoRA {_LORA.value}" + (f" x {_LORA_SCALE.value:g}" if _LORA_SCALE.value != 1 else "")
  mesh = conversion.local_mesh()
  (video,) = sampling.sample_videos(config, params, [prompt], settings, mesh, given_frames=given_frames)
  if _IMAGE.value:
    origin += f", starting from {_IMAGE.value}"
  elif _VIDEO.value:
    origin += f", continuing the last {len(given_frames)} frames of {_VIDEO.value}"
  # The video and its prompt record are written beside --out, or for a bucket path locally first and
  # then uploaded whole.
  outputs = mirror.OutputMirror(os.path.dirname(_OUT.value) if paths.is_remote(_OUT.value)
                                else os.path.dirname(os.path.abspath(_OUT.value)), "sample")
  local_out = outputs.path(os.path.basename(_OUT.value))
  os.makedirs(os.path.dirname(local_out), exist_ok=True)
  if extension == ".gif":
    media.write_gif(local_out, video, float(config.data.fps))
  else:
    media.write_mp4(local_out, video, float(config.data.fps))
  if extender is not None:
    record = {"prompt": _PROMPT.value, "extended_prompt": prompt, "extended_by": extender.name,
              "seed": _SEED.value}
    atomic.write_json(os.path.splitext(local_out)[0] + ".prompt.json", record)
  outputs.close()
  guidance = f"guidance {settings.guidance_scale:g}"
  if int(config.model.experts) == 2:  # Wan2.2 A14B: the low-noise expert's scale after the boundary
    low = settings.guidance_scale if settings.guidance_scale_2 is None else settings.guidance_scale_2
    guidance += f" then {low:g} below sigma {float(config.diffusion.boundary_ratio):g}"
  print(f"wrote {_OUT.value}: {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]} from {origin}, "
        f"{settings.sampler} {settings.steps} steps, {guidance}, seed {settings.seed}, "
        f"in {time.time() - start:.1f} s")


def run() -> None:
  cli.run(main, "sample")


if __name__ == "__main__":
  run()
