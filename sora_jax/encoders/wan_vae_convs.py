"""The convolutions of the Wan VAEs, each in the form its backend runs fastest; `conv_method` chooses.

Owns the causal 3x3x3 conv over a chunk of frames ("direct": one 3D conv, what cuDNN and the TPU run;
on XLA:CPU, whose 2D convs are twice as fast as its 3D ones, "stacked" time taps for few channels,
Winograd F(m, 3) along time in float32, or one 2D conv per tap), the (3, 1, 1) time conv of the
resamplers as one matmul, and nearest-2x-upsample-then-conv as four phase convs at input size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def conv2d_nhwc(x: jax.Array, kernel: jax.Array, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=jnp.float32)


def frames_2d(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Applies a per-frame [N, H, W, C] function to [B, T, H, W, C] with the frames folded into the batch."""
  b, t = x.shape[:2]
  y = fn(x.reshape(b * t, *x.shape[2:]))
  return y.reshape(b, t, *y.shape[1:])


# Winograd F(m, 3) along time (Lavin & Gray 2016), by output frames m: (B^T, G, A^T) with
# out = A^T [(G kernel) * (B^T frames)], i.e. m + 2 2D convs for m output frames instead of 3m.
_TIME_WINOGRAD = {
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
}


def _combine(coefficients: tuple[float, ...], terms: list[jax.Array]) -> jax.Array:
  out = None
  for c, term in zip(coefficients, terms, strict=True):
    if c:
      scaled = term if c == 1 else term * c
      out = scaled if out is None else out + scaled
  return out


def conv_method(in_channels: int, out_frames: int, dtype: Any) -> str:
  """How `conv3x3x3` computes: measured on XLA CPU, whose 2D convs are twice as fast as its 3D ones."""
  if jax.default_backend() != "cpu":
    return "direct"  # cuDNN / the TPU convolution units handle 3D convs natively
  if in_channels <= 16:
    return "stacked"
  if out_frames in _TIME_WINOGRAD and jnp.dtype(dtype) == jnp.float32:
    return "winograd"  # half the multiply-adds at 4 frames, for ~3e-6 relative rounding per conv
  return "taps"


def conv3x3x3(frames: jax.Array, kernel: jax.Array, method: str | None = None) -> jax.Array:
  """Valid-in-time, same-in-space 3x3x3 conv: frames [B, T + 2, H, W, I] -> [B, T, H, W, O] float32.

  method: "direct" (one 3D conv), "stacked" (the three time taps stacked into the channels, one 2D conv:
  for few input channels), "taps" (one 2D conv per time tap, frames in the batch), "winograd" (T + 2 2D
  convs of time-transformed frames); None picks by backend, channels and frames.
  """
  b, t2, h, w, i = frames.shape
  t = t2 - 2
  method = method or conv_method(i, t, frames.dtype)
  if method == "direct":
    return jax.lax.conv_general_dilated(frames, kernel, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                        dimension_numbers=("NTHWC", "THWIO", "NTHWC"),
                                        preferred_element_type=jnp.float32)
  if method == "stacked":
    stacked = jnp.concatenate([frames[:, k:k + t] for k in range(3)], axis=-1)
    folded = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * i, kernel.shape[-1])
    return frames_2d(lambda x: conv2d_nhwc(x, folded), stacked)
  if method == "winograd":
    frames_t, kernel_t, output_t = _TIME_WINOGRAD[t]
    inputs = [frames[:, j].astype(jnp.float32) for j in range(t2)]
    taps = [kernel[k].astype(jnp.float32) for k in range(3)]
    products = [conv2d_nhwc(_combine(frames_t[m], inputs), _combine(kernel_t[m], taps))
                for m in range(len(frames_t))]
    return jnp.stack([_combine(output_t[j], products) for j in range(t)], axis=1)
  out = None
  for k in range(3):
    tap = frames_2d(lambda x, k=k: conv2d_nhwc(x, kernel[k]), frames[:, k:k + t])
    out = tap if out is None else out + tap
  return out


def time_taps(frames: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
  """A (3, 1, 1) time conv, valid padding: the three taps stacked into channels, one matmul."""
  t_out = (frames.shape[1] - 3) // stride + 1
  taps = [frames[:, k:k + stride * (t_out - 1) + 1:stride] for k in range(3)]
  stacked = jnp.concatenate(taps, axis=-1)
  folded = kernel.reshape(3 * kernel.shape[1], kernel.shape[2])
  return jnp.dot(stacked, folded, preferred_element_type=jnp.float32) + bias


def upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Nearest 2x upsampling then a 3x3 conv (padding 1), as 4 output phases of 2x2 convs at input size.

  Output pixel (2i + a, 2j + b) of the conv over the upsampled image only sees input rows {i - 1, i}
  (a = 0) or {i, i + 1} (a = 1), with the 3 kernel rows merged into 2 (same for columns): 4/9 of the
  multiply-adds of convolving the upsampled image.
  """
  n, h, w, _ = x.shape
  rows = {0: (kernel[0], kernel[1] + kernel[2]), 1: (kernel[0] + kernel[1], kernel[2])}
  pads = {0: (1, 0), 1: (0, 1)}
  phases = []
  for a in (0, 1):
    row_kernel = jnp.stack(rows[a], axis=0)  # [2, 3, I, O]
    cols = {0: (row_kernel[:, 0], row_kernel[:, 1] + row_kernel[:, 2]),
            1: (row_kernel[:, 0] + row_kernel[:, 1], row_kernel[:, 2])}
    for b in (0, 1):
      phase_kernel = jnp.stack(cols[b], axis=1)  # [2, 2, I, O]
      phases.append(conv2d_nhwc(x, phase_kernel, padding=(pads[a], pads[b])))
  out = jnp.stack(phases, axis=0).reshape(2, 2, n, h, w, -1)
  return out.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * h, 2 * w, -1)
