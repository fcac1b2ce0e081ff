"""Where a trace runs: the platform of the mesh being traced under, and whether it is one CPU device.

The one place model code asks which kernels apply: the TPU kernels (`splash`) when tracing for a TPU,
even on a CPU host compiling ahead of time; the CPU kernels (`cpu_kernels`) on one CPU device.
"""

from __future__ import annotations

import jax


def traced_platform() -> str:
  """Platform of the mesh being traced under (an AOT compile for TPU runs on a CPU host), else jax's."""
  mesh = jax.sharding.get_abstract_mesh()
  platform = None if mesh.empty else getattr(mesh.abstract_device, "platform", None)
  return platform or jax.default_backend()


def one_cpu_device() -> bool:
  """Tracing for the CPU with no mesh, or a mesh of one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return traced_platform() == "cpu" and (mesh.empty or mesh.size == 1)
