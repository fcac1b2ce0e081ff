"""The torch weights of a diffusers `AutoencoderKLWan` checkpoint as the JAX Wan VAE's parameters.

Owns the tensor table of an architecture (every torch name with its shape and layout kind) and the
conversion of each kind to channels-last (conv kernels transposed, RMS norm gammas with their sqrt(C)
folded in), checked whole before any tensor is read, so a wrong checkpoint fails in one message.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_dtypes
import numpy as np

from sora_jax.encoders import wan_vae_network as network
from sora_jax.encoders.wan_vae_config import WanVAEConfig, WanVAEError


def _conv3d(w: np.ndarray) -> np.ndarray:  # [O, I, t, h, w] -> [t, h, w, I, O]
  return w.transpose(2, 3, 4, 1, 0)


def _conv2d(w: np.ndarray) -> np.ndarray:  # [O, I, h, w] -> [h, w, I, O]
  return w.transpose(2, 3, 1, 0)


def _pointwise(w: np.ndarray) -> np.ndarray:  # [O, I, 1, ...] -> [I, O]
  return w.reshape(w.shape[0], w.shape[1]).T


def _time_conv(w: np.ndarray) -> np.ndarray:  # [O, I, 3, 1, 1] -> [3, I, O]
  return w[:, :, :, 0, 0].transpose(2, 1, 0)


def _gamma(w: np.ndarray) -> np.ndarray:  # [C, 1, ...] -> [C], with WanRMS_norm's sqrt(C) folded in
  return w.reshape(-1) * np.float32(math.sqrt(w.shape[0]))


def _identity(w: np.ndarray) -> np.ndarray:
  return w


_CONVERTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv3d": _conv3d, "conv2d": _conv2d, "pointwise": _pointwise, "time_conv": _time_conv,
    "gamma": _gamma, "bias": _identity,
}
# Converted tensors kept in float32 whatever the compute dtype: norms run in float32.
_FLOAT32_KINDS = ("gamma",)


def _conv(name: str, shape: tuple[int, ...], kind: str) -> list[tuple[str, tuple[int, ...], str]]:
  return [(f"{name}.weight", shape, kind), (f"{name}.bias", (shape[0],), "bias")]


def _layer_tensors(layer: network.Layer) -> list[tuple[str, tuple[int, ...], str]]:
  n = layer.name
  if isinstance(layer, network.Group):  # its shortcut has no parameters
    return [tensor for inner in layer.layers for tensor in _layer_tensors(inner)]
  if isinstance(layer, network.Residual):
    i, o = layer.in_dim, layer.out_dim
    tensors = [(f"{n}.norm1.gamma", (i, 1, 1, 1), "gamma"), *_conv(f"{n}.conv1", (o, i, 3, 3, 3), "conv3d"),
               (f"{n}.norm2.gamma", (o, 1, 1, 1), "gamma"), *_conv(f"{n}.conv2", (o, o, 3, 3, 3), "conv3d")]
    if i != o:
      tensors += _conv(f"{n}.conv_shortcut", (o, i, 1, 1, 1), "pointwise")
    return tensors
  if isinstance(layer, network.Attention):
    d = layer.dim
    return [(f"{n}.norm.gamma", (d, 1, 1), "gamma"), *_conv(f"{n}.to_qkv", (3 * d, d, 1, 1), "pointwise"),
            *_conv(f"{n}.proj", (d, d, 1, 1), "pointwise")]
  d, o = layer.dim, layer.out_dim
  tensors = _conv(f"{n}.resample.1", (o, d, 3, 3), "conv2d")
  if layer.mode == "downsample3d":
    tensors += _conv(f"{n}.time_conv", (d, d, 3, 1, 1), "time_conv")
  elif layer.mode == "upsample3d":
    tensors += _conv(f"{n}.time_conv", (2 * d, d, 3, 1, 1), "time_conv")
  return tensors


def tensor_table(config: WanVAEConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """Every tensor of the diffusers checkpoint: torch name -> (torch shape, layout kind)."""
  arch = network.architecture(config)
  z, e_out, d_out = config.z_dim, arch.encoder_out_dim, arch.decoder_out_dim
  table = _conv("encoder.conv_in", (arch.encoder_in_dim, config.in_channels, 3, 3, 3), "conv3d")
  for layer in arch.encoder_layers:
    table += _layer_tensors(layer)
  table += [("encoder.norm_out.gamma", (e_out, 1, 1, 1), "gamma"),
            *_conv("encoder.conv_out", (2 * z, e_out, 3, 3, 3), "conv3d"),
            *_conv("quant_conv", (2 * z, 2 * z, 1, 1, 1), "pointwise"),
            *_conv("post_quant_conv", (z, z, 1, 1, 1), "pointwise"),
            *_conv("decoder.conv_in", (arch.decoder_in_dim, z, 3, 3, 3), "conv3d")]
  for layer in arch.decoder_layers:
    table += _layer_tensors(layer)
  table += [("decoder.norm_out.gamma", (d_out, 1, 1, 1), "gamma"),
            *_conv("decoder.conv_out", (config.out_channels, d_out, 3, 3, 3), "conv3d")]
  return {name: (shape, kind) for name, shape, kind in table}


def convert_weights(config: WanVAEConfig, read: Callable[[str], np.ndarray], available: set[str], *,
                    source: str, dtype: str = "float32") -> dict[str, np.ndarray]:
  """Torch tensors (by name, through `read`) -> the channels-last params dict the forward functions use.

  Every tensor of `tensor_table(config)` must be in `available` with its torch shape; the check covers all
  of them before any is read, so a wrong checkpoint fails in one message naming `source`.
  """
  dtype_of_convs = compute_dtype(dtype)
  table = tensor_table(config)
  missing = [f"{name} {list(shape)}" for name, (shape, _) in table.items() if name not in available]
  if missing:
    raise WanVAEError(
        f"{source} lacks {len(missing)} tensor(s) of the {config.version} VAE this config.json describes, "
        f"e.g. "
        f"{', '.join(missing[:4])} (name and expected torch shape)")
  unused = sorted(available - set(table))
  if unused:
    raise WanVAEError(
        f"{source} holds {len(unused)} tensor(s) the {config.version} VAE of its config.json does not have, "
        f"e.g. "
        f"{', '.join(unused[:4])}; is the checkpoint from another architecture?")
  params = {}
  for name, (shape, kind) in table.items():
    tensor = read(name)
    if tuple(tensor.shape) != shape:
      raise WanVAEError(
          f"{source}: tensor {name!r} has shape {list(tensor.shape)}; expected {list(shape)} for the "
          f"architecture of its config.json")
    converted = _CONVERTERS[kind](np.asarray(tensor, np.float32))
    params[name] = np.ascontiguousarray(converted, np.float32 if kind in _FLOAT32_KINDS else dtype_of_convs)
  # Only the posterior mean is ever used: keep the quant conv's first z_dim outputs.
  params["quant_conv.weight"] = np.ascontiguousarray(params["quant_conv.weight"][:, :config.z_dim])
  params["quant_conv.bias"] = np.ascontiguousarray(params["quant_conv.bias"][:config.z_dim])
  return params


def compute_dtype(dtype: str) -> np.dtype:
  if dtype == "float32":
    return np.dtype(np.float32)
  if dtype == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  raise WanVAEError(f"Wan VAE dtype={dtype!r}; expected 'float32' or 'bfloat16'")
