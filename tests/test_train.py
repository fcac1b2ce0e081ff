"""The trainer end to end: the binary, exact resume after SIGTERM, bad input, multi-process runs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from sora_jax.model.dit import DiT
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import checkpoint as checkpoint_lib
from sora_jax.train import loop
from sora_jax.train import optimizer as optimizer_lib
from sora_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = {"step", "loss", "grad_norm", "lr", "skipped_steps", "spike_steps", "step_time_s",
               "examples_per_s",
               "tokens_per_s", "mfu", "data_wait_frac"}


def _overrides(config, data_dir, **extra):
  """--config.* flags that turn configs/tiny.py into the shrunk test config."""
  m, d, t = config.model, config.data, config.train
  values = {
      "model.dim": m.dim, "model.num_heads": m.num_heads, "model.ffn_dim": m.ffn_dim,
      "model.num_layers": m.num_layers, "model.text_dim": m.text_dim,
      "model.patch_size": "(1,2,2)",
      "data.buckets": "((4,8,8),)", "data.image_buckets": "((1,8,8),)", "data.text_len": d.text_len,
      "data.read_threads": 1, "data.prefetch_buffer": 1, "data.dir": data_dir,
      "train.global_batch_size": t.global_batch_size, "train.warmup_steps": t.warmup_steps,
      "train.log_every": 1, "train.fast_compile": True,
      # A cosine schedule spans train.num_steps, which differs between the runs compared here.
      "train.schedule": "constant",
  }
  values.update(extra)
  return [f"--config.{key}={value}" for key, value in values.items()]


def _env(cache_dir=None, devices=8):
  """Subprocess environment; `cache_dir` shares XLA executables between runs to save compiles."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _train_command(workdir, overrides):
  return [sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          *overrides]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _losses_by_step(records):
  # A resumed run re-logs nothing twice, but keep the newest record of a step if it did.
  return {r["step"]: r["loss"] for r in records}


