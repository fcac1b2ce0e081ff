"""The pretrained models that score samples: video features for FVD, image-text features for CLIP score.

Owns opening them from local files only (`eval.fvd_model`, `eval.clip_model`; nothing downloads) and
what each computes from uint8 videos [F, H, W, 3]:
- a video feature model: a transformers VideoMAE directory (the mean of the encoder's last hidden
  states, as content-debiased FVD uses VideoMAE features) or an I3D TorchScript file (the Kinetics-400
  I3D of the published FVD code, called with `rescale=False, resize=False, return_features=True` on
  224x224 clips in [-1, 1]); each sees `num_frames` frames spread evenly over a clip;
- an image-text model: a transformers CLIP or SigLIP directory (model and processor files), whose
  normalised image and text embeddings give the text-video similarity and frame-to-frame consistency.
Both run on torch (the `[torch]` extra) on the host CPU, imported only when a model is opened, and
each has an `identity` that keys the reference-feature cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

I3D_FRAMES = 16  # frames per clip the published I3D FVD feeds its detector
I3D_SIZE = 224
_SAMPLED_BYTES = 1 << 20  # bytes hashed at each end of a weight file for its identity


class FeatureModelError(ValueError):
  """A feature model path that does not hold a model this module can open."""


def spread_frames(video: np.ndarray, count: int) -> np.ndarray:
  """`count` frames spread evenly over the clip (first and last included; repeated when it is shorter)."""
  index = np.linspace(0, video.shape[0] - 1, num=count).round().astype(int)
  return video[index]


def _file_identity(path: str) -> dict[str, Any]:
  size = os.path.getsize(path)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    digest.update(f.read(_SAMPLED_BYTES))
    if size > 2 * _SAMPLED_BYTES:
      f.seek(size - _SAMPLED_BYTES)
    digest.update(f.read(_SAMPLED_BYTES))
  return {"file": os.path.basename(path), "bytes": size, "sampled_sha256": digest.hexdigest()}


def _directory_identity(directory: str) -> list[dict[str, Any]]:
  return [_file_identity(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
          if os.path.isfile(os.path.join(directory, name))]


def _torch(flag: str):
  try:
    import torch
  except ImportError:
    raise FeatureModelError(f"{flag} needs torch and transformers: install sora_jax[torch]") from None
  torch.set_grad_enabled(False)
  return torch


def _embedding(output: Any):
  """transformers' get_*_features returns the projected embedding, or (v5) an output holding it."""
  return output if hasattr(output, "shape") else output.pooler_output


@dataclasses.dataclass
class VideoFeatureModel:
  """Clips -> feature vectors [N, D] (float64) for FVD."""

  name: str
  identity: dict[str, Any]
  num_frames: int
  embed: Callable[[np.ndarray], np.ndarray]  # uint8 [B, num_frames, H, W, 3] -> [B, D]
  batch_size: int = 8

  def features(self, videos: Sequence[np.ndarray]) -> np.ndarray:
    if not videos:
      raise ValueError("no clips to compute features of")
    rows = []
    for start in range(0, len(videos), self.batch_size):
      batch = np.stack([spread_frames(np.asarray(v, np.uint8), self.num_frames)
                        for v in videos[start:start + self.batch_size]])
      rows.append(np.asarray(self.embed(batch), np.float64))
    return np.concatenate(rows)


class FeatureStream:
  """`model`'s features of clips added one at a time, embedded a model batch at a time: host memory holds
  the pending clips' `num_frames` model frames, never the whole set (an eval's 720p x 81 samples are
  224 MB of uint8 each)."""

  def __init__(self, model: VideoFeatureModel):
    self.model = model
    self._pending: list[np.ndarray] = []
    self._rows: list[np.ndarray] = []

  def add(self, video: np.ndarray) -> None:
    self._pending.append(spread_frames(np.asarray(video, np.uint8), self.model.num_frames))
    if len(self._pending) == self.model.batch_size:
      self._flush()

  def _flush(self) -> None:
    if self._pending:
      self._rows.append(self.model.features(self._pending))  # spreading model frames keeps them as they are
      self._pending = []

  def features(self) -> np.ndarray:
    """[N, D] of every clip added so far."""
    self._flush()
    if not self._rows:
      raise ValueError("no clips to compute features of")
    return np.concatenate(self._rows)


