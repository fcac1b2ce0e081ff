"""The launch scripts: each prints exactly what it would run (DRY_RUN=1), and the JobSet is complete."""

import os
import re
import subprocess

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--config=configs/wan_1_3b.py", "--config.train.num_steps=7", "--config.eval.prompts=('a b',)"]


def _words(line: str) -> list[str]:
  """The arguments of a command line printed with bash's `printf %q`, as bash reads them."""
  result = subprocess.run(["bash", "-c", 'eval "set -- $LINE"; printf "%s\\0" "$@"'], capture_output=True,
                          check=True, env={**os.environ, "LINE": line})
  return result.stdout.decode().split("\0")[:-1]


def _dry_run(script, env, *args):
  result = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO,
                          env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip().splitlines()


def test_local_launcher_prints_one_command_per_process():
  lines = _dry_run("local_multiprocess.sh", {"NUM_PROCESSES": "3", "DEVICES_PER_PROCESS": "2", "PORT": "4321",
                                             "PYTHON": "python3"}, "--workdir=/tmp/w x", *TRAIN_ARGS)
  assert len(lines) == 3
  for index, line in enumerate(lines):
    words = _words(line.split(": ", 1)[1])
    assert words[:4] == ["XLA_FLAGS=--xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu",
                         "python3", "-m"]
    assert words[4] == "sora_jax.train" and "--coordinator_address=localhost:4321" in words
    assert f"--process_id={index}" in words and "--num_processes=3" in words
    assert words[-4:] == ["--workdir=/tmp/w x", *TRAIN_ARGS]  # arguments survive quoting


def test_tpu_pod_launcher_runs_the_trainer_on_every_worker():
  (line,) = _dry_run("tpu_pod.sh", {"TPU_NAME": "pod", "ZONE": "us-east5-a", "WORKDIR": "/mnt/gcs/runs/r",
                                    "DATA_DIR": "/mnt/gcs/data"}, *TRAIN_ARGS)
  words = _words(line)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--zone=us-east5-a" in words and "--worker=all" in words
  remote = words[words.index("--command") + 1]
  train = next(part for part in remote.splitlines() if "sora_jax.train" in part)
  train_words = _words(train.split("2>&1")[0])
  assert train_words[:4] == [".venv/bin/python", "-m", "sora_jax.train", "--distributed=on"]
  assert "--workdir=/mnt/gcs/runs/r" in train_words and "--config.data.dir=/mnt/gcs/data" in train_words
  assert train_words[-3:] == TRAIN_ARGS


def test_tpu_pod_launcher_runs_eval_on_every_worker_and_refuses_other_binaries():
  env = {"TPU_NAME": "pod", "ZONE": "us-east5-a", "WORKDIR": "gs://b/runs/r", "DATA_DIR": "gs://b/data"}
  (line,) = _dry_run("tpu_pod.sh", {**env, "BINARY": "eval"}, "--watch")
  remote = _words(line)[_words(line).index("--command") + 1]
  command = _words(next(part for part in remote.splitlines() if "sora_jax." in part).split("2>&1")[0])
  assert command[:4] == [".venv/bin/python", "-m", "sora_jax.eval", "--distributed=on"]
  assert "--workdir=gs://b/runs/r" in command and command[-1] == "--watch"
  refused = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh")], capture_output=True,
                           text=True, env={**os.environ, **env, "BINARY": "export", "DRY_RUN": "1"})
  assert refused.returncode == 2 and "BINARY=export; expected train or eval" in refused.stderr


def test_slurm_launcher_runs_one_task_per_node():
  lines = _dry_run("slurm_gpu.sbatch", {"SLURM_SUBMIT_DIR": REPO}, *TRAIN_ARGS)
  assert lines[0].startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=0.9")
  words = _words(lines[1])
  assert words[:5] == ["srun", ".venv/bin/python", "-m", "sora_jax.train", "--distributed=on"]
  assert words[-3:] == TRAIN_ARGS
  with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
    script = f.read()
  assert "#SBATCH --requeue" in script and "scontrol requeue" in script


def test_jobset_is_complete():
  with open(os.path.join(REPO, "launch", "jobset_gke.yaml")) as f:
    jobset = yaml.safe_load(f)
  assert jobset["kind"] == "JobSet" and jobset["spec"]["failurePolicy"]["maxRestarts"] >= 1
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] and job["backoffLimit"] == 0
  pod = job["template"]
  assert pod["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
  spec = pod["spec"]
  assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] >= 60
  (container,) = spec["containers"]
  assert container["image"] and container["command"][:3] == ["python", "-m", "sora_jax.train"]
  mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
  volumes = {v["name"]: v for v in spec["volumes"]}
  assert set(mounts) == set(volumes)
  workdir = next(a.split("=", 1)[1] for a in container["command"] if a.startswith("--workdir="))
  assert any(workdir.startswith(path) for path in mounts.values())  # the shared workdir is mounted
  assert os.path.isfile(os.path.join(REPO, "Dockerfile"))


def test_local_launcher_exports_the_host_malloc_tunable():
  from sora_jax import host_malloc

  script = os.path.join(REPO, "launch", "local_multiprocess.sh")
  for before, expected in ((None, host_malloc.child_env({})["GLIBC_TUNABLES"]),
                           ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
                           ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0")):
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    if before:
      env["GLIBC_TUNABLES"] = before
    # The launcher's own export block, run alone: what its trainer processes would inherit.
    block = re.search(r"^if \[\[ .*?^fi$", open(script, encoding="utf-8").read(), re.M | re.S).group(0)
    result = subprocess.run(["bash", "-c", block + '\nprintf %s "$GLIBC_TUNABLES"'], env=env,
                            capture_output=True, text=True, check=True)
    assert result.stdout == expected
    assert host_malloc.child_env(env)["GLIBC_TUNABLES"] == expected
