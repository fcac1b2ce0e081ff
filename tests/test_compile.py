"""sora_jax.compile: topology names, and the real train step compiled ahead of time for a TPU."""

import os
import subprocess
import sys

import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax import patches, tpu_fit
from sora_jax.model import dit, flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.mark.parametrize("name, generation, topology", [
    ("v5p-8", "v5p", "v5p:2x2x1"),
    ("v5p-128", "v5p", "v5p:4x4x4"),
    ("v4-32", "v4", "v4:2x2x4"),
    ("v5e-16", "v5e", "v5e:4x4"),
    ("v5litepod-32", "v5e", "v5e:4x8"),
    ("v6e-256", "v6e", "v6e:16x16"),
    ("v5e:2x4", "v5e", "v5e:2x4"),
])
def test_topology_names(name, generation, topology):
  assert tpu_fit.topology_string(name) == (generation, topology)


@pytest.mark.parametrize("name", ["v9-8", "v5p-12", "v5e:2xq", "h100-8"])
def test_bad_topology_names_say_what_is_expected(name):
  with pytest.raises(tpu_fit.TopologyError, match="topology"):
    tpu_fit.topology_string(name)


def _small_config():
  config = config_lib.load(os.path.join(REPO, "configs", "tiny.py"))
  config.model.num_layers = 2
  config.train.global_batch_size = 4
  config.data.buckets = ((4, 16, 16),)
  config.data.text_len = 8
  return config


def test_train_step_compiles_for_a_tpu_topology_and_reports_memory():
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5e-4")
  assert topology == "v5e:2x2" and len(devices) == 4 and hbm_gib == 16.0
  report = tpu_fit.compile_train_step(_small_config(), devices, topology, hbm_gib)
  assert report.device_kind.startswith("TPU v5")
  assert report.mesh_shape == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
  assert report.latent_shape == (4, 8, 8, 12)
  # fp32 params + 2 Adam moments + 1 EMA tree, sharded 4 ways: at least a quarter of 4 copies.
  assert report.argument_gib * 2**30 >= report.param_count * 4 * 4 / 4
  assert 0 < report.total_gib < report.hbm_gib and report.fits
  assert "FITS" in tpu_fit.format_report(report)


def test_eval_sampler_compiles_with_every_weight_set_and_a_too_large_call_does_not_fit():
  config = _small_config()
  config.eval.num_frames, config.eval.height, config.eval.width = 5, 32, 32
  config.eval.sample_batch_size = 3  # rounded up to the 4 batch shards
  _, devices, hbm_gib = tpu_fit.topology_devices("v5e-4")
  report = tpu_fit.compile_eval_sampler(config, devices, hbm_gib)
  assert report.prompts_per_call == 4 and report.latent_shape == (5, 16, 16, 12)
  assert report.weight_sets == 1 + len(config.train.ema_decays)
  params = dit.count_params(dit.abstract_params(config.model))
  assert report.weight_set_gib * 2**30 == pytest.approx(params * 4 / 4, rel=0.05)  # fp32, sharded 4 ways
  assert report.fits and 0 < report.temp_gib < report.hbm_gib
  held = report.weight_set_gib * (report.weight_sets - 1)
  assert report.total_gib == pytest.approx(report.argument_gib + held + report.temp_gib + report.output_gib)
  assert "4 prompts per call" in tpu_fit.format_sampler_report(report)
  config.model.num_layers, config.diffusion.sample_steps = 1, 2
  config.eval.num_frames, config.eval.height, config.eval.width = 9, 512, 512
  config.model.attention_backend = "xla"  # 147k tokens a clip: the scores alone overflow HBM
  report = tpu_fit.compile_eval_sampler(config, devices, hbm_gib)
  assert not report.fits and "CompileTimeHbmOom" in report.oom
  assert "lower eval.sample_batch_size" in tpu_fit.format_sampler_report(report)


def test_mesh_that_does_not_divide_the_topology_is_refused_before_compiling():
  config = _small_config()
  config.mesh.ici = (1, 3, 1, 1)
  _, devices, hbm_gib = tpu_fit.topology_devices("v5e-4")
  with pytest.raises(config_lib.ConfigError, match="mesh.ici"):
    tpu_fit.compile_train_step(config, devices, "v5e:2x2", hbm_gib)