def test_binary_sigterm_resume_is_exact(tmp_path, tiny_train_config, tiny_train_dataset):
  cache = tmp_path / "xla_cache"
  interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{"checkpoint.every_steps": 1000})

  # 1. A long run, stopped by SIGTERM once it has logged a few steps: it saves and exits 0.
  process = subprocess.Popen(
      _train_command(interrupted, [*flags, "--config.train.num_steps=1000"]), cwd=REPO,
      env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_path = interrupted / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 3:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert "SIGTERM: saving step" in output
  stopped_at = checkpoint_lib.Checkpointer(str(interrupted), tiny_train_config).all_steps()[-1]
  assert 3 <= stopped_at < 1000
  total = stopped_at + 3

  # 2. Resume to `total` steps, 3. the same number of steps uninterrupted.
  outputs = []
  for workdir, extra in ((interrupted, []), (reference, ["--profile_steps=1:2"])):
    command = _train_command(workdir, [*flags, f"--config.train.num_steps={total}", *extra])
    result = subprocess.run(command, cwd=REPO, env=_env(cache), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    outputs.append(result.stdout + result.stderr)
  assert f"resuming from step {stopped_at}" in outputs[0]
  assert "resuming" not in outputs[1]

  resumed, uninterrupted = _metrics(interrupted), _metrics(reference)
  assert [r["step"] for r in uninterrupted] == list(range(1, total + 1))
  assert [r["step"] for r in resumed] == list(range(1, total + 1))
  assert _losses_by_step(resumed) == _losses_by_step(uninterrupted)  # bit-identical
  for record in uninterrupted:
    assert METRIC_KEYS <= set(record)
    assert record["mfu"] is None  # CPU: no peak FLOPs entry
    assert 0.0 <= record["data_wait_frac"] <= 1.0 and record["examples_per_s"] > 0
    assert any(key.startswith("loss_sigma/") for key in record)
  assert os.listdir(reference / "tensorboard")
  assert any(files for _, _, files in os.walk(reference / "profile"))  # --profile_steps trace
  saved_config = json.loads((reference / "config.json").read_text())
  assert saved_config["train"]["num_steps"] == total and saved_config["model"]["dim"] == 32


def test_binary_fails_fast_on_bad_mesh(tmp_path, tiny_train_config, tiny_train_dataset):
  start = time.time()
  result = subprocess.run(
      _train_command(tmp_path / "w", _overrides(tiny_train_config, tiny_train_dataset,
                                                **{"mesh.ici": "(3,1,1,1)"})),
      cwd=REPO, env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=60)
  assert time.time() - start < 5 + 10  # < 5 s on an idle machine; slack for a loaded CI host
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("sora_jax.train: error: mesh.ici=(3, 1, 1, 1)")
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()


def test_missing_and_empty_data_dir(tmp_path, tiny_train_config):
  tiny_train_config.data.dir = ""
  with pytest.raises(loop.TrainError, match="config.data.dir is empty"):
    loop.train(tiny_train_config, str(tmp_path / "w1"))
  tiny_train_config.data.dir = str(tmp_path / "nowhere")
  with pytest.raises(loop.TrainError, match="nowhere' does not exist"):
    loop.train(tiny_train_config, str(tmp_path / "w2"))
  (tmp_path / "empty").mkdir()
  tiny_train_config.data.dir = str(tmp_path / "empty")
  with pytest.raises(loop.TrainError, match="empty' is empty"):
    loop.train(tiny_train_config, str(tmp_path / "w3"))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("not a dataset")
  tiny_train_config.data.dir = str(tmp_path / "junk")
  with pytest.raises(loop.TrainError, match="junk'"):
    loop.train(tiny_train_config, str(tmp_path / "w4"))


def test_read_only_workdir(tmp_path, tiny_train_config, tiny_train_dataset):
  tiny_train_config.data.dir = tiny_train_dataset
  if os.geteuid() != 0:
    workdir = tmp_path / "read_only"
    workdir.mkdir()
    workdir.chmod(0o555)
  elif os.path.isdir("/sys") and not os.access("/sys", os.W_OK | os.X_OK) or _sys_unwritable():
    workdir = "/sys"  # root ignores file modes; sysfs refuses new files even to root
  else:
    pytest.skip("no read-only directory available to root on this host")
  with pytest.raises(loop.TrainError, match="is not writable"):
    loop.train(tiny_train_config, str(workdir))


def _sys_unwritable():
  try:
    with open("/sys/.sora_probe", "w"):
      return False
  except OSError:
    return True


def test_checkpoint_of_another_model_is_refused_untouched(tmp_path, tiny_train_config, tiny_train_dataset):
  tiny_train_config.data.dir = tiny_train_dataset
  workdir = tmp_path / "w"
  # A checkpoint written by a 3-layer model of the same family.
  bigger = tiny_train_config.copy_and_resolve_references()
  bigger.model.num_layers = 3
  mesh = mesh_lib.create_mesh(bigger)
  rules = sharding_lib.logical_rules(bigger.mesh)
  model = DiT(config=bigger.model)
  with sharding_lib.mesh_context(mesh, rules):
    boxed = state_lib.abstract_params(model, bigger)
  setup = state_lib.setup_state(model, bigger, optimizer_lib.make_optimizer(bigger.train, boxed), mesh, rules)
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), bigger)
  checkpointer.save(7, setup.init(jax.random.PRNGKey(0)))
  checkpointer.close()
  (workdir / "config.json").write_text('{"model": "three layers"}')
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}

  with pytest.raises(checkpoint_lib.CheckpointError, match=r"checkpoint step 7 .* another shape: .*"
                                                           r"\(3, .* but \(2, .*Nothing was written"):
    loop.train(tiny_train_config, str(workdir))
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert after == before
  assert not (workdir / "metrics.jsonl").exists()