def open_video_model(path: str, flag: str = "eval.fvd_model") -> VideoFeatureModel:
  """A VideoMAE directory or an I3D TorchScript file; one `FeatureModelError` naming `flag` otherwise."""
  if not path or not os.path.exists(path):
    raise FeatureModelError(f"{flag}={path!r} does not exist; expected a transformers VideoMAE directory "
                            f"or an I3D TorchScript file (e.g. i3d_torchscript.pt)")
  if os.path.isdir(path):
    return _videomae(path, flag)
  return _i3d(path, flag)


def _videomae(directory: str, flag: str) -> VideoFeatureModel:
  for name in ("config.json", "preprocessor_config.json"):
    if not os.path.isfile(os.path.join(directory, name)):
      raise FeatureModelError(f"{flag}={directory!r} has no {name}; expected a transformers VideoMAE "
                              f"directory (model and image processor saved with save_pretrained)")
  torch = _torch(flag)
  import transformers

  config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
  if config.model_type != "videomae":
    raise FeatureModelError(f"{flag}={directory!r} holds a {config.model_type!r} model; expected 'videomae'")
  model = transformers.VideoMAEModel.from_pretrained(directory, local_files_only=True).eval()
  processor = transformers.AutoImageProcessor.from_pretrained(directory, local_files_only=True)

  def embed(batch: np.ndarray) -> np.ndarray:
    pixels = processor([list(clip) for clip in batch], return_tensors="pt")["pixel_values"]
    hidden = model(pixel_values=pixels.to(torch.float32)).last_hidden_state
    return hidden.mean(dim=1).numpy()

  identity = {"kind": "videomae", "path": os.path.abspath(directory), "files": _directory_identity(directory)}
  return VideoFeatureModel(f"videomae:{os.path.basename(os.path.normpath(directory))}", identity,
                           int(config.num_frames), embed)


def i3d_inputs(batch: np.ndarray, torch) -> Any:
  """uint8 clips [B, F, H, W, 3] -> the I3D input [B, 3, F, 224, 224] in [-1, 1]: the shorter side
  resized to 224 (bilinear), then the centre crop, as the published FVD code prepares clips."""
  import torch.nn.functional as functional

  clips = torch.from_numpy(np.ascontiguousarray(batch)).to(torch.float32) / 127.5 - 1.0
  count, frames, height, width, _ = clips.shape
  images = clips.reshape(count * frames, height, width, 3).permute(0, 3, 1, 2)
  scale = I3D_SIZE / min(height, width)
  size = (max(I3D_SIZE, round(height * scale)), max(I3D_SIZE, round(width * scale)))
  images = functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
  top, left = (size[0] - I3D_SIZE) // 2, (size[1] - I3D_SIZE) // 2
  images = images[:, :, top:top + I3D_SIZE, left:left + I3D_SIZE]
  return images.reshape(count, frames, 3, I3D_SIZE, I3D_SIZE).permute(0, 2, 1, 3, 4).contiguous()


def _i3d(path: str, flag: str) -> VideoFeatureModel:
  torch = _torch(flag)
  try:
    detector = torch.jit.load(path, map_location="cpu").eval()
  except (RuntimeError, ValueError) as error:
    reason = str(error).splitlines()[0]
    raise FeatureModelError(f"{flag}={path!r} is not a TorchScript file ({reason}); expected a "
                            f"transformers VideoMAE directory or an I3D TorchScript file") from None

  def embed(batch: np.ndarray) -> np.ndarray:
    return detector(i3d_inputs(batch, torch), rescale=False, resize=False, return_features=True).numpy()

  identity = {"kind": "i3d_torchscript", "path": os.path.abspath(path), "files": [_file_identity(path)]}
  return VideoFeatureModel(f"i3d:{os.path.basename(path)}", identity, I3D_FRAMES, embed)


