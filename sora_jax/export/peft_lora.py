"""A LoRA run's adapters as the PEFT / diffusers LoRA file `WanPipeline.load_lora_weights` reads.

Owns the names and layouts: sora_jax's adapter pair (A [*in, r], B [r, *out] on a projection's
kernel) becomes `transformer.<diffusers module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
of the same Linear, with the adapter scale folded into B (PEFT's default scale alpha / r is then 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from sora_jax.export import diffusers
from sora_jax.files import safetensors_io
from sora_jax.model import lora as lora_lib

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "transformer."


def state_dict(adapters: Mapping, model: ml_collections.ConfigDict, scale: float) -> dict[str, np.ndarray]:
  """{PEFT tensor name: float32 array} of `adapters` (a LoRA run's adapter tree) for `model`."""
  entries = [e for e in diffusers.tensor_entries(model) if e.parts[-1] == "kernel"]
  flat = traverse_util.flatten_dict(adapters)
  result = {}
  found = set()
  for entry in entries:
    module = entry.parts[:-1]
    if (*module, lora_lib.A) not in flat:
      continue
    a, b = flat[(*module, lora_lib.A)], flat[(*module, lora_lib.B)]
    found.add(module)
    if entry.layout not in (diffusers.LINEAR, diffusers.LINEAR_FROM_HEADS):
      raise ValueError(f"adapters on {'/'.join(entry.parts[:-1])} ({entry.name}): a {entry.layout.name} "
                       "layer has no PEFT Linear LoRA form; leave it out of train.lora_targets")
    a = np.asarray(jax.device_get(a if entry.layer is None else a[entry.layer]), np.float32)
    b = np.asarray(jax.device_get(b if entry.layer is None else b[entry.layer]), np.float32)
    rank = a.shape[-1]
    module = PREFIX + entry.name[:-len(".weight")]
    result[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
    result[f"{module}.lora_B.weight"] = np.ascontiguousarray(scale * b.reshape(rank, -1).T)
  unmapped = sorted("/".join(m) for m in lora_lib.adapted_modules(adapters) - found)
  if unmapped:
    raise ValueError(f"adapters on {unmapped[:3]} have no diffusers module to load into")
  return result


def merge_file(params: Mapping, path: str, model: ml_collections.ConfigDict, strength: float = 1.0) -> dict:
  """`params` (a DiT's, numpy or jax) with the PEFT LoRA file at `path` folded in: W += strength · s·B·A
  per adapted Linear (s = the file's `<module>.alpha` / rank where given, else 1). Module names may
  carry the `transformer.` prefix or not; a module the model lacks is one ValueError."""
  directory, file_name = os.path.split(os.path.abspath(path))
  reader = safetensors_io.Reader(directory, prefix=file_name.removesuffix(".safetensors"))
  names = set(reader.specs())
  modules = sorted({name[:-len(".lora_A.weight")] for name in names if name.endswith(".lora_A.weight")})
  if not modules:
    raise ValueError(f"{path} holds no `<module>.lora_A.weight` tensors; expected a PEFT / diffusers "
                     "LoRA file")
  entries = {entry.name[:-len(".weight")]: entry for entry in diffusers.tensor_entries(model)
             if entry.parts[-1] == "kernel"}
  # Host copies: the update is a few matmuls per layer.
  merged = {keys: np.array(leaf) for keys, leaf in traverse_util.flatten_dict(params).items()}
  for module in modules:
    name = module.removeprefix(PREFIX)
    entry = entries.get(name)
    if entry is None or entry.layout not in (diffusers.LINEAR, diffusers.LINEAR_FROM_HEADS):
      raise ValueError(f"{path}: LoRA tensor {module}.lora_A.weight adapts no Linear layer of this model "
                       f"(expected names such as {PREFIX}blocks.0.attn1.to_q)")
    a = np.asarray(reader.read(f"{module}.lora_A.weight"), np.float32)  # [r, in]
    b = np.asarray(reader.read(f"{module}.lora_B.weight"), np.float32)  # [out, r]
    alpha_name = f"{module}.alpha"
    scale = float(reader.read(alpha_name)) / a.shape[0] if alpha_name in names else 1.0
    delta = entry.layout.to_sora(strength * scale * (b @ a), entry.sora_shape)
    kernel = merged[entry.parts]
    layer = kernel if entry.layer is None else kernel[entry.layer]
    layer[...] = (layer.astype(np.float32) + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged)


def adapter_count(tensors: Mapping[str, Any]) -> int:
  """Modules adapted in a PEFT state dict."""
  return sum(1 for name in tensors if name.endswith(".lora_A.weight"))

