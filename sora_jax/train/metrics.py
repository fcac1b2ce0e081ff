"""Training metrics: metrics.jsonl, TensorBoard events, the progress line, MFU and memory.

Owns `MetricsWriter` (process 0 writes, the others are silent), `Progress` (a tqdm bar on a
terminal, plain lines in logs), `StepTimer` (step time and the share spent waiting for data) and
the peak-FLOPs table MFU is measured against.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from sora_jax.files import atomic, mirror, paths

# Dense bf16 peak FLOP/s per device (chip), by a substring of jax's device_kind, most specific first.
# MFU is reported against these whatever model.compute_dtype is; CPUs have no entry (mfu is null).
PEAK_FLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # Trillium / v6e
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),  # SXM, dense (no sparsity)
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of `device_kind`, or None where unknown (CPU)."""
  kind = device_kind.lower()
  for name, flops in PEAK_FLOPS_BF16:
    if name in kind:
      return flops
  return None


def device_memory_stats() -> dict[str, float]:
  """Bytes in use / peak on this process's first device, where the backend reports them."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    stats = {}
  result = {}
  for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
    if key in stats:
      result[f"memory/{key}_gib"] = float(stats[key]) / 2**30
  return result


def _plain(value: Any) -> Any:
  """JSON-safe Python scalar: numpy/jax scalars -> float/int; NaN/inf -> null."""
  if value is None:
    return None
  if isinstance(value, bool | np.bool_):
    return bool(value)
  if isinstance(value, int | np.integer):
    return int(value)
  value = float(value)
  return value if math.isfinite(value) else None


def drop_rows_after(path: str, step: int) -> int:
  """Removes the rows of metrics.jsonl past `step` (and a torn last line); returns how many went.

  A run resumed from checkpoint `step` trains the later steps again: their rows from before the stop
  (a kill after the last save) would otherwise stand twice. The file is rewritten atomically.
  """
  path_ = paths.resolve(path)
  if not path_.is_file():
    return 0
  lines = path_.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a kill mid-write
    if int(row.get("step", 0)) <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) == len(lines):
    return 0
  atomic.write_text(path, "".join(kept))
  return len(lines) - len(kept)


class MetricsWriter:
  """Appends one JSON object per logged step to workdir/metrics.jsonl and mirrors it to TensorBoard.

  In a bucket (gs://), where an object cannot be appended to, the rows are kept here and metrics.jsonl
  is rewritten whole at most every `upload_every_s` seconds, at each `flush()` (the trainer flushes
  after every checkpoint save) and at close; TensorBoard's event files are written to a local
  directory and copied to workdir/tensorboard/ at the same times. A kill loses only rows past the
  newest checkpoint, which the resumed run logs again.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0,
               upload_every_s: float = 30.0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._remote = paths.is_remote(workdir)
    self._upload_every_s = upload_every_s
    self._uploaded_at = time.monotonic()
    self._rows: list[str] = []
    self._file = None
    self._tensorboard = None
    self._outputs = None
    if enabled:
      drop_rows_after(self.path, resume_step)
      self._outputs = mirror.OutputMirror(workdir, "tensorboard")
      if self._remote:
        path = paths.resolve(self.path)
        self._rows = path.read_text().splitlines(keepends=True) if path.is_file() else []
      else:
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
      from tensorboardX import SummaryWriter  # no TensorFlow needed; imported only on process 0

      self._tensorboard = SummaryWriter(self._outputs.path("tensorboard"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{key: _plain(value) for key, value in scalars.items()}}
    line = json.dumps(record) + "\n"
    if self._remote:
      self._rows.append(line)
    else:
      self._file.write(line)
      self._file.flush()
    for key, value in record.items():
      if key != "step" and value is not None and not isinstance(value, bool):
        self._tensorboard.add_scalar(key, value, global_step=int(step))
    self._tensorboard.flush()
    if self._remote and time.monotonic() - self._uploaded_at >= self._upload_every_s:
      self._upload()

  def flush(self) -> None:
    """For a bucket workdir, uploads the rows and TensorBoard events now (a local file is always
    current)."""
    if self.enabled and self._remote:
      self._upload()

  def _upload(self) -> None:
    """metrics.jsonl and the local TensorBoard event files, whole, into the bucket workdir."""
    atomic.write_text(self.path, "".join(self._rows))
    self._outputs.publish()
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
      if self._remote:
        self._upload()
      self._outputs.close()


class StepTimer:
  """Wall time of a logging window and the part of it spent waiting for input batches."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._window_start = time.perf_counter()
    self._data_wait = 0.0
    self._steps = 0

  def add_data_wait(self, seconds: float) -> None:
    self._data_wait += seconds

  def add_step(self) -> None:
    self._steps += 1

  def summary(self) -> dict[str, float]:
    """step_time_s (mean over the window) and data_wait_frac; resets the window."""
    elapsed = max(time.perf_counter() - self._window_start, 1e-9)
    steps = max(self._steps, 1)
    result = {"step_time_s": elapsed / steps, "data_wait_frac": min(self._data_wait / elapsed, 1.0),
              "window_steps": self._steps}
    self.reset()
    return result


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours:d}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:d}:{seconds:02d}"


class Progress:
  """Step, loss, speed and ETA: a tqdm bar on an interactive terminal, one plain line otherwise."""

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True,
               interactive: bool | None = None, stream: Any = None):
    self.enabled = enabled
    self.total_steps = total_steps
    self._stream = stream or sys.stderr
    if interactive is None:
      interactive = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._bar = None
    if enabled and interactive:
      from tqdm import tqdm

      self._bar = tqdm(total=total_steps, initial=start_step, file=self._stream, dynamic_ncols=True,
                       unit="step")
    self._last_step = start_step

  def update(self, step: int, loss: float | None, step_time_s: float, examples_per_s: float) -> None:
    if not self.enabled:
      return
    eta = (self.total_steps - step) * step_time_s
    loss_text = "nan" if loss is None else f"{loss:.4f}"
    if self._bar is not None:
      self._bar.update(step - self._last_step)
      self._bar.set_postfix_str(f"loss {loss_text}, {examples_per_s:.1f} clips/s")
    else:
      print(f"step {step}/{self.total_steps}  loss {loss_text}  {1.0 / max(step_time_s, 1e-9):.2f} "
            f"steps/s  {examples_per_s:.1f} clips/s  ETA {_format_duration(eta)}",
            file=self._stream, flush=True)
    self._last_step = step

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self._stream)
    else:
      print(text, file=self._stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