@dataclasses.dataclass
class ImageTextModel:
  """Normalised text and image embeddings of a CLIP or SigLIP model."""

  name: str
  identity: dict[str, Any]
  text_embeddings: Callable[[Sequence[str]], np.ndarray]  # prompts -> [P, D], unit norm
  image_embeddings: Callable[[np.ndarray], np.ndarray]  # uint8 [K, H, W, 3] -> [K, D], unit norm


def open_image_text_model(directory: str, flag: str = "eval.clip_model") -> ImageTextModel:
  """A transformers CLIP or SigLIP directory (model, tokenizer and image processor files)."""
  if not directory or not os.path.isdir(directory):
    raise FeatureModelError(f"{flag}={directory!r} is not a directory; expected a transformers CLIP or "
                            f"SigLIP directory (model and processor saved with save_pretrained)")
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise FeatureModelError(f"{flag}={directory!r} has no config.json; expected a CLIP or SigLIP directory")
  torch = _torch(flag)
  import transformers

  config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
  if config.model_type not in ("clip", "siglip", "siglip2"):
    raise FeatureModelError(
        f"{flag}={directory!r} holds a {config.model_type!r} model; expected 'clip' or 'siglip'")
  try:
    processor = transformers.AutoProcessor.from_pretrained(directory, local_files_only=True)
  except (OSError, ValueError, TypeError) as error:
    raise FeatureModelError(f"{flag}={directory!r}: cannot read its processor files ({error})") from None
  model = transformers.AutoModel.from_pretrained(directory, local_files_only=True).eval()
  # SigLIP was trained on text padded to its full length; CLIP on text padded to the longest.
  padding = "max_length" if config.model_type.startswith("siglip") else True

  def normalised(embeddings) -> np.ndarray:
    embeddings = _embedding(embeddings).to(torch.float64)
    return (embeddings / embeddings.norm(dim=-1, keepdim=True)).numpy()

  def text_embeddings(prompts: Sequence[str]) -> np.ndarray:
    tokens = processor.tokenizer(list(prompts), padding=padding, truncation=True, return_tensors="pt")
    kept = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    return normalised(model.get_text_features(**kept))

  def image_embeddings(frames: np.ndarray) -> np.ndarray:
    pixels = processor.image_processor(list(np.asarray(frames, np.uint8)), return_tensors="pt")
    return normalised(model.get_image_features(pixel_values=pixels["pixel_values"]))

  identity = {"kind": config.model_type, "path": os.path.abspath(directory)}
  return ImageTextModel(f"{config.model_type}:{os.path.basename(os.path.normpath(directory))}", identity,
                        text_embeddings, image_embeddings)


def clip_scores(model: ImageTextModel, videos: Sequence[np.ndarray], prompts: Sequence[str],
                frames: int) -> list[dict[str, float]]:
  """Per video: `clip_score` (100 x the mean cosine similarity of its prompt to `frames` frames spread
  over it) and `clip_consistency` (100 x the mean cosine similarity of consecutive ones of those
  frames: 100 for a still clip, lower as the content changes or flickers)."""
  if len(videos) != len(prompts):
    raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts")
  texts = model.text_embeddings(prompts)
  scores = []
  for video, text in zip(videos, texts, strict=True):
    images = model.image_embeddings(spread_frames(np.asarray(video, np.uint8), frames))
    similarity = images @ text
    consecutive = np.sum(images[1:] * images[:-1], axis=-1) if len(images) > 1 else np.ones(1)
    scores.append({"clip_score": float(100.0 * similarity.mean()),
                   "clip_consistency": float(100.0 * consecutive.mean())})
  return scores
