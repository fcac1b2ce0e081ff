"""The restore decision: a step is damaged only when its read fails the same way again; other failures
are retried and then stop the restore without setting anything aside."""

import pytest

from sora_jax.train import restore_choice


class Unreadable(RuntimeError):
  pass


def _load(failures):
  """load(step) raising the queued failures for a step first, then returning ('state', step)."""
  calls = []

  def load(step):
    calls.append(step)
    queue = failures.get(step, [])
    if queue:
      raise Unreadable(queue.pop(0))
    return ("state", step)

  return load, calls


def test_a_read_that_fails_once_is_retried_and_used():
  load, calls = _load({5: ["timeout reading gs://bkt/run/checkpoints/5/state at 0x7f3a"]})
  waits = []
  outcome = restore_choice.read(load, 5, Unreadable, attempts=3, backoff_s=1.5, sleep=waits.append)
  assert outcome.kind == restore_choice.READ and outcome.value == ("state", 5)
  assert calls == [5, 5] and waits == [1.5]


def test_a_read_that_fails_the_same_way_twice_is_damaged():
  same = "state/ocdbt.process_0/d/abc: file truncated at byte 0x1f"
  load, calls = _load({5: [same, same.replace("0x1f", "0x2a"), same]})
  outcome = restore_choice.read(load, 5, Unreadable, attempts=3, backoff_s=0, sleep=lambda s: None)
  assert outcome.kind == restore_choice.DAMAGED and "truncated" in outcome.reason and calls == [5, 5]


def test_damage_reported_through_different_arrays_is_the_same_failure():
  # A parallel metadata read names whichever array it reached first; the messages run past the 300
  # characters a reason is shortened to, so only comparing them whole sees them alike.
  message = ('DATA_LOSS: Error reading "{}/.zarray" in OCDBT database at gs://bkt/' + "run/" * 60 +
             'checkpoints/4/state/: Error decoding manifest: Encoded length (8) is less than minimum length')
  load, _ = _load({4: [message.format("step"), message.format("ema.0.9.dense.bias")]})
  outcome = restore_choice.read(load, 4, Unreadable, attempts=3, backoff_s=0, sleep=lambda s: None)
  assert outcome.kind == restore_choice.DAMAGED


def test_a_storage_outage_that_repeats_itself_is_still_transient():
  outage = "UNAVAILABLE: 503 Service Unavailable reading gs://bkt/run/checkpoints/4/state/manifest.ocdbt"
  load, calls = _load({4: [outage, outage, outage]})
  outcome = restore_choice.read(load, 4, Unreadable, attempts=3, backoff_s=0, sleep=lambda s: None)
  assert outcome.kind == restore_choice.TRANSIENT and calls == [4, 4, 4]


def test_failures_that_never_repeat_are_transient_and_backed_off():
  load, calls = _load({5: ["503 from the bucket", "connection reset", "read timed out"]})
  waits = []
  outcome = restore_choice.read(load, 5, Unreadable, attempts=3, backoff_s=2.0, sleep=waits.append)
  assert outcome.kind == restore_choice.TRANSIENT and outcome.reason == "read timed out"
  assert calls == [5, 5, 5] and waits == [2.0, 4.0]


def test_other_errors_are_not_retried():
  def load(step):
    raise ValueError("a checkpoint of another model")

  with pytest.raises(ValueError, match="another model"):
    restore_choice.read(load, 5, Unreadable, attempts=3, backoff_s=0)


def test_one_process_falls_back_past_damaged_steps_and_stops_on_a_transient_one():
  damaged = "missing array file"
  load, _ = _load({9: [damaged, damaged], 8: [damaged, damaged]})
  step, value, skipped = restore_choice.newest_agreed([3, 8, 9], load, Unreadable, attempts=2, backoff_s=0)
  assert (step, value) == (3, ("state", 3)) and [s for s, _ in skipped] == [9, 8]
  load, _ = _load({9: ["503", "reset"]})
  with pytest.raises(restore_choice.TransientReadError,
                     match=r"step 9 .*process 0 after 2 attempts \(reset\)"):
    restore_choice.newest_agreed([3, 9], load, Unreadable, attempts=2, backoff_s=0)