@pytest.mark.slow
def test_binary_exits_3_when_the_step_does_not_fit():
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.compile", f"--config={REPO}/configs/tiny.py",
       "--topology=v5e-4", "--hbm_gib=0.001", "--config.model.num_layers=1",
       "--config.train.global_batch_size=4"],
      capture_output=True, text=True, timeout=900, cwd=REPO)
  assert result.returncode == 3, result.stderr[-2000:]
  assert "DOES NOT FIT" in result.stdout


def test_a_compile_time_out_of_memory_is_a_report_not_an_error():
  config = _small_config()
  config.data.buckets = ((8, 256, 256),)  # 32,768 tokens per clip: the xla backend's scores overflow HBM
  config.model.num_layers = 1
  config.model.attention_backend = "xla"
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5e-4")
  report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  assert not report.fits and "CompileTimeHbmOom" in report.oom
  assert report.temp_gib > report.hbm_gib  # XLA's request, parsed from its message
  text = tpu_fit.format_report(report)
  assert "XLA asked for" in text and "DOES NOT FIT" in text
  # The analytic FLOPs: 4 clips' training FLOPs, and the time they take at v5e's peak on 4 chips.
  assert report.model_flops_per_step == pytest.approx(
      4 * flops.train_flops_per_example(config.model, (8, 128, 128, 12), config.data.text_len))
  assert report.step_time_lower_bound_s == pytest.approx(report.model_flops_per_step / (4 * 197e12))


def test_parse_oom_reads_the_request_and_the_limit():
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
             "required for HLO temporaries (84.23T) exceeds available HBM (94.75G).")
  what, need, have = tpu_fit.parse_oom(message)
  assert what == "HLO temporaries" and need == pytest.approx(84.23 * 1024) and have == pytest.approx(94.75)
  assert tpu_fit.parse_oom("INVALID_ARGUMENT: something else") is None


def test_remat_full_adds_one_forward_of_the_blocks():
  config = _small_config()
  config.model.remat_policy = "none"
  model_flops, hardware = tpu_fit.step_flops(config, (4, 8, 8, 12))
  assert hardware == model_flops
  config.model.remat_policy = "full"
  model_flops_full, hardware_full = tpu_fit.step_flops(config, (4, 8, 8, 12))
  blocks = flops.flops_breakdown(config.model, (4, 8, 8, 12), config.data.text_len)["blocks"]
  assert model_flops_full == model_flops and hardware_full == pytest.approx(model_flops + 4 * blocks)


def test_binary_reports_an_out_of_memory_quietly_and_exits_3():
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.compile", f"--config={REPO}/configs/tiny.py", "--topology=v5e-4",
       "--config.data.buckets=((8, 256, 256),)", "--config.model.num_layers=1",
       "--config.train.global_batch_size=4", "--config.model.attention_backend=xla"],
      capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
  assert result.returncode == 3, result.stderr[-2000:]
  assert "DOES NOT FIT" in result.stdout and "XLA asked for" in result.stdout
  # libtpu's TPU-VM discovery warnings are silenced on a host that is not a TPU VM.
  assert "E0000" not in result.stderr and "TPU_WORKER_HOSTNAMES" not in result.stderr
  assert "Traceback" not in result.stderr


def test_binary_checks_its_flags_before_compiling():
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.compile", f"--config={REPO}/configs/tiny.py", "--topology=v5e-4",
       "--num_slices=0"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 1
  assert result.stderr.strip() == ("sora_jax.compile: error: --num_slices=0; expected >= 1 slices of the "
                                   "topology")


def test_auto_attention_picks_splash_for_a_tpu_and_fits_where_xla_does_not():
  config = _small_config()
  config.data.buckets = ((8, 256, 256),)
  config.model.num_layers = 1
  assert config.model.attention_backend == "auto"  # the default
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5e-4")
  report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  assert report.fits and report.temp_gib < 4, tpu_fit.format_report(report)


def test_max_batch_search_doubles_then_bisects_and_suggests_accumulation(monkeypatch):
  compiled = []

  def fake_compile(config, devices, topology, hbm_gib):
    batch, accum = config.train.global_batch_size, config.train.grad_accum_steps
    compiled.append((batch, accum))
    micro = batch // accum
    return tpu_fit.CompileReport(topology=topology, num_devices=4, device_kind="TPU v5 lite", mesh_shape={},
                             latent_shape=(), param_count=0, argument_gib=1.0, temp_gib=micro * 1.0,
                             output_gib=0.0, alias_gib=0.0, hbm_gib=12.5, flops_per_device=None,
                             compile_s=0.0)

  monkeypatch.setattr(tpu_fit, "compile_train_step", fake_compile)
  config = _small_config()
  config.train.global_batch_size = 48
  _, devices, _ = tpu_fit.topology_devices("v5e-4")
  result = tpu_fit.max_batch(config, devices, "v5e:2x2", 16.0)
  # 1 GiB held + 1 GiB per clip within 12.5 GiB: 11 clips; multiples of the fsdp size 4: 8.
  assert result.divisor == 4 and result.batch == 8
  assert result.tried == {4: True, 8: True, 16: False, 12: False}
  assert result.grad_accum_steps == 6 and result.check.fits  # 48 = 6 x 8
  assert compiled[-1] == (48, 6)
  text = tpu_fit.format_max_batch(result, config.train)
  assert "max batch: 8 clips per step" in text and "--config.train.grad_accum_steps=6" in text


