#!/usr/bin/env bash
# N trainer processes on this host's CPU, joined by jax.distributed with gloo collectives: the
# stand-in for a multi-host pod that tests/test_train.py uses.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh \
#       --config=configs/tiny.py --workdir=/tmp/sora_mp --config.data.dir=/tmp/sora_demo/dataset
#
# Every argument goes to `python -m sora_jax.train`. Process 0 logs; all exit codes are collected.
# DRY_RUN=1 prints each process's environment and command instead of starting them.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"

# A process that loses a peer exits 75 (EX_TEMPFAIL); with MAX_RESTARTS > 0 the whole job is started
# again, up to that many times, and resumes from its newest committed checkpoint.
MAX_RESTARTS="${MAX_RESTARTS:-0}"

# Transparent huge pages for XLA's per-step buffers on a CPU host, as sora_jax/host_malloc.py's
# CPU_MALLOC_ENV (tests/test_launch.py checks); a glibc.malloc.hugetlb already exported wins.
if [[ ":${GLIBC_TUNABLES:-}:" != *":glibc.malloc.hugetlb="* ]]; then
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+${GLIBC_TUNABLES}:}glibc.malloc.hugetlb=1"
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
# SIGTERM/SIGINT reach every process, which saves a checkpoint and exits 0.
trap 'stop_all; MAX_RESTARTS=0' TERM INT

attempt=0
while true; do
  pids=()
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    for ((i = 0; i < NUM_PROCESSES; i++)); do
      printf 'process %d: XLA_FLAGS=--xla_force_host_platform_device_count=%s JAX_PLATFORMS=cpu %s -m sora_jax.train --coordinator_address=localhost:%s --num_processes=%s --process_id=%d --cpu_collectives=gloo' \
        "$i" "$DEVICES_PER_PROCESS" "$PYTHON" "$PORT" "$NUM_PROCESSES" "$i"
      printf ' %q' "$@"
      printf '\n'
    done
    exit 0
  fi
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" JAX_PLATFORMS=cpu \
      "$PYTHON" -m sora_jax.train --coordinator_address="localhost:${PORT}" \
      --num_processes="$NUM_PROCESSES" --process_id="$i" --cpu_collectives=gloo "$@" &
    pids+=("$!")
  done
  status=0
  lost=0
  for pid in "${pids[@]}"; do
    code=0
    wait "$pid" || code=$?
    if [ "$code" -eq 75 ]; then lost=1; fi
    if [ "$code" -ne 0 ]; then status=$code; fi
  done
  if [ "$lost" -eq 1 ] && [ "$attempt" -lt "$MAX_RESTARTS" ]; then
    attempt=$((attempt + 1))
    echo "local_multiprocess.sh: a process was lost; restart ${attempt} of ${MAX_RESTARTS}" >&2
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
    continue
  fi
  exit "$status"
done
