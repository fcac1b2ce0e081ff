"""Small helpers several test modules share: a free TCP port, decoding an mp4, relative error, and the
moves between channels-last arrays and the channels-first torch video tensors of the VAE parity tests."""

from __future__ import annotations

import socket

import numpy as np


def free_port() -> int:
  """A localhost port nothing listens on now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def decode_video(path: str) -> np.ndarray:
  """Every frame of a video file as uint8 [T, H, W, 3]."""
  import av

  with av.open(path) as container:
    return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def relative_error(got, reference) -> float:
  """max |got - reference| / max |reference|, after checking the shapes agree."""
  got, reference = np.asarray(got), np.asarray(reference)
  assert got.shape == reference.shape, (got.shape, reference.shape)
  return float(np.abs(got - reference).max() / np.abs(reference).max())


def perturb_vae(model, seed: int = 1) -> None:
  """Moves every parameter of a torch VAE off its init, so gammas, biases and layouts all matter."""
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if name.endswith("gamma"):
        param.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        param.copy_(0.1 * noise)
      else:
        param.mul_(1.0 + 0.2 * noise)


def uniform_video(*shape, seed: int = 0) -> np.ndarray:
  """float32 values uniform in [-1, 1] of `shape` (a video [B, F, H, W, 3] as the VAEs take it)."""
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def to_torch_video(array):
  """[B, T, H, W, C] numpy -> torch [B, C, T, H, W] float32."""
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32).transpose(0, 4, 1, 2, 3)))


def from_torch_video(tensor) -> np.ndarray:
  """torch [B, C, T, H, W] -> numpy [B, T, H, W, C]."""
  return tensor.numpy().transpose(0, 2, 3, 4, 1)
