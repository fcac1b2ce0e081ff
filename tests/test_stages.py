"""A run started from another run (`train.init_from=RUN[@STEP]`): pinning, weight sets, the optimizer
carried or restarted, shapes that do not fit, and the train binary doing a two-stage recipe."""

import json
import os
import subprocess

import jax
import numpy as np
import optax
import pytest

from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import checkpoint as checkpoint_lib
from sora_jax.train import stages
from sora_jax.train import step as step_lib


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A run directory with steps 5 and 7; step 7 holds distinct params, EMA trees and a non-fresh
  optimizer state."""
  from conftest import _tiny_train_config

  workdir = str(tmp_path_factory.mktemp("stage_1"))
  config = _tiny_train_config()
  mesh = mesh_lib.create_mesh(config)
  trainable = step_lib.build(config, mesh)
  state = trainable.setup.init(jax.random.PRNGKey(0))
  bump = lambda tree, by: jax.tree.map(lambda x: x + jax.numpy.asarray(by, x.dtype), tree)
  state = state.replace(opt_state=bump(state.opt_state, 3), ema=jax.tree.map(lambda x: x * 2, state.ema))
  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  checkpointer.save(5, state)
  checkpointer.save(7, state)
  checkpointer.close()
  return workdir, jax.device_get(state)


def _stage_config(tiny_train_config, init_from, **train):
  config = tiny_train_config.copy_and_resolve_references()
  config.train.init_from = init_from
  config.train.update(train)
  return config


def _start(config, tmp_path):
  config = stages.pin(config, str(tmp_path / "stage_2"))
  mesh = mesh_lib.create_mesh(config)
  trainable = step_lib.build(config, mesh)
  return config, jax.device_get(stages.initial_state(config, trainable.optimizer, trainable.setup, mesh))


def test_raw_weights_start_with_a_fresh_optimizer(source, tiny_train_config, tmp_path):
  workdir, saved = source
  config, state = _start(_stage_config(tiny_train_config, workdir), tmp_path)
  assert config.train.init_from == f"{workdir}@7"  # pinned: config.json and checkpoints record it
  assert _leaves_equal(state.params, saved.params) and int(state.step) == 0
  assert _leaves_equal(state.ema["0.9"], saved.params)  # the EMA restarts at the starting weights
  assert not _leaves_equal(state.opt_state, saved.opt_state)


def test_an_ema_weight_set_and_the_carried_optimizer(source, tiny_train_config, tmp_path):
  workdir, saved = source
  config, state = _start(_stage_config(tiny_train_config, f"{workdir}@7", init_weights="ema_0.99",
                                       init_optimizer="carry"), tmp_path)
  assert _leaves_equal(state.params, saved.ema["0.99"]) and _leaves_equal(state.ema, saved.ema)
  # AdamW's moments and bias-correction count carry over; the learning-rate schedule restarts at 0.
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
  restarted = jax.tree.map(lambda node: node._replace(count=np.zeros_like(node.count)) if is_schedule(node)
                           else node, saved.opt_state, is_leaf=is_schedule)
  assert _leaves_equal(state.opt_state, restarted)
  is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
  adam = lambda tree: [node for node in jax.tree.leaves(tree, is_leaf=is_adam) if is_adam(node)]
  assert int(adam(state.opt_state)[0].count) == int(adam(saved.opt_state)[0].count) > 0


def test_what_cannot_start_a_stage_is_one_error(source, tiny_train_config, tmp_path):
  workdir, _ = source
  with pytest.raises(stages.StageError, match=r"step 9 is not a checkpoint .* available steps: \[5, 7\]"):
    stages.pin(_stage_config(tiny_train_config, f"{workdir}@9"), str(tmp_path))
  with pytest.raises(stages.StageError, match=r"no weight set \['ema_0.5'\]"):
    _start(_stage_config(tiny_train_config, workdir, init_weights="ema_0.5"), tmp_path)
  wider = _stage_config(tiny_train_config, workdir)
  wider.model.ffn_dim = 2 * wider.model.ffn_dim
  with pytest.raises(stages.StageError, match=r"do not fit this model .*model\.ffn_dim=64 there, 128 here"):
    _start(wider, tmp_path)
  other = _stage_config(tiny_train_config, workdir, init_optimizer="carry", ema_decays=(0.5,))
  with pytest.raises(stages.StageError, match="train.init_optimizer=carry: the optimizer state and EMA"):
    _start(other, tmp_path)
  with pytest.raises(stages.StageError, match="holds no checkpoints"):
    stages.parse_run(f"{tmp_path}@3")
  assert stages.parse_run(str(tmp_path)) is None  # not a run: a pipeline directory's business


def test_a_restart_keeps_the_step_it_started_from_without_reading_the_source(source, tiny_train_config,
                                                                             tmp_path):
  import shutil

  workdir, _ = source
  run = tmp_path / "stage_2"
  shutil.copytree(os.path.join(workdir, "checkpoints", "5"), run / "checkpoints" / "5")  # its own step
  (run / "config.json").write_text(json.dumps({"train": {"init_from": f"{workdir}@5"}}))
  pinned = stages.pin(_stage_config(tiny_train_config, workdir), str(run))
  assert pinned.train.init_from == f"{workdir}@5"  # not the source's newest step, 7
  # The source may be gone by the time a stage restarts: its own checkpoints are all it reads.
  gone = str(tmp_path / "deleted_stage_1")
  (run / "config.json").write_text(json.dumps({"train": {"init_from": f"{gone}@5"}}))
  assert stages.pin(_stage_config(tiny_train_config, gone), str(run)).train.init_from == f"{gone}@5"


def test_the_train_binary_runs_a_second_stage_from_the_first(tiny_train_config, tiny_train_dataset, tmp_path):
  from test_train import REPO, _env, _metrics, _overrides, _train_command

  env = _env(tmp_path / "xla_cache")
  first, second = tmp_path / "stage_1", tmp_path / "stage_2"
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{"train.num_steps": 2,
                                                               "checkpoint.every_steps": 2})
  run = lambda workdir, *extra: subprocess.run(_train_command(workdir, [*flags, *extra]), cwd=REPO, env=env,
                                               capture_output=True, text=True, timeout=600)
  done = run(first)
  assert done.returncode == 0, done.stderr[-3000:]
  done = run(second, f"--config.train.init_from={first}", "--config.train.init_weights=ema_0.99",
             "--config.train.learning_rate=3e-5")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"from {first}@2" in done.stdout + done.stderr
  with open(second / "config.json", encoding="utf-8") as f:
    recorded = json.load(f)["train"]
  assert recorded["init_from"] == f"{first}@2" and recorded["init_weights"] == "ema_0.99"
  from sora_jax.train import run_weights

  assert run_weights.saved_config(str(second), 2).train.init_from == f"{first}@2"
  assert [row["step"] for row in _metrics(second)] == [1, 2]

  wider = run(tmp_path / "stage_x", f"--config.train.init_from={first}", "--config.model.ffn_dim=128")
  lines = [line for line in wider.stderr.splitlines() if line.startswith("sora_jax.train: error:")]
  assert wider.returncode == 1 and len(lines) == 1 and "model.ffn_dim=64 there, 128 here" in lines[0], \
      wider.stderr[-2000:]
  assert not os.path.exists(tmp_path / "stage_x" / "checkpoints")
  alone = run(tmp_path / "stage_y", "--config.train.init_weights=ema_0.99")  # a stage without its source
  lines = [line for line in alone.stderr.splitlines() if line.startswith("sora_jax.train: error:")]
  assert alone.returncode == 1 and len(lines) == 1 and "train.init_from is empty" in lines[0], \
      alone.stderr[-2000:]
