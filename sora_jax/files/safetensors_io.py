"""Streaming reader and writer of (sharded) safetensors files with a Hugging Face index json.

Owns the byte format: tensors are written one at a time from a callback and read back one at a
time by seeking, so peak host memory is one tensor, never the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from sora_jax.files import atomic, layout

# safetensors dtype tags <-> numpy dtypes (bfloat16 through ml_dtypes, as JAX uses it).
_TAG_TO_DTYPE = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_TO_TAG = {dtype: tag for tag, dtype in _TAG_TO_DTYPE.items()}
# safetensors data is little-endian, as are the x86 / ARM hosts JAX runs on, so bytes are copied as is.
if sys.byteorder != "little":
  raise ImportError("sora_jax.export.safetensors_io needs a little-endian host")
# A header larger than this is a corrupt or hostile file, not a model (safetensors uses 100 MB too).
_MAX_HEADER_BYTES = 100_000_000
DEFAULT_MAX_SHARD_BYTES = 10 * 1024**3


class SafetensorsError(ValueError):
  """A safetensors file or directory that is missing, corrupt or not what the caller expected."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Name, shape and dtype of one tensor: enough to plan shards before any data exists."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def num_bytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def dtype_tag(dtype: np.dtype) -> str:
  """The safetensors tag ("F32", "BF16", ...) of a numpy dtype."""
  dtype = np.dtype(dtype)
  if dtype not in _DTYPE_TO_TAG:
    raise SafetensorsError(f"dtype {dtype} has no safetensors tag; expected one of {sorted(_TAG_TO_DTYPE)}")
  return _DTYPE_TO_TAG[dtype]