# Ring attention over all 8 devices: its ppermutes cross the process boundary (gloo), and both
# processes hold the whole batch, so they must read the same clips.
_RING_ACROSS_PROCESSES = {"model.attention_backend": "ring", "mesh.ici": "(1,1,8,1)",
                          "data.image_buckets": "((1,16,16),)"}  # 16 tokens: split 8 ways


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, _RING_ACROSS_PROCESSES], ids=["fsdp8", "ring_context8"])
def test_two_processes_match_one(tmp_path, tiny_train_config, tiny_train_dataset, extra):
  """2 processes x 4 CPU devices (gloo) train the same losses as 1 process x 8 devices."""
  cache = tmp_path / "xla_cache"
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{"train.num_steps": 3}, **extra)
  single = tmp_path / "single"
  result = subprocess.run(_train_command(single, flags), cwd=REPO, env=_env(cache), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  multi = tmp_path / "multi"
  launcher = os.path.join(REPO, "launch", "local_multiprocess.sh")
  env = _env(cache, devices=4)
  env.update(NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", PYTHON=sys.executable)
  result = subprocess.run(["bash", launcher, "--config=configs/tiny.py", f"--workdir={multi}", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  single_losses, multi_losses = _losses_by_step(_metrics(single)), _losses_by_step(_metrics(multi))
  assert sorted(multi_losses) == [1, 2, 3]
  for step, loss in single_losses.items():
    assert abs(multi_losses[step] - loss) <= 1e-5 * max(1.0, abs(loss))
  assert checkpoint_lib.Checkpointer(str(multi), tiny_train_config).all_steps()[-1] == 3


def test_nonfinite_run_rolls_back_to_the_last_checkpoint(tmp_path, tiny_train_config):
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  from sora_jax.train import metrics as metrics_lib
  from sora_jax.train.state import StateSetup, TrainState

  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, PartitionSpec("fsdp"))

  def make(value, step, nonfinite_run):
    params = {"kernel": jax.device_put(jnp.full((8, 2), value), rows)}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state=optax.sgd(0.1).init(params), ema={}, rng=jax.random.PRNGKey(0),
                      skipped_steps=jnp.asarray(nonfinite_run, jnp.int32),
                      nonfinite_run=jnp.asarray(nonfinite_run, jnp.int32))

  good, diverged = make(1.0, 4, 0), make(np.nan, 9, 5)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), good)
  shardings = jax.tree.map(lambda x: rows if x.ndim == 2 else NamedSharding(mesh, PartitionSpec()), good)
  setup = StateSetup(abstract_state=abstract, shardings=shardings, init=None)
  progress = metrics_lib.Progress(10, 0, enabled=False)

  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), tiny_train_config)
  with pytest.raises(loop.TrainError, match="no checkpoint to roll back to"):
    loop._roll_back(checkpointer, setup, diverged, 9, progress)
  checkpointer.save(4, good)
  rolled = loop._roll_back(checkpointer, setup, diverged, 9, progress)
  checkpointer.close()
  np.testing.assert_array_equal(jax.device_get(rolled.params["kernel"]), 1.0)
  assert int(rolled.step) == 9 and int(rolled.nonfinite_run) == 0 and int(rolled.skipped_steps) == 5


def test_a_resumed_run_drops_the_metrics_rows_past_its_checkpoint(tmp_path):
  from sora_jax.train import metrics as metrics_lib

  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 8)]
  path.write_text("\n".join(rows) + '\n{"step": 8, "lo')  # killed mid-line after step 7
  writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=5)
  writer.write(6, {"loss": 0.5})
  writer.close()
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert path.read_text().splitlines()[:5] == rows[:5]  # kept rows are kept byte for byte


