"""glibc malloc setting for CPU training processes; importable without jax.

XLA's CPU runtime allocates each execution's temporary buffer (over a GB for the 512-token tiny step)
with malloc from a worker thread. glibc serves a block that large by a fresh `mmap` and gives it back
with `munmap` when the step ends, so every step faults in every 4 KiB page of it again, a large share
of a CPU step's time (docs/benchmarks.md, "Where the CPU step's time goes").
`glibc.malloc.hugetlb=1` has malloc ask for transparent huge pages on such blocks (glibc >= 2.35, with
/sys/kernel/mm/transparent_hugepage/enabled at `madvise` or `always`), so a step faults in 2 MiB pages,
512 times fewer faults. One arena (`MALLOC_ARENA_MAX=1`), so that the block is never unmapped, is not
used: the threads would contend for that arena's lock (experiments/cpu_step.md).

glibc reads the variable once, at process start, so it only helps a process started with it:
`child_env` is for parents that launch CPU work (the demo's stages, the benchmark's workers); a user
launching `python -m sora_jax.train` on a CPU host exports it in the shell (docs/training.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
CPU_MALLOC_ENV: dict[str, str] = {"GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=1"}


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process's environment) with `glibc.malloc.hugetlb=1` added to its
  `GLIBC_TUNABLES`, unless that already sets `glibc.malloc.hugetlb` (a user's own choice wins)."""
  env = dict(os.environ if base is None else base)
  tunables = [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]
  if not any(item.split("=", 1)[0] == HUGETLB_TUNABLE for item in tunables):
    tunables.append(CPU_MALLOC_ENV["GLIBC_TUNABLES"])
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env
