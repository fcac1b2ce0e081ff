"""The multi-process trainer's supervisor: a lost peer is one clear line and a restartable exit code.

When one process of a job dies, JAX's coordination service makes every other process abort from C++
(a "Check failure stack trace", "Fatal Python error: Aborted" and hundreds of lines), either at once
(the coordinator, process 0, is gone) or once the dead process misses `train.peer_timeout_s` of
heartbeats. No Python code can catch that abort, so `python -m sora_jax.train` in a multi-process job
runs the trainer as a child process and watches it: stdout passes through, stderr passes through
line by line until the child reports a fatal distributed error; from then on its lines go only to
`WORKDIR/logs/process_<id>.log`, and the supervisor prints one line naming the lost process and the
checkpoint a restart resumes from, and exits with `EXIT_PEER_LOST` (75, EX_TEMPFAIL: restart me).

The supervisor imports no jax. SIGTERM is forwarded to the child (which saves and exits 0); SIGINT
reaches the child from the terminal's process group (the supervisor ignores it); the child dies with
the supervisor (PR_SET_PDEATHSIG), so killing either kills the process.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from sora_jax.train import checkpoint_layout

WORKER_ENV = "SORA_JAX_TRAIN_WORKER"
EXIT_PEER_LOST = 75
# Lines of a child that has lost its job: JAX's fatal coordination error and what follows it.
_FATAL_MARKERS = ("detected fatal errors", "Check failure stack trace", "coordination service",
                  "Fatal Python error")
# A collective that failed because its peer's socket closed: the error the trainer reports before
# the coordination service names the lost process (held like library records).
_PEER_IO = re.compile(r"Gloo .* failed|Connection (reset|closed) by peer|Socket closed")


def _die_with_parent() -> None:
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: the child may outlive a killed supervisor
    pass


def lost_processes(text: str, num_processes: int) -> str:
  """Who the coordination service says is gone, in words, from the child's stderr."""
  unhealthy = re.search(r"stopped sending heartbeats\):\s*([\d,\s]+)", text)
  if unhealthy:
    ids = sorted({int(i) for i in re.findall(r"\d+", unhealthy[1])})
    names = ", ".join(str(i) for i in ids)
    return f"process{'es' if len(ids) > 1 else ''} {names} of {num_processes} stopped answering"
  if re.search(r"leader task was preempted|Failed to send RPC to coordination service|"
               r"coordination service.*(Socket closed|UNAVAILABLE)", text):
    return f"process 0 of {num_processes} (the coordinator) stopped answering"
  return f"a peer of this {num_processes}-process job stopped answering"


def newest_checkpoint(workdir: str) -> int | None:
  """The newest committed checkpoint step under WORKDIR/checkpoints (orbax's tmp dirs excluded)."""
  steps = checkpoint_layout.committed_steps(workdir)
  return steps[-1] if steps else None


_LOG_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # absl / glog record: library output


class _StderrRelay:
  """Copies the child's stderr to ours until it turns fatal; everything goes to the log file too.

  Library log records (and the tracebacks under them) are held for `hold_s` before they reach the
  terminal: a peer's death makes orbax, gloo and the coordination client log errors just before the
  fatal report that explains them, and those stay in the log file only.
  """

  def __init__(self, stream, log_path: str, hold_s: float):
    self.fatal = False
    self.tail: list[str] = []
    self._stream = stream
    self._log_path = log_path
    self._hold_s = hold_s
    self._held: list[str] = []
    self._held_since = 0.0
    self._lock = threading.Lock()
    self._done = threading.Event()
    self._reader = threading.Thread(target=self._run, daemon=True)
    self._reader.start()
    threading.Thread(target=self._release_old, daemon=True).start()

  def _show(self, lines: list[str]) -> None:
    sys.stderr.write("".join(lines))
    sys.stderr.flush()

  def _release_old(self) -> None:
    while not self._done.wait(1.0):
      with self._lock:
        if self._held and not self.fatal and time.monotonic() - self._held_since > self._hold_s:
          self._show(self._held)
          self._held = []

  def _run(self) -> None:
    os.makedirs(os.path.dirname(self._log_path), exist_ok=True)
    with open(self._log_path, "a", encoding="utf-8", errors="replace") as log:
      for raw in iter(self._stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        log.write(line)
        log.flush()
        with self._lock:
          self.tail = (self.tail + [line])[-400:]
          if self.fatal:
            continue
          if any(marker in line for marker in _FATAL_MARKERS):
            self.fatal, self._held = True, []
            continue
          library = _LOG_RECORD.match(line) or (self._held and not line.startswith("sora_jax."))
          collective = line.startswith("sora_jax.train: error:") and _PEER_IO.search(line)
          if library or collective:
            if not self._held:
              self._held_since = time.monotonic()
            self._held.append(line)
            continue
          if self._held:
            self._show(self._held)
            self._held = []
          self._show([line])

  def join(self) -> None:
    self._reader.join()
    self._done.set()
    with self._lock:
      if self._held and not self.fatal:
        self._show(self._held)
      self._held = []


def local_log_dir(workdir: str) -> str:
  """Where a process's log goes: WORKDIR/logs, or for a bucket workdir (no appends to objects) a local
  directory named after it under the temp dir."""
  if "://" in workdir:
    return os.path.join(tempfile.gettempdir(), "sora_jax_logs", workdir.replace("://", "/"))
  return os.path.join(os.path.abspath(workdir), "logs")


def supervise(argv: Sequence[str], workdir: str, process_id: int | None, num_processes: int | None,
              peer_timeout_s: float) -> int:
  """Runs `python -m sora_jax.train argv[1:]` as a worker child; returns the exit code to use."""
  env = dict(os.environ, **{WORKER_ENV: "1"})
  log_path = os.path.join(local_log_dir(workdir), f"process_{process_id or 0}.log")
  child = subprocess.Popen([sys.executable, "-m", "sora_jax.train", *argv[1:]], env=env,
                           stderr=subprocess.PIPE, preexec_fn=_die_with_parent)  # noqa: PLW1509
  signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the child directly
  relay = _StderrRelay(child.stderr, log_path, hold_s=peer_timeout_s + 10)
  code = child.wait()
  relay.join()
  if not relay.fatal:
    return code
  who = lost_processes("".join(relay.tail), num_processes or 0)
  step = newest_checkpoint(workdir)
  resume = (f"a restart resumes from checkpoint step {step}" if step is not None
            else "no checkpoint was committed yet: a restart starts from step 0")
  print(f"sora_jax.train: error: {who}; process {process_id or 0} stopped too, without saving. Restart "
        f"the job (exit code {EXIT_PEER_LOST}): {resume}. Details: {log_path}", file=sys.stderr, flush=True)
  return EXIT_PEER_LOST
