"""Small helpers several test modules share: a free TCP port, decoding an mp4, relative error."""

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
