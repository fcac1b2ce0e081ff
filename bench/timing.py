"""Timing helpers the bench scripts share: a callable timed over repeated calls after warm-up calls."""

import statistics
import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
  """Wall seconds of `repeats` calls of `fn` (which must return only when its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median_and_min(times: list[float]) -> tuple[float, float]:
  return statistics.median(times), min(times)
