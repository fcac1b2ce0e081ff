"""What every sora_jax binary does around its main: quiet library logs, one-line errors.

Owns `run(main, name)`: the console-script entry of eval, sample, export, prepare and compile.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

# Failures a user can fix (bad flags, files, configs); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


def run(main: Callable[[list[str]], None], name: str, quiet_libraries: bool = True) -> None:
  """app.run(main), turning a user error into `sora_jax.NAME: error: ...` on stderr and exit 1.

  `--verbosity=1` (DEBUG) re-raises with the traceback; with `quiet_libraries`, library INFO lines
  (orbax, grain, jax) are hidden unless --verbosity is given.
  """

  def guarded(argv: list[str]) -> None:
    if quiet_libraries and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except USER_ERRORS as error:
      if logging.get_verbosity() >= logging.DEBUG:
        raise
      message = " ".join(str(error).split()) or type(error).__name__
      print(f"sora_jax.{name}: error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)

  app.run(guarded)
