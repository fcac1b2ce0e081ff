"""Two real JAX processes (4 CPU devices each, gloo) read their shards and assemble global batches.

Checks what one process cannot: to_global's jax.Arrays span both processes' rows in process order,
and both processes agree on every step's bucket.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from helpers import free_port

_SCRIPT = textwrap.dedent('''
    import json
    import sys

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    sys.path.insert(0, TESTS_DIR)
    import numpy as np
    from jax.experimental import multihost_utils

    import test_pipeline as tp
    from sora_jax.data import pipeline

    config = tp._config(image_ratio=0.25)
    dataset = pipeline.make_dataset(config, tp._source(), process_index=jax.process_index(),
                                    process_count=jax.process_count(), seed=0, batch_size_per_process=4)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4, 1, 1),
                             ("data", "fsdp", "context", "tensor"))
    steps = []
    iterator = iter(dataset)
    for _ in range(6):
      local = next(iterator)
      batch = pipeline.to_global(local, mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
      gathered = multihost_utils.process_allgather(batch["latents"], tiled=True)
      steps.append({"local": tp._ids(local), "global": tp._ids({"latents": gathered}),
                    "global_shape": list(batch["latents"].shape)})
    with open(out, "w") as f:
      json.dump(steps, f)
    ''')


@pytest.mark.slow
def test_two_processes_build_global_batches(tmp_path):
  tests_dir = pathlib.Path(__file__).resolve().parent
  script = tmp_path / "multihost.py"
  script.write_text(_SCRIPT.replace("TESTS_DIR", repr(str(tests_dir))))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  port = free_port()
  outs = [tmp_path / f"steps_{p}.json" for p in range(2)]
  procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), str(outs[p])], env=env,
                            cwd=tests_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for p in range(2)]
  logs = [proc.communicate(timeout=240)[0] for proc in procs]
  for proc, log in zip(procs, logs, strict=True):
    assert proc.returncode == 0, log[-4000:]
  steps = [json.loads(out.read_text()) for out in outs]
  for first, second in zip(*steps, strict=True):
    # Global batch = process 0's rows then process 1's, identical on both processes.
    assert first["global"] == second["global"] == first["local"] + second["local"]
    assert first["global_shape"] == second["global_shape"]
    assert first["global_shape"][0] == 8
    assert not set(first["local"]) & set(second["local"])
