"""Runs the train binary (its flags in argv) with this process's first checkpoint read failing once, as a
storage hiccup (a reset connection, a throttled request) would. Used by tests/test_faults.py on one
process of a multi-process job: `python tests/restore_fault.py --config=... --process_id=1 ...`."""

import os
import sys

import orbax.checkpoint as ocp

from sora_jax.train import supervisor

_original = ocp.CheckpointManager.restore
_failed = []


def _restore_failing_once(self, *args, **kwargs):
  if not _failed:
    _failed.append(True)
    raise ConnectionResetError("injected: connection reset by the storage server")
  return _original(self, *args, **kwargs)


if __name__ == "__main__":
  ocp.CheckpointManager.restore = _restore_failing_once
  os.environ[supervisor.WORKER_ENV] = "1"  # this process trains itself: the patch must be in the trainer
  from sora_jax.main import train

  sys.argv = ["sora_jax.train", *sys.argv[1:]]
  train.run()
