"""What the processes of a multi-process job agree on: process 0's values, anyone's flag, a meeting point.

Owns the small host-side exchanges that keep processes on the same path when each decides something
from its own view (a bucket listing, a signal, a local file read): every process calls these the same
number of times, in the same order. With one process each returns its argument and exchanges nothing.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_0_array(array: np.ndarray) -> np.ndarray:
  """Process 0's `array` on every process (the others' may differ in shape, not in rank or dtype)."""
  array = np.asarray(array)
  if jax.process_count() == 1:
    return array
  shape = tuple(int(n) for n in multihost_utils.broadcast_one_to_all(np.asarray(array.shape, np.int64)))
  if 0 in shape:  # nothing to send
    return np.zeros(shape, array.dtype)
  mine = array if jax.process_index() == 0 else np.zeros(shape, array.dtype)
  return np.asarray(multihost_utils.broadcast_one_to_all(mine))


def process_0_json(value: Any) -> Any:
  """Process 0's JSON-serialisable `value` on every process."""
  if jax.process_count() == 1:
    return value
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32)  # a summable dtype
  return json.loads(process_0_array(encoded).astype(np.uint8).tobytes().decode())


def every_process(code: int) -> list[int]:
  """Every process's `code`, by process index."""
  if jax.process_count() == 1:
    return [int(code)]
  gathered = multihost_utils.process_allgather(np.asarray([code], np.int32))
  return [int(value) for value in np.asarray(gathered).reshape(-1)]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any."""
  return any(every_process(int(bool(flag))))


def meet(name: str) -> None:
  """Every process reaches this point before any goes on; the wait is on the devices (no timeout), not
  in a timed barrier."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