def test_binary_uses_the_config_target_topology_and_finds_the_max_batch():
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.compile", f"--config={REPO}/configs/tiny.py",
       "--config.mesh.target_topology=v5e-4", "--config.model.num_layers=1",
       "--config.train.global_batch_size=8", "--max_batch", "--eval"],
      capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "eval sampling: 64 prompts per call (eval.sample_batch_size) at 8x16x16" in result.stdout
  assert "topology v5e:2x2" in result.stdout and "FITS" in result.stdout
  assert "max batch: 8 clips per step fit (multiples of 4; 4 fits, 8 fits)" in result.stdout
  assert "--config.train.grad_accum_steps=1" in result.stdout
  missing = subprocess.run(
      [sys.executable, "-m", "sora_jax.compile", f"--config={REPO}/configs/tiny.py"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert missing.returncode == 1 and "--topology is required" in missing.stderr


def test_parse_oom_names_another_memory_space():
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space smem. "
             "Used 1.08M of 1.00M smem.")
  what, need, _ = tpu_fit.parse_oom(message)
  assert what == "smem" and need != need  # NaN: no HBM figure


@pytest.mark.slow
@pytest.mark.parametrize("name, topology", [("wan_1_3b", "v5p:2x4x4"), ("wan_14b", "v5p:4x4x4")])
def test_shipped_configs_fit_their_target_topology_out_of_the_box(name, topology):
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.compile", f"--config={REPO}/configs/{name}.py"],
      capture_output=True, text=True, timeout=1800, cwd=REPO, env=env)
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]
  assert f"topology {topology}" in result.stdout and "-> FITS" in result.stdout


@pytest.mark.slow
def test_wan_14b_at_720p_fits_a_v5p_8_at_eight_clips_per_step():
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  result = subprocess.run(
      [sys.executable, "-m", "sora_jax.compile", f"--config={REPO}/configs/wan_14b.py", "--topology=v5p-8",
       "--config.train.global_batch_size=8", "--config.train.grad_accum_steps=1"],
      capture_output=True, text=True, timeout=1800, cwd=REPO, env=env)
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]
  assert "batch latents (21, 90, 160, 16)" in result.stdout and "-> FITS" in result.stdout
  assert "opt_state (host)" in result.stdout and "of the TPU VM's" in result.stdout


