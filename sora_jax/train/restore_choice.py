"""Which checkpoint step a run restores: the same on every process, and damaged only when shown so.

Owns the trainer's restore decision. Process 0's list of committed steps is the list (a bucket's
listing may differ between hosts for a moment); each step, newest first, is read by every process
with retries, and each read ends as one of three outcomes: read, damaged (it failed the same way on
consecutive attempts: missing or corrupt files fail alike every time) or transient (it failed, then
differently: a timeout, a throttled request). The processes exchange their outcomes and act on all of
them together: every process restores the step all of them read, skips a step any of them found
damaged, and stops, setting nothing aside, when any read stayed transient after its retries.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from sora_jax.parallel import agreement

READ, DAMAGED, TRANSIENT = 0, 1, 2


class TransientReadError(RuntimeError):
  """A checkpoint step some process could not read for a reason that did not repeat."""


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What one process's reads of one step came to."""

  kind: int  # READ, DAMAGED or TRANSIENT
  value: Any = None  # what `load` returned (READ)
  reason: str = ""  # the last failure's first line (DAMAGED, TRANSIENT)


# Failures of the storage rather than of the files: retried however often they repeat, never "damaged".
_TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "connection reset",
                      "connection refused", "connection aborted", "timed out", "timeout", "temporarily",
                      "too many requests", "429", "500 ", "502", "503", "504")


def _normalised(message: str) -> str:
  """A failure's message without what differs between identical failures: quoted names (which of a
  step's arrays a parallel read reached first), numbers, addresses and temp names."""
  return re.sub(r'"[^"]*"|\'[^\']*\'|0x[0-9a-f]+|tmp[\w.-]*|\d+', "#", message)


def _storage_failure(message: str) -> bool:
  lowered = message.lower()
  return any(marker.lower() in lowered for marker in _TRANSIENT_MARKERS)


Damaged = type[BaseException] | tuple[type[BaseException], ...]


def read(load: Callable[[int], Any], step: int, damaged: Damaged, attempts: int, backoff_s: float,
         sleep: Callable[[float], None] = time.sleep) -> Outcome:
  """load(step), tried up to `attempts` times while it raises `damaged` (anything else propagates).

  DAMAGED when two consecutive attempts fail with the same message (up to names and numbers) that is not
  a storage failure (unavailable, timed out, throttled: those are retried however often they repeat);
  TRANSIENT when every attempt fails otherwise. Waits `backoff_s`, then twice that, ... between attempts.
  """
  last = last_full = None
  for attempt in range(attempts):
    try:
      value = load(step)
    except damaged as error:
      full = " ".join(str(error).split()) or type(error).__name__
      reason = full[:300]  # compared whole: a shortened message would cut two alike failures apart
      if last_full is not None and _normalised(full) == _normalised(last_full) and not _storage_failure(full):
        return Outcome(DAMAGED, reason=reason)
      last_full = full
      logging.info("checkpoint step %d: read attempt %d of %d failed (%s)", step, attempt + 1, attempts,
                   reason)
      last = reason
      if attempt + 1 < attempts:
        sleep(backoff_s * 2**attempt)
      continue
    if last is not None:
      logging.warning("checkpoint step %d read on attempt %d of %d, after: %s", step, attempt + 1, attempts,
                      last)
    return Outcome(READ, value=value)
  return Outcome(TRANSIENT, reason=last)


def agreed_steps(steps: Sequence[int]) -> list[int]:
  """Process 0's `steps` on every process (ascending)."""
  steps = sorted(int(step) for step in steps)
  return [int(step) for step in agreement.process_0_array(np.asarray(steps, np.int64).reshape(-1))]


def _all_kinds(kind: int) -> np.ndarray:
  """Every process's outcome kind, by process index."""
  return np.asarray(agreement.every_process(kind))


def newest_agreed(steps: Sequence[int], load: Callable[[int], Any], damaged: Damaged, attempts: int,
                  backoff_s: float) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """(step, load(step), [(newer step, why damaged)]) for the newest step every process read; (None, None,
  [...]) when every step is damaged somewhere. Raises TransientReadError when a read stayed transient:
  which process, which step and why, in one line."""
  damaged_steps: list[tuple[int, str]] = []
  for step in sorted(agreed_steps(steps), reverse=True):
    outcome = read(load, step, damaged, attempts, backoff_s)
    kinds = _all_kinds(outcome.kind)
    if (kinds == TRANSIENT).any():
      process = int(np.argmax(kinds == TRANSIENT))
      reason = outcome.reason if outcome.kind == TRANSIENT else "see that process's log"
      raise TransientReadError(
          f"checkpoint step {step} could not be read by process {process} after {attempts} attempts "
          f"({reason}); nothing was set aside: restart the job once the storage answers again")
    if (kinds == READ).all():
      return step, outcome.value, damaged_steps
    where = [int(index) for index in np.flatnonzero(kinds == DAMAGED)]
    reason = outcome.reason if outcome.kind == DAMAGED else f"damaged as read by process(es) {where}"
    damaged_steps.append((step, reason))
  return None, None, damaged_steps
