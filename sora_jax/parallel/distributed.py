"""Multi-process start-up of the binaries that run on every host of a slice (train, eval).

Owns the flags (--distributed, --coordinator_address, --num_processes, --process_id,
--cpu_collectives), their checks, whether a launcher started this process as one of several, and
`jax.distributed` initialisation. Defined once here, so every binary reads a pod the same way.
"""

from __future__ import annotations

import os

from absl import flags

from sora_jax import cli

DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process start-up: auto = jax.distributed.initialize() when coordinator flags are given or a "
    "cluster (TPU pod, SLURM, GKE/JobSet) is detected; on = always; off = single process.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (omit to auto-detect).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Total number of processes of the job (omit to auto-detect).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Index of this process in [0, num_processes) (omit to auto-detect).")
CPU_COLLECTIVES = flags.DEFINE_enum(
    "cpu_collectives", "gloo", ["gloo", "mpi", "none"],
    "Collectives implementation of multi-process CPU runs (what launch/local_multiprocess.sh uses).")

# Environment variables whose presence means a multi-process launcher started us.
CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
               "JOBSET_NAME", "OMPI_COMM_WORLD_SIZE")


def wanted() -> bool:
  """Whether this process is one of several: the flags say so, or a cluster launcher's environment."""
  if DISTRIBUTED.value == "off":
    return False
  if DISTRIBUTED.value == "on" or COORDINATOR.value or (NUM_PROCESSES.value or 1) > 1:
    return True
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
    return False
  return any(os.environ.get(name) for name in CLUSTER_ENV)


def check_flags() -> None:
  """The start-up flags' values, before any device is touched."""
  cli.check_number("num_processes", NUM_PROCESSES.value, "at least 1 process", minimum=1)
  processes = NUM_PROCESSES.value
  if processes is not None:
    cli.check_number("process_id", PROCESS_ID.value, f"an index in [0, --num_processes={processes})",
                     minimum=0, below=processes)
  cli.check_number("process_id", PROCESS_ID.value, "an index >= 0", minimum=0)
  address = COORDINATOR.value
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise cli.FlagError(f"--coordinator_address={address!r}; expected HOST:PORT of process 0, e.g. "
                          f"10.0.0.2:1234")


def initialize(peer_timeout_s: int) -> None:
  """jax.distributed.initialize from the flags (what they leave out, the cluster's environment gives)."""
  import jax

  if CPU_COLLECTIVES.value != "none":
    jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES.value)
  kwargs = {}
  if COORDINATOR.value:
    kwargs["coordinator_address"] = COORDINATOR.value
  if NUM_PROCESSES.value is not None:
    kwargs["num_processes"] = NUM_PROCESSES.value
  if PROCESS_ID.value is not None:
    kwargs["process_id"] = PROCESS_ID.value
  # A process that misses heartbeats this long is lost: the others stop.
  jax.distributed.initialize(heartbeat_timeout_seconds=int(peer_timeout_s), **kwargs)
