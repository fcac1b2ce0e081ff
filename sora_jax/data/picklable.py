"""Objects of the input pipeline that travel to grain's worker processes while holding a lock.

A lock does not pickle, and caches are cheaper to rebuild in a worker than to ship: `LockedPicklable`
drops both on the way out and gives the copy a fresh lock.
"""

from __future__ import annotations

import threading
from typing import Any


class LockedPicklable:
  """Mixin for a class with `self._lock`; caches named in `_REBUILT_CACHES` arrive empty."""

  _REBUILT_CACHES: tuple[str, ...] = ()

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state["_lock"]
    for name in self._REBUILT_CACHES:
      state[name] = {}
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()