def test_ctrl_c_saves_and_exits_cleanly_and_a_second_one_aborts(tiny_train_config, tiny_train_dataset,
                                                                  tmp_path):
  workdir = tmp_path / "run"
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{"checkpoint.every_steps": 1000})
  process = subprocess.Popen(
      _train_command(workdir, [*flags, "--config.train.num_steps=1000"]), cwd=REPO,
      env=_env(str(tmp_path / "cache")), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_path = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert "SIGINT: saving step" in output, output
  assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
  saved = checkpoint_lib.Checkpointer(str(workdir), tiny_train_config).all_steps()
  assert saved and 2 <= saved[-1] < 1000
  steps = [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()]
  assert steps == list(range(1, saved[-1] + 1))

  # Ctrl-C twice in a row: the run stops at once, in one line, and a restart resumes from a readable step.
  process = subprocess.Popen(
      _train_command(workdir, [*flags, "--config.train.num_steps=1000"]), cwd=REPO,
      env=_env(str(tmp_path / "cache")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  before = len(metrics_path.read_text().splitlines())
  while time.time() < deadline + 300 and process.poll() is None:
    if len(metrics_path.read_text().splitlines()) >= before + 2:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  time.sleep(0.01)
  process.send_signal(signal.SIGINT)
  _, errors = process.communicate(timeout=120)
  if process.returncode == 130:
    assert errors.strip().splitlines()[-1].startswith("sora_jax.train: interrupted twice"), errors
  else:  # the first Ctrl-C's save finished before the second arrived
    assert process.returncode == 0, errors
  assert "Traceback" not in errors, errors
  resumed = checkpoint_lib.Checkpointer(str(workdir), tiny_train_config).all_steps()
  assert resumed and resumed[-1] >= saved[-1]


def test_a_relative_workdir_trains_saves_and_resumes(tiny_train_config, tiny_train_dataset, tmp_path,
                                                     monkeypatch):
  monkeypatch.chdir(tmp_path)  # orbax refuses relative checkpoint paths unless the trainer resolves them
  config = tiny_train_config
  config.data.dir = tiny_train_dataset
  config.train.num_steps = 2
  loop.train(config, "run")
  assert checkpoint_lib.Checkpointer("run", config).all_steps() == [2]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["bucketed", "packed"])
def test_elastic_resume_2x4_to_1x8_to_1x4_continues_the_same_losses(tmp_path, tiny_train_config,
                                                                      tiny_train_dataset, packing):
  """A run saved on 2 processes x 4 devices resumes on 1 x 8, then 1 x 4, with the losses of an
  uninterrupted 1 x 8 run: same data stream, same state, new shardings. Packed: rows of 2 clips."""
  from sora_jax.train import step as step_lib

  cache = tmp_path / "xla_cache"
  packed = {"data.packing": True, "data.token_budget": 32} if packing else {}
  flags = lambda steps: _overrides(tiny_train_config, tiny_train_dataset,
                                   **{"train.num_steps": steps, **packed})
  reference = tmp_path / "reference"
  result = subprocess.run(_train_command(reference, flags(6)), cwd=REPO, env=_env(cache),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  elastic = tmp_path / "elastic"
  env = _env(cache, devices=4)
  env.update(NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", PYTHON=sys.executable)
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"),
                           "--config=configs/tiny.py", f"--workdir={elastic}", *flags(2)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  for steps, devices in ((4, 8), (6, 4)):
    result = subprocess.run(_train_command(elastic, flags(steps)), cwd=REPO, env=_env(cache, devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
  want, got = _losses_by_step(_metrics(reference)), _losses_by_step(_metrics(elastic))
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  for step, loss in want.items():
    assert abs(got[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, got[step], loss)
  # The state restores onto a mesh of another size with that mesh's shardings.
  from sora_jax.train import run_weights as weights

  config = weights.saved_config(str(elastic), 6)
  mesh = mesh_lib.create_mesh(config, jax.devices()[:2])
  setup = step_lib.build(config, mesh).setup
  checkpointer = checkpoint_lib.Checkpointer(str(elastic), config)
  state, step = checkpointer.restore_latest(setup.abstract_state, setup.shardings)
  checkpointer.close()
  kernel = state.params["blocks"]["ffn"]["proj_in"]["kernel"]
  assert step == 6 and kernel.sharding == setup.shardings.params["blocks"]["ffn"]["proj_in"]["kernel"]
  assert len(kernel.sharding.device_set) == 2 and not kernel.sharding.is_fully_replicated


def test_damaged_checkpoints_fall_back_in_one_line_and_all_damaged_is_one_error(
    tmp_path, tiny_train_config, tiny_train_dataset):
  from test_damaged_checkpoints import _damage, _listing

  cache = tmp_path / "xla_cache"
  workdir = tmp_path / "run"
  flags = _overrides(tiny_train_config, tiny_train_dataset, **{"train.num_steps": 4,
                                                                "checkpoint.every_steps": 2})
  result = subprocess.run(_train_command(workdir, flags), cwd=REPO, env=_env(cache), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  _damage(str(workdir), 4)
  result = subprocess.run(_train_command(workdir, _overrides(
      tiny_train_config, tiny_train_dataset, **{"train.num_steps": 5, "checkpoint.every_steps": 2})),
      cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  output = result.stdout + result.stderr
  assert "Traceback" not in output
  notices = [line for line in output.splitlines() if "unreadable" in line]
  assert len(notices) == 1 and "checkpoint step 4 is unreadable" in notices[0] and "step 2" in notices[0]
  assert (workdir / "checkpoints_unreadable" / "4").is_dir()
  assert sorted(_losses_by_step(_metrics(workdir))) == [1, 2, 3, 4, 5]

  for step in checkpoint_lib.Checkpointer(str(workdir), tiny_train_config).all_steps():
    _damage(str(workdir), step)
  before = _listing(str(workdir))
  result = subprocess.run(_train_command(workdir, flags), cwd=REPO, env=_env(cache), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("sora_jax.train: error: every checkpoint in"), lines
  assert _listing(str(workdir)) == before