@pytest.mark.slow
def test_offload_moves_every_block_input_of_the_14b_to_host_memory():
  """The 14B at 720p x 81 on a v5p-8, 4 clips per step (AdamW moments on the host, as shipped), compiled
  with remat_policy="offload" and "full": the offloaded step's device temporaries are lower by at least
  the stacked block inputs (one clip of 75,600 tokens x 5,120 per chip, 40 layers, in
  model.residual_dtype), and its host memory holds them. (Offloading pays under memory pressure only: on
  a step that fits anyway XLA copies each input straight back, which the small-config test below does
  not assert against.)"""
  config = config_lib.load(os.path.join(REPO, "configs", "wan_14b.py"))
  config.train.global_batch_size, config.train.grad_accum_steps = 4, 1
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5p-8")
  reports = {}
  for policy in ("offload", "full"):
    config.model.remat_policy = policy
    reports[policy] = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  offload, full = reports["offload"], reports["full"]
  t, h, w, _ = offload.latent_shape
  pt, ph, pw = config.model.patch_size
  clips_per_chip = config.train.global_batch_size // len(devices)
  block_inputs = (config.model.num_layers * clips_per_chip * (t // pt) * (h // ph) * (w // pw)
                  * config.model.dim * np.dtype(config.model.residual_dtype).itemsize / 2**30)
  assert offload.fits and not full.fits
  assert full.temp_gib - offload.temp_gib >= block_inputs
  host_state = sum(gib for name, gib in offload.state_gib.items() if name.endswith("(host)"))
  assert offload.host_gib - host_state == pytest.approx(block_inputs, rel=0.02)


@pytest.mark.slow
def test_lora_frozen_weights_in_host_memory_leave_the_14b_device_memory():
  config = config_lib.load(os.path.join(REPO, "configs", "wan_14b.py"))
  config.train.global_batch_size, config.train.grad_accum_steps = 4, 1
  config.train.update(lora_rank=64, init_from="/pretrained/Wan2.1-T2V-14B", lora_base_dtype="bfloat16")
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5p-8")
  on_device = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  config.train.host_state = ("opt_state", "frozen")
  on_host = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  frozen = on_host.state_gib["frozen (host)"]
  assert on_device.fits and on_host.fits and frozen > 6  # 14.3B bf16 weights over 4 chips
  assert on_device.argument_gib - on_host.argument_gib >= 0.95 * frozen
  assert on_host.host_gib - on_device.host_gib >= 0.95 * frozen


@pytest.mark.slow
@pytest.mark.parametrize("rule,kernel", [("window", "splash"), ("window_topk", "tile_splash")])
def test_sparse_attention_compiles_for_the_14b_with_fewer_flops(rule, kernel):
  config = config_lib.load(os.path.join(REPO, "configs", "wan_14b.py"))
  config.train.global_batch_size, config.train.grad_accum_steps = 4, 1
  config.model.update(sparse_attention_keep=0.25, sparse_attention_tile=(3, 16, 16),
                      sparse_attention_rule=rule)
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5p-8")
  report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  text = tpu_fit.format_report(report)
  assert report.fits, text
  assert (f"sparse self-attention ({rule}, on {kernel}): each query tile of (3, 16, 16) tokens attends "
          f"26 of 105") in text
  config.model.sparse_attention_keep = 1.0
  assert report.model_flops_per_step <= 0.55 * tpu_fit.step_flops(config, report.latent_shape)[0]


def test_offloaded_activations_and_host_state_show_in_the_report():
  config = _small_config()
  config.data.buckets = ((8, 64, 64),)
  config.model.remat_policy = "offload"
  config.train.host_state = ("opt_state", "ema")
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5e-4")
  report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  assert report.fits and report.host_capacity_gib == 64.0
  assert set(report.state_gib) == {"params", "opt_state (host)", "ema (host)", "batch"}
  # Each block's fp32 input, one clip per device, sits in host memory, besides the host-held state.
  t, h, w, _ = report.latent_shape
  pt, ph, pw = config.model.patch_size
  block_inputs = config.model.num_layers * (t // pt) * (h // ph) * (w // pw) * config.model.dim * 4 / 2**30
  host_state = report.state_gib["opt_state (host)"] + report.state_gib["ema (host)"]
  assert report.host_gib >= block_inputs + host_state
  # The host-held state has left the device's arguments.
  config.train.host_state = ()
  on_device = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  assert on_device.argument_gib - report.argument_gib >= 0.9 * host_state
  assert "host memory per device" in tpu_fit.format_report(report)
  # A host too small for what is offloaded does not fit.
  import dataclasses
  assert not dataclasses.replace(report, host_capacity_gib=report.host_gib / 2).fits


def test_a_packed_config_compiles_its_packed_step():
  config = _small_config()
  config.data.packing = True
  config.data.image_buckets = ((1, 16, 16),)
  clip_tokens = max(patches.bucket_tokens(config).values())
  config.data.token_budget = 2 * clip_tokens
  topology, devices, hbm_gib = tpu_fit.topology_devices("v5e-4")
  report = tpu_fit.compile_train_step(config, devices, topology, hbm_gib)
  assert report.fits and report.packed_tokens == 2 * clip_tokens
  assert f"packed into rows of {2 * clip_tokens:,} tokens" in tpu_fit.format_report(report)
  # Two of the largest clips per row: twice the bucketed step's FLOPs for the same number of rows.
  config.data.packing = False
  bucketed_flops, _ = tpu_fit.step_flops(config, report.latent_shape)
  assert report.model_flops_per_step == pytest.approx(2 * bucketed_flops)


def test_the_wan_configs_ship_a_token_budget_that_holds_their_clips():
  for name in ("wan_1_3b", "wan_14b"):
    config = config_lib.load(os.path.join(REPO, "configs", f"{name}.py"))
    config.data.packing = True
    config_lib.validate(config)  # data.token_budget >= the largest clip
    assert config.data.token_budget == max(patches.bucket_tokens(config).values())
