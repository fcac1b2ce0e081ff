"""What every sora_jax binary does around its main: quiet library logs, one-line errors, flag checks.

Owns `run(main, name)`, which every binary in sora_jax/main starts through,
`use_cpu_without_accelerator()`, and the `check_*` flag checks each binary runs first thing in main,
before any checkpoint, dataset or device is touched.
"""

from __future__ import annotations

import importlib.util
import logging as python_logging
import math
import os
import pkgutil
import re
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

# Failures a user can fix (bad flags, files, configs); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)
# Cloud Storage clients raise their own types (gcsfs's HttpError for a denied, throttled or failing
# bucket is no OSError): what the bucket said is also something a user fixes.
_STORAGE_MODULES = ("gcsfs", "google.auth", "google.api_core", "google.cloud", "aiohttp")


def is_user_error(error: BaseException) -> bool:
  """A failure reported as one line: USER_ERRORS, and the storage clients' own errors."""
  if isinstance(error, USER_ERRORS):
    return True
  return any(cls.__module__.startswith(_STORAGE_MODULES) for cls in type(error).__mro__)


class FlagError(ValueError):
  """A flag value a binary refuses before any heavy work; the message names the flag and what was expected."""


def _shown(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def check_number(name: str, value: float | None, expected: str, *, minimum: float | None = None,
                 above: float | None = None, below: float | None = None) -> None:
  """Raises FlagError unless `value` (None: the flag was not given) is finite, >= `minimum`,
  > `above` and < `below` (each bound only when given). `expected` says it in words."""
  if value is None:
    return
  if (not math.isfinite(value) or (minimum is not None and value < minimum)
      or (above is not None and value <= above) or (below is not None and value >= below)):
    raise FlagError(f"--{name}={value}; expected {expected}")


def check_directory(name: str, path: str | None, expected: str) -> None:
  """Raises FlagError unless `path` (None or empty: not given) is an existing directory."""
  if path and not os.path.isdir(path):
    problem = "is not a directory" if os.path.exists(path) else "does not exist"
    raise FlagError(f"--{name}={_shown(path)} {problem}; expected {expected}")


def _check_bucket_path(name: str, path: str, expected: str, kind: str) -> None:
  """Raises FlagError unless bucket path `path` exists as a `kind` ("dir" or "file") and can be read."""
  from sora_jax.files import paths  # deferred: gcsfs loads only for a bucket path

  try:
    found = paths.is_dir(path) if kind == "dir" else paths.is_file(path)
  except Exception as error:  # noqa: BLE001 - gcsfs raises many types (missing bucket, denied, offline)
    raise FlagError(f"--{name}={_shown(path)} cannot be read ({' '.join(str(error).split())[:200]}); "
                    f"expected {expected}") from None
  if not found:
    raise FlagError(f"--{name}={_shown(path)} does not exist; expected {expected}")


def check_run_directory(name: str, path: str | None, expected: str) -> None:
  """check_directory for a run a binary only reads: also a bucket path (gs://BUCKET/RUN) that exists."""
  if path and path.startswith("gs://"):
    _check_bucket_path(name, path, expected, "dir")
  else:
    check_directory(name, path, expected)


def check_input_file(name: str, path: str | None, expected: str) -> None:
  """check_file for a file a binary only reads: also a bucket path (gs://BUCKET/NAME) that exists."""
  if path and path.startswith("gs://"):
    _check_bucket_path(name, path, expected, "file")
  else:
    check_file(name, path, expected)


def check_file(name: str, path: str | None, expected: str) -> None:
  """Raises FlagError unless `path` (None or empty: not given) is an existing file."""
  if path and not os.path.isfile(path):
    problem = "is a directory" if os.path.isdir(path) else "does not exist"
    raise FlagError(f"--{name}={_shown(path)} {problem}; expected {expected}")


def check_model_source(name: str, value: str | None, kind: str) -> None:
  """Raises FlagError unless `value` (None: not given) is an http(s):// endpoint URL or an existing
  directory: a language model a binary talks to (`kind` says which, e.g. "causal LM")."""
  expected = f"a local {kind} directory or the base URL of an OpenAI-compatible endpoint (http://HOST:PORT/v1)"
  if value is None:
    return
  if not value:
    raise FlagError(f"--{name} is empty; expected {expected}")
  if not value.startswith(("http://", "https://")):
    check_directory(name, value, expected)


def check_served_model(name: str, value: str | None, source_name: str, source: str | None) -> None:
  """Raises FlagError where --NAME (a served model's name) is given without an endpoint URL in --SOURCE."""
  if value and not (source or "").startswith(("http://", "https://")):
    raise FlagError(f"--{name} names a model served at an --{source_name} endpoint URL; --{source_name} "
                    f"is not one")


def check_output_directory(name: str, path: str | None, expected: str) -> None:
  """Raises FlagError where `path`, a directory the binary will create or fill, is an existing file."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise FlagError(f"--{name}={_shown(path)} is a file; expected {expected}")


def _gpu_plugin_installed() -> bool:
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  import jax_plugins

  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def _tpu_chips_present() -> bool:
  try:
    from jax._src import hardware_utils  # jax's own probe: Google TPU devices on the PCI bus
  except ImportError:
    return True  # cannot tell: leave the choice to jax
  chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  return chips > 0


def use_cpu_without_accelerator() -> bool:
  """Pins jax to the CPU when libtpu is installed but the host has no TPU and no GPU plugin.

  libtpu (the `[tpu]` extra, for ahead-of-time TPU compiles) otherwise initialises at the first
  device query on a CPU-only host and prints half a dozen lines of TPU discovery errors before every
  binary's output. JAX_PLATFORMS, JAX_FORCE_TPU_INIT, TPU chips on the host or an installed GPU
  plugin leave jax's own platform choice alone. Returns whether it pinned the CPU. Call it before
  the first device query.
  """
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
    return False
  if importlib.util.find_spec("libtpu") is None or _gpu_plugin_installed() or _tpu_chips_present():
    return False
  import jax

  jax.config.update("jax_platforms", "cpu")
  return True


def _verbose_requested(argv: list[str]) -> bool:
  return any(arg.startswith(("--verbosity", "-v=", "--v=")) for arg in argv[1:])


def _config_path(argv: list[str]) -> str:
  for arg in argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "the --config file"


def config_error_message(error: BaseException, argv: list[str]) -> str:
  """One line for an error raised while absl parsed a config file and its `--config.*` overrides."""
  path = _config_path(argv)
  if isinstance(error, SyntaxError):
    return (f"config file {error.filename or path!r} line {error.lineno}: syntax error ({error.msg}); "
            f"expected a Python file defining get_config()")
  text = str(error)
  if isinstance(error, AttributeError) and "get_config" in text:
    return f"config file {path!r} defines no get_config(); expected a function returning a ConfigDict"
  if isinstance(error, AttributeError | KeyError):
    # ml_collections: 'num_step' ... Did you mean "num_steps" instead of "num_step"? (inside a repr)
    suggestion = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    names = re.findall(r"(\w+)", text)
    key = suggestion[2] if suggestion else (names[0] if names else "?")
    override = next((arg.split("=", 1)[0] for arg in argv[1:]
                     if arg.startswith("--config.") and f".{key}" in arg.split("=", 1)[0]), None)
    hint = f"; did you mean {suggestion[1]!r}?" if suggestion else ""
    return f"{override or 'a --config override'}: {path} has no field {key!r}{hint}"
  return f"config file {path!r}: {type(error).__name__}: {' '.join(text.split())}"


def flags_parser(name: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing for app.run, with config-file and flag errors as one `sora_jax.NAME: error:` line.

  `--verbosity` on the command line keeps the traceback.
  """

  def parse(argv: list[str]) -> list[str]:
    path = _config_path(argv)
    if any(arg.startswith("--config=") for arg in argv[1:]) and not os.path.isfile(path):
      print(f"sora_jax.{name}: error: config file {path!r} does not exist; expected a path like "
            f"configs/tiny.py", file=sys.stderr, flush=True)
      sys.exit(1)
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:
      message = " ".join(str(error).split())
    except (SyntaxError, AttributeError, KeyError, ImportError, TypeError, ValueError, OSError) as error:
      if _verbose_requested(argv):
        raise
      message = config_error_message(error, argv)
    print(f"sora_jax.{name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)

  return parse


def run(main: Callable[[list[str]], None], name: str, quiet_libraries: bool = True,
        cpu_without_accelerator: bool = True) -> None:
  """app.run(main), turning a user error into `sora_jax.NAME: error: ...` on stderr and exit 1.

  `--verbosity=1` (DEBUG) re-raises with the traceback; with `quiet_libraries`, library INFO lines
  (orbax, grain, jax) are hidden unless --verbosity is given. With `cpu_without_accelerator`, see
  `use_cpu_without_accelerator` (the compile binary needs libtpu's TPU platform on a CPU host).
  """

  def guarded(argv: list[str]) -> None:
    if cpu_without_accelerator:
      use_cpu_without_accelerator()
    if quiet_libraries and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
      # gcsfs warns on every bucket it cannot probe for hierarchical namespaces (no credentials for the
      # probe, as with a local emulator) before it goes on as for any bucket.
      python_logging.getLogger("gcsfs").setLevel(python_logging.ERROR)
    try:
      main(argv)
    except Exception as error:  # noqa: BLE001 - sorted by is_user_error; anything else is re-raised
      # UsageError: stray arguments, not absl's usage text.
      if not (is_user_error(error) or isinstance(error, app.UsageError)):
        raise
      if logging.get_verbosity() >= logging.DEBUG:
        raise
      message = " ".join(str(error).split()) or type(error).__name__
      print(f"sora_jax.{name}: error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)

  _help_of(main)
  app.run(guarded, flags_parser=flags_parser(name))


def _help_of(main: Callable[[list[str]], None]) -> None:
  """--help shows the binary's usage and flags when a shim or console script is `__main__`.

  absl prints `__main__`'s docstring and the flags registered by the module named `sys.argv[0]`; the
  binaries live in sora_jax.main and are reached through `python -m sora_jax.NAME` shims and console
  scripts, whose modules hold neither.
  """
  binary, entry = sys.modules[main.__module__], sys.modules["__main__"]
  if binary is entry:
    return
  entry.__doc__ = binary.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(binary.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
