"""Orbax checkpoints: round trip onto another mesh, retention, shape refusal, unreadable-step fallback."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sora_jax.train import checkpoint as checkpoint_lib
from sora_jax.train import ema as ema_lib
from sora_jax.train.state import TrainState


def _state(mesh, width=4, seed=0):
  """A small TrainState whose matrix is row-sharded over every device of `mesh`."""
  rows = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = {"dense": {"kernel": jax.device_put(
      jax.random.normal(jax.random.PRNGKey(seed), (8, width)), rows),
      "bias": jax.device_put(jnp.arange(width, dtype=jnp.float32), replicated)}}
  optimizer = optax.adam(1e-3)
  return TrainState(
      step=jnp.asarray(seed + 3, jnp.int32), params=params, opt_state=optimizer.init(params),
      ema=ema_lib.init(params, (0.9, 0.999)), rng=jax.random.PRNGKey(7),
      skipped_steps=jnp.asarray(1, jnp.int32), nonfinite_run=jnp.asarray(0, jnp.int32))


def _abstract_and_shardings(state, mesh, spec):
  sharding_of = lambda x: NamedSharding(mesh, spec if x.ndim == 2 else PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return abstract, jax.tree.map(sharding_of, abstract)


def _tree_listing(root):
  listing = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        listing[os.path.relpath(path, root)] = f.read()
  return listing


def test_round_trip_onto_another_mesh(tmp_path, tiny_train_config):
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh8)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  assert checkpointer.save(3, state)
  checkpointer.wait()
  assert not checkpointer.save(3, state)  # an existing step is never rewritten

  mesh2 = jax.make_mesh((2, 1), ("data", "tensor"), devices=jax.devices()[:2],
                        axis_types=(jax.sharding.AxisType.Auto,) * 2)
  abstract, shardings = _abstract_and_shardings(state, mesh2, PartitionSpec(None, "data"))
  restored, step = checkpointer.restore_latest(abstract, shardings)
  checkpointer.close()
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  kernel = restored.params["dense"]["kernel"]
  assert kernel.sharding.mesh.shape == mesh2.shape and kernel.sharding.spec == PartitionSpec(None, "data")
  assert sorted(restored.ema) == ["0.9", "0.999"]
  config_json = tmp_path / "checkpoints" / "3" / "config" / "metadata"
  assert config_json.is_file() and '"num_layers": 2' in config_json.read_text()


def test_keeps_last_k_and_every_mth(tmp_path, tiny_train_config):
  tiny_train_config.checkpoint.keep_last = 2
  tiny_train_config.checkpoint.keep_every = 4
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  for step in range(1, 10):
    checkpointer.save(step, state)
  checkpointer.close()
  assert checkpointer.all_steps() == [4, 8, 9]
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [4, 8, 9]


def test_other_model_shape_is_refused_and_nothing_written(tmp_path, tiny_train_config):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  checkpointer.save(5, _state(mesh, width=4))
  checkpointer.close()
  before = _tree_listing(tmp_path)

  wider = _state(mesh, width=6)
  abstract, shardings = _abstract_and_shardings(wider, mesh, PartitionSpec("fsdp"))
  again = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"another shape: params\['dense'\]\['bias'\] is \(4,\) in the checkpoint "
                           r"but \(6,\) under the config.*Nothing was written"):
    again.restore_latest(abstract, shardings)
  again.close()
  assert _tree_listing(tmp_path) == before


def test_unreadable_latest_falls_back_with_a_message(tmp_path, tiny_train_config, capsys):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  good, newer = _state(mesh, seed=0), _state(mesh, seed=1)
  checkpointer.save(2, good)
  checkpointer.save(4, newer)
  checkpointer.close()
  # Damage every data file of step 4's state (what a torn copy or a bad disk leaves behind).
  state_dir = tmp_path / "checkpoints" / "4" / "state"
  for directory, _, files in os.walk(state_dir):
    for name in files:
      if "metadata" not in name:
        with open(os.path.join(directory, name), "wb") as f:
          f.write(b"\0garbage")

  abstract, shardings = _abstract_and_shardings(good, mesh, PartitionSpec("fsdp"))
  again = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  restored, step = again.restore_latest(abstract, shardings)
  assert step == 2
  np.testing.assert_array_equal(jax.device_get(restored.params["dense"]["kernel"]),
                                jax.device_get(good.params["dense"]["kernel"]))
  assert "checkpoint step 4 is unreadable" in capsys.readouterr().out
  assert (tmp_path / checkpoint_lib.CORRUPT_DIR / "4").is_dir()
  # The step number is free again for the resumed run.
  assert again.save(4, restored)
  again.close()
  assert again.all_steps() == [2, 4]


def test_empty_directory_restores_nothing(tmp_path, tiny_train_config):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  abstract, shardings = _abstract_and_shardings(_state(mesh), mesh, PartitionSpec("fsdp"))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  assert checkpointer.restore_latest(abstract, shardings) is None
  checkpointer.close()


def test_async_save_captures_the_data_iterator_at_save_time(tmp_path, tiny_train_config, tiny_train_dataset):
  from sora_jax.data import pipeline

  tiny_train_config.checkpoint.async_save = True
  make = lambda: pipeline.make_iterator(
      tiny_train_config, tiny_train_dataset, "train", process_index=0, process_count=1, seed=3,
      batch_size_per_process=2)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  iterator = make()
  for _ in range(3):
    next(iterator)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  checkpointer.save(3, state, iterator)
  expected = [next(iterator)["latents"] for _ in range(2)]  # advances while the save may still run
  checkpointer.close()

  fresh = make()
  abstract, shardings = _abstract_and_shardings(state, mesh, PartitionSpec("fsdp"))
  again = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  _, step = again.restore_latest(abstract, shardings, fresh)
  again.close()
  assert step == 3
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["latents"], want)


def test_other_ema_decays_are_refused_not_set_aside(tmp_path, tiny_train_config):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  checkpointer.save(2, state)
  checkpointer.close()
  other = state.replace(ema=ema_lib.init(state.params, (0.5,)))
  abstract, shardings = _abstract_and_shardings(other, mesh, PartitionSpec("fsdp"))
  again = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"EMA trees for decays \['0.9', '0.999'\]"):
    again.restore_latest(abstract, shardings)
  no_clip = state.replace(opt_state=optax.sgd(0.1, momentum=0.9).init(state.params))
  abstract, shardings = _abstract_and_shardings(no_clip, mesh, PartitionSpec("fsdp"))
  with pytest.raises(checkpoint_lib.CheckpointError, match="optimizer state of another layout"):
    again.restore_latest(abstract, shardings)
  again.close()
  assert again.all_steps() == [2]
  assert not (tmp_path / checkpoint_lib.CORRUPT_DIR).exists()


def test_a_data_position_of_another_stream_is_refused(tmp_path, tiny_train_config, tiny_train_dataset):
  from sora_jax.data import pipeline

  make = lambda rows, seed=3: pipeline.make_iterator(
      tiny_train_config, tiny_train_dataset, "train", process_index=0, process_count=1, seed=seed,
      batch_size_per_process=rows)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  iterator = make(4)
  for _ in range(3):
    next(iterator)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  checkpointer.save(3, state, iterator)
  checkpointer.close()
  abstract, shardings = _abstract_and_shardings(state, mesh, PartitionSpec("fsdp"))
  for other, what in ((make(2), "global_batch_size 4 -> 2"), (make(4, seed=4), "seed 3 -> 4")):
    again = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
    with pytest.raises(checkpoint_lib.CheckpointError, match=f"another data stream.*{what}"):
      again.restore_latest(abstract, shardings, other)
    again.close()
  assert checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config).all_steps() == [3]  # kept


def test_a_checkpoint_without_the_spike_statistics_restores_them_as_zeros(tmp_path, tiny_train_config):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  old = _state(mesh)  # written before the state had grad_norm_stats
  assert old.grad_norm_stats is None
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  checkpointer.save(3, old)
  checkpointer.close()
  now = old.replace(grad_norm_stats=jnp.ones((4,), jnp.float32))
  abstract, shardings = _abstract_and_shardings(now, mesh, PartitionSpec("fsdp"))
  again = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  restored, step = again.restore_latest(abstract, shardings)
  again.close()
  assert step == 3
  np.testing.assert_array_equal(jax.device_get(restored.grad_norm_stats), np.zeros(4, np.float32))
  np.testing.assert_array_equal(jax.device_get(restored.params["dense"]["kernel"]),
                                jax.device_get(old.params["dense"]["kernel"]))


def test_failed_writes_cost_their_step_and_stop_the_run_after_max_failed_saves(
    tmp_path, tiny_train_config, monkeypatch, capsys):
  import errno

  import orbax.checkpoint as ocp

  failing = {"on": False}
  original = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, *args, **kwargs):
    if failing["on"]:
      raise OSError(errno.ENOSPC, "No space left on device")
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
  tiny_train_config.checkpoint.update(async_save=True, max_failed_saves=2)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  failing["on"] = True
  assert not checkpointer.save(1, state)
  line = capsys.readouterr().out.strip()
  assert "checkpoint step 1 could not be saved" in line and "No space left on device" in line
  assert "1 failed save(s) in a row of checkpoint.max_failed_saves=2" in line
  failing["on"] = False
  assert checkpointer.save(2, state)  # later saves still happen
  checkpointer.wait()
  assert checkpointer.all_steps() == [2]  # the failed step is never listed
  failing["on"] = True
  assert not checkpointer.save(3, state)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"2 failed save\(s\) in a row.*resumes from step 2"):
    checkpointer.save(4, state)
  failing["on"] = False
  checkpointer.close()
  again = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  abstract, shardings = _abstract_and_shardings(state, mesh, PartitionSpec("fsdp"))
  _, step = again.restore_latest(abstract, shardings)
  again.close()
  assert step == 2


def test_an_async_save_failure_is_counted_against_its_step_at_the_next_save(
    tmp_path, tiny_train_config, monkeypatch, capsys):
  import errno

  import orbax.checkpoint as ocp

  failing = {"on": False}
  original = ocp.StandardCheckpointHandler.async_save

  class FailingCommit:
    """A background write that fails once the save call has returned (as a storage error would)."""

    def result(self, timeout=None):
      raise OSError(errno.EIO, "Input/output error writing the array shards")

  async def async_save(self, *args, **kwargs):
    futures = await original(self, *args, **kwargs)
    if failing["on"]:
      for future in futures or []:
        future.result()
      return [FailingCommit()]
    return futures

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
  tiny_train_config.checkpoint.update(async_save=True, max_failed_saves=2)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  failing["on"] = True
  assert checkpointer.save(1, state)  # started: the failure is still to come
  failing["on"] = False
  assert capsys.readouterr().out == ""
  assert checkpointer.save(2, state)  # step 1's failure surfaces here, and step 2 still saves
  line = capsys.readouterr().out.strip()
  assert line.startswith("checkpoint step 1 could not be saved") and "Input/output error" in line
  assert "1 failed save(s) in a row" in line
  checkpointer.wait()
  assert checkpointer.all_steps() == [2]
  # A failure surfacing when the run waits counts too, and two in a row stop it.
  failing["on"] = True
  assert checkpointer.save(3, state)
  checkpointer.wait()
  assert "checkpoint step 3 could not be saved" in capsys.readouterr().out
  assert checkpointer.save(4, state)
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"step 4 could not be saved.*2 failed save\(s\)"):
    checkpointer.close()