def shard_file_names(prefix: str, num_shards: int) -> list[str]:
  """Hugging Face shard names: `prefix.safetensors`, or `prefix-00001-of-0000N.safetensors`."""
  if num_shards == 1:
    return [f"{prefix}.safetensors"]
  return [f"{prefix}-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def index_file_name(prefix: str) -> str:
  return f"{prefix}.safetensors.index.json"


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Splits tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor stands alone)."""
  if max_shard_bytes < 1:
    raise SafetensorsError(f"max_shard_bytes={max_shard_bytes}; expected a positive size")
  shards: list[list[TensorSpec]] = [[]]
  shard_bytes = 0
  for spec in specs:
    if shards[-1] and shard_bytes + spec.num_bytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(spec)
    shard_bytes += spec.num_bytes
  return shards


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  for spec in specs:
    header[spec.name] = {
        "dtype": dtype_tag(spec.dtype),
        "shape": list(spec.shape),
        "data_offsets": [offset, offset + spec.num_bytes],
    }
    offset += spec.num_bytes
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  # The format pads the header with spaces so tensor data starts 8-byte aligned.
  encoded += b" " * (-len(encoded) % 8)
  return struct.pack("<Q", len(encoded)) + encoded


def write_file(
    path: str,
    specs: Sequence[TensorSpec],
    load: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
  """Writes one safetensors file, asking `load(name)` for each tensor only when it is written."""
  names = [spec.name for spec in specs]
  if len(set(names)) != len(names):
    raise SafetensorsError(f"duplicate tensor names in {path}")
  with atomic.open_atomic(path, "wb") as f:
    f.write(_header_bytes(specs, metadata))
    for spec in specs:
      array = np.asarray(load(spec.name))
      if tuple(array.shape) != tuple(spec.shape) or array.dtype != np.dtype(spec.dtype):
        raise SafetensorsError(
            f"tensor {spec.name!r} came as {array.dtype}{list(array.shape)}; the plan for {path} "
            f"expected {np.dtype(spec.dtype)}{list(spec.shape)}")
      f.write(np.ascontiguousarray(array).tobytes())
      del array


def write_sharded(
    directory: str,
    specs: Sequence[TensorSpec],
    load: Callable[[str], np.ndarray],
    *,
    prefix: str = layout.DIFFUSERS_WEIGHTS,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[str]:
  """Writes `specs` into `directory` as one file, or as shards plus an index json past the size limit.

  Returns the names of the files written. Each tensor is loaded, written and dropped in turn.
  """
  shards = plan_shards(specs, max_shard_bytes)
  file_names = shard_file_names(prefix, len(shards))
  for file_name, shard in zip(file_names, shards, strict=True):
    write_file(os.path.join(directory, file_name), shard, load, metadata)
  if len(shards) == 1:
    return file_names
  index = {
      "metadata": {"total_size": sum(spec.num_bytes for spec in specs)},
      "weight_map": {spec.name: file_name for file_name, shard in zip(file_names, shards, strict=True)
                     for spec in shard},
  }
  atomic.write_json(os.path.join(directory, index_file_name(prefix)), index, sort_keys=True)
  return [*file_names, index_file_name(prefix)]


@dataclasses.dataclass(frozen=True)
class _Entry:
  spec: TensorSpec
  path: str
  start: int  # absolute byte offset of the tensor's data in its file


def read_header(path: str) -> tuple[dict[str, TensorSpec], dict[str, int], dict[str, str]]:
  """Parses one file's header: (specs by name, absolute data offsets by name, metadata)."""
  try:
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) != 8:
        raise SafetensorsError(f"{path} is not a safetensors file: shorter than its 8-byte header size")
      (header_size,) = struct.unpack("<Q", prefix)
      if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
        raise SafetensorsError(f"{path} is not a safetensors file: header size {header_size} is impossible")
      header = json.loads(f.read(header_size).decode("utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"cannot read safetensors header of {path}: {e}") from e
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  data_start = 8 + header_size
  specs, offsets = {}, {}
  for name, info in header.items():
    try:
      dtype = _TAG_TO_DTYPE[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise SafetensorsError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from e
    spec = TensorSpec(name, shape, dtype)
    if end - begin != spec.num_bytes or data_start + end > file_size:
      raise SafetensorsError(
          f"{path}: tensor {name!r} ({info['dtype']}{list(shape)}) has data offsets {[begin, end]} that do "
          f"not fit its size or the file ({file_size} bytes)")
    specs[name], offsets[name] = spec, data_start + begin
  return specs, offsets, metadata


class Reader:
  """Random access to the tensors of a safetensors directory (single file or sharded with an index)."""

  def __init__(self, directory: str, prefix: str = layout.DIFFUSERS_WEIGHTS):
    self.directory = directory
    index_path = os.path.join(directory, index_file_name(prefix))
    single_path = os.path.join(directory, f"{prefix}.safetensors")
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"cannot read the shard index {index_path}: {e}") from e
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single_path):
      weight_map, files = None, [os.path.basename(single_path)]
    else:
      raise SafetensorsError(
          f"{directory} holds neither {os.path.basename(single_path)} nor {os.path.basename(index_path)}")
    self._entries: dict[str, _Entry] = {}
    self.metadata: dict[str, str] = {}
    for file_name in files:
      path = os.path.join(directory, file_name)
      if not os.path.isfile(path):
        raise SafetensorsError(f"shard {file_name} named by the index of {directory} does not exist")
      specs, offsets, metadata = read_header(path)
      self.metadata.update(metadata)
      for name, spec in specs.items():
        if name in self._entries:
          raise SafetensorsError(f"tensor {name!r} appears in more than one shard of {directory}")
        self._entries[name] = _Entry(spec, path, offsets[name])
    if weight_map is not None:
      for name, file_name in weight_map.items():
        entry = self._entries.get(name)
        if entry is None or os.path.basename(entry.path) != file_name:
          raise SafetensorsError(f"the index of {directory} puts {name!r} in {file_name}, which lacks it")

  def specs(self) -> dict[str, TensorSpec]:
    return {name: entry.spec for name, entry in self._entries.items()}

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def read(self, name: str) -> np.ndarray:
    """Reads one tensor from disk, without touching the others (read-only array)."""
    if name not in self._entries:
      raise SafetensorsError(f"tensor {name!r} is not in {self.directory}")
    entry = self._entries[name]
    with open(entry.path, "rb") as f:
      f.seek(entry.start)
      data = f.read(entry.spec.num_bytes)
    return np.frombuffer(data, dtype=entry.spec.dtype).reshape(entry.spec.shape)

  def items(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    for name in names if names is not None else self._entries:
      yield name, self.read(name)
