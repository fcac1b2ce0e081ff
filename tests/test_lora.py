"""LoRA: adapters on the targeted projections only, merged weights equal the adapted model, and a LoRA
run that trains adapters alone on a frozen base, checkpoints only them, resumes, and is read merged."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sora_jax.configs import tiny

from sora_jax import config as config_lib
from sora_jax.model import dit, lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = lora.LoraSpec(4, 8.0, (r"attn[12]/to_(q|k|v|out)$", r"ffn/proj_(in|out)$"))


def _inputs(model):
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.normal(size=(2, 4, 8, 8, model.in_channels)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 3, model.text_dim)), jnp.float32)
  return latents, jnp.asarray([100.0, 700.0]), text


@pytest.mark.parametrize("scan_layers", [True, False])
def test_adapters_sit_on_the_targets_start_at_zero_and_merge_exactly(scan_layers):
  model = tiny.get_config().model
  model.scan_layers = scan_layers
  inputs = _inputs(model)
  adapted = dit.DiT(model, lora=SPEC)
  params = nn.meta.unbox(adapted.init(jax.random.PRNGKey(0), *inputs)["params"])
  frozen, adapters = lora.split(params)
  paths = {lora.path_name(tuple(k.key for k in path[:-1]))
           for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
  assert paths == {f"blocks/{m}" for m in ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out",
                                              "attn2/to_q", "attn2/to_k", "attn2/to_v", "attn2/to_out",
                                              "ffn/proj_in", "ffn/proj_out")}
  assert jax.tree.structure(frozen) == jax.tree.structure(
      nn.meta.unbox(dit.DiT(model).init(jax.random.PRNGKey(0), *inputs)["params"]))
  # The zero-initialised output layer would hide every difference: give every weight a value.
  frozen = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), frozen)
  base_out = dit.DiT(model).apply({"params": frozen}, *inputs)
  start = adapted.apply({"params": lora.combine(frozen, adapters)}, *inputs)
  np.testing.assert_array_equal(start, base_out)  # B = 0: a fresh adapter changes nothing
  trained = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), adapters)
  out = adapted.apply({"params": lora.combine(frozen, trained)}, *inputs)
  merged = lora.merge(lora.combine(frozen, trained), SPEC.scale)
  np.testing.assert_allclose(dit.DiT(model).apply({"params": merged}, *inputs), out, atol=2e-5)
  assert float(jnp.max(jnp.abs(out - base_out))) > 1e-2


@pytest.mark.parametrize("fields, message", [
    ({"lora_rank": 4}, "trains adapters on frozen weights; set train.init_from"),
    ({"lora_rank": -1}, "train.lora_rank=-1"),
    ({"lora_rank": 4, "init_from": "/w", "lora_targets": ("(",)}, r"entry '\(' is not a regex"),
    ({"lora_rank": 4, "init_from": "/w", "lora_targets": ()}, "train.lora_targets is empty"),
    ({"lora_rank": 4, "init_from": "/w", "init_optimizer": "carry"}, "adapters start fresh"),
    ({"lora_rank": 4, "init_from": "/w", "lora_base_dtype": "float16"}, "train.lora_base_dtype='float16'"),
])
def test_bad_lora_settings_are_one_config_error(fields, message):
  config = tiny.get_config()
  config.train.update(fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def _leaf_names(tree):
  return {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_a_lora_run_trains_only_adapters_checkpoints_them_resumes_and_reads_merged(
    tmp_path, tiny_train_config, tiny_train_dataset):
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import checkpoint as checkpoint_lib
  from sora_jax.train import loop
  from sora_jax.train import run_weights as weights_lib

  config = tiny_train_config
  config.data.dir = tiny_train_dataset
  config.train.num_steps = 2
  base_dir = str(tmp_path / "base")
  loop.train(config, base_dir)

  lora_config = config_lib.from_json(config.to_dict())
  lora_config.train.update(init_from=f"{base_dir}@2", lora_rank=4, lora_alpha=4.0, num_steps=4,
                           learning_rate=1e-2, lora_base_dtype="bfloat16")
  workdir = str(tmp_path / "lora")
  result = loop.train(lora_config, workdir)
  assert result["step"] == 4

  tree = checkpoint_lib.saved_state_tree(workdir, 4)
  names = _leaf_names(tree["params"])
  assert names and all(name[-1] in lora.ADAPTERS for name in names)  # no frozen weight is saved
  assert all(name[-1] in lora.ADAPTERS for name in _leaf_names(tree["ema"]))
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 4 and all(np.isfinite(losses))

  # Read as the plain DiT: targeted kernels moved, everything else is the base run's step 2 as the
  # run saw it (rounded to train.lora_base_dtype), exactly.
  mesh = mesh_lib.create_mesh(lora_config)
  base = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32),
                      weights_lib.restore_weights(base_dir, 2, config, mesh, ["raw"])["raw"])
  # What the run read as its frozen weights: cast to bf16 as the files are read, rounded the same.
  read_as_bf16 = weights_lib.restore_weights(base_dir, 2, config, mesh, ["raw"], "bfloat16")["raw"]
  assert {leaf.dtype for leaf in jax.tree.leaves(read_as_bf16)} == {jnp.dtype(jnp.bfloat16)}
  for ours, want in zip(jax.tree.leaves(read_as_bf16), jax.tree.leaves(base), strict=True):
    np.testing.assert_array_equal(np.asarray(ours).astype(np.float32), want)
  merged = weights_lib.restore_weights(workdir, 4, lora_config, mesh)
  assert set(merged) == {"raw", "ema_0.9", "ema_0.99"}
  flat_base = dict(jax.tree_util.tree_flatten_with_path(base)[0])
  moved = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(merged["raw"])[0]:
    if not np.array_equal(np.asarray(leaf), np.asarray(flat_base[path])):
      moved.add(lora.path_name(tuple(k.key for k in path[:-1])))
  assert moved == {f"blocks/{m}" for m in ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out",
                                              "attn2/to_q", "attn2/to_k", "attn2/to_v", "attn2/to_out",
                                              "ffn/proj_in", "ffn/proj_out")}

  # export --format=lora writes the adapters; folded into the base they give the merged weights.
  from sora_jax.export import peft_lora

  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "sora_jax.export", f"--workdir={workdir}", "--format=lora",
                         f"--out={tmp_path / 'peft'}"], capture_output=True, text=True, env=env, cwd=REPO)
  assert done.returncode == 0, done.stderr
  assert "exported the adapters of step 4 (raw)" in done.stdout and "20 adapted layers" in done.stdout
  folded = peft_lora.merge_file(base, str(tmp_path / "peft" / peft_lora.WEIGHTS_FILE),
                                lora_config.model)
  for (path, ours), theirs in zip(jax.tree_util.tree_flatten_with_path(folded)[0],
                                  jax.tree.leaves(merged["raw"]), strict=True):
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-6, err_msg=jax.tree_util.keystr(path))
  refused = subprocess.run([sys.executable, "-m", "sora_jax.export", f"--workdir={base_dir}", "--format=lora",
                            f"--out={tmp_path / 'none'}"], capture_output=True, text=True, env=env, cwd=REPO)
  assert refused.returncode != 0 and "trained the whole DiT (train.lora_rank=0)" in refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1

  # eval --config passes the config file's unpinned origin: the step's own saved one is used.
  unpinned = config_lib.from_json(lora_config.to_dict())
  unpinned.train.init_from = base_dir
  again_merged = weights_lib.restore_weights(workdir, 4, unpinned, mesh, ["raw"])["raw"]
  for ours, theirs in zip(jax.tree.leaves(again_merged), jax.tree.leaves(merged["raw"]), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

  # Resumed to step 6, the run continues from its adapters (the frozen weights read again).
  lora_config.train.num_steps = 6
  again = loop.train(lora_config, workdir)
  assert again["step"] == 6 and checkpoint_lib.Checkpointer(workdir, lora_config).all_steps()[-1] == 6


@pytest.mark.torch
def test_the_exported_lora_loads_into_wan_pipeline_and_matches(tmp_path):
  """export --format=lora's file, loaded by diffusers' WanPipeline.load_lora_weights (through PEFT),
  gives the transformer sora_jax computes with the same adapters."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pytest.importorskip("peft")
  from pipeline_helpers import make_pipeline

  from sora_jax.export import diffusers as hf
  from sora_jax.export import peft_lora
  from sora_jax.files import safetensors_io

  root = make_pipeline(str(tmp_path / "pipe"), ["a red circle", "a blue square"], text_dim=16)
  transformer = diffusers.WanTransformer3DModel.from_pretrained(os.path.join(root, "transformer")).eval()
  # load_lora_weights reads and changes the transformer only.
  pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                               transformer=transformer)
  model = hf.model_config(hf.model_config_from_diffusers(dict(transformer.config)), compute_dtype="float32")
  state_dict = {k: v.detach().numpy() for k, v in transformer.state_dict().items()}
  frozen = hf.params_from_diffusers(state_dict, model)
  spec = lora.LoraSpec(3, 6.0, (r"attn[12]/to_(q|k|v|out)$", r"ffn/proj_(in|out)$"))
  inputs = _inputs(model)
  adapted = dit.DiT(model, lora=spec)
  adapters = lora.split(nn.meta.unbox(jax.eval_shape(
      lambda: adapted.init(jax.random.PRNGKey(0), *inputs)["params"])))[1]
  rng = np.random.default_rng(5)
  adapters = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), adapters)

  tensors = peft_lora.state_dict(adapters, model, spec.scale)
  assert peft_lora.adapter_count(tensors) == 2 * 10  # 2 blocks x (4 + 4 attention, 2 FFN) projections
  out = tmp_path / "lora"
  out.mkdir()
  specs = [safetensors_io.TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()]
  safetensors_io.write_file(str(out / peft_lora.WEIGHTS_FILE), specs, tensors.__getitem__)
  pipe.load_lora_weights(str(out))

  ours = adapted.apply({"params": lora.combine(frozen, adapters)}, *inputs)
  latents, timesteps, text = (np.asarray(x) for x in inputs)
  with torch.no_grad():
    theirs = transformer(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                         torch.from_numpy(text), return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
  plain = dit.DiT(model).apply({"params": frozen}, *inputs)
  assert float(np.max(np.abs(np.asarray(plain) - theirs))) > 1e-2  # the adapters are in effect
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * float(np.max(np.abs(theirs))))
  # `sample --lora` folds the same file into the plain weights.
  merged = peft_lora.merge_file(frozen, str(out / peft_lora.WEIGHTS_FILE), model)
  np.testing.assert_allclose(np.asarray(dit.DiT(model).apply({"params": merged}, *inputs)), theirs,
                             atol=1e-4 * float(np.max(np.abs(theirs))))


def test_sample_refuses_a_missing_lora_file_in_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "sora_jax.sample", f"--pretrained={tmp_path}", "--prompt=a cat",
             f"--lora={tmp_path / 'none.safetensors'}"]
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
  assert done.returncode != 0
  assert "--lora" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_targets_that_match_nothing_fail_before_training(tiny_train_config):
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import step as step_lib

  config = tiny_train_config
  config.train.update(lora_rank=4, init_from="/weights", lora_targets=("attn3/to_q$",))
  with pytest.raises(ValueError, match=r"match no projection of the DiT"):
    step_lib.build(config, mesh_lib.create_mesh(config))


def test_lora_flops_leave_out_the_weight_gradients():
  from sora_jax.model import flops

  model = tiny.get_config().model
  parts = flops.flops_breakdown(model, (4, 8, 8), 8)
  full = flops.train_flops_per_example(model, (4, 8, 8), 8)
  frozen = flops.train_flops_per_example(model, (4, 8, 8), 8, frozen_weights=True)
  matmuls = parts["embed"] + parts["blocks"] + parts["head"] - parts["attention"]
  assert full - frozen == pytest.approx(matmuls)  # one weight-gradient product per matmul fewer


def test_frozen_weights_in_host_memory_train_the_same(tiny_train_config):
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.parallel import sharding as sharding_lib
  from sora_jax.train import state as state_lib
  from sora_jax.train import step as step_lib

  config = tiny_train_config
  config.mesh.ici = (1, 4, 1, 1)
  config.model.remat_policy = "full"
  config.train.update(init_from="/frozen", lora_rank=4, learning_rate=1e-2)
  from sora_jax import patches

  latent = patches.latent_shape(config, config.data.buckets[0])
  text = (config.data.text_len, config.model.text_dim)
  rng = np.random.default_rng(0)
  batches = [{"latents": rng.standard_normal((4, *latent)).astype(np.float32),
              "text_embeds": rng.standard_normal((4, *text)).astype(np.float32)} for _ in range(3)]
  weights = dit.init_params(config.model, jax.random.PRNGKey(1), latent, text[0])
  weights = jax.tree.map(lambda x: x + 0.05, weights)  # no zero-initialised head

  def run(host_state):
    config.train.host_state = host_state
    config_lib.validate(config, 4)
    mesh = mesh_lib.create_mesh(config, jax.devices()[:4])
    trainable = step_lib.build(config, mesh)
    state = trainable.setup.init(jax.random.PRNGKey(0))
    frozen = state_lib.place_frozen(weights, trainable.frozen)
    losses = []
    with sharding_lib.mesh_context(mesh, trainable.rules):
      for batch in batches:
        state, metrics = trainable.train_step(state, jax.device_put(batch, trainable.batch_sharding), frozen)
        losses.append(float(metrics["loss"]))
    kinds = {path[-1].key: leaf.sharding.memory_kind for path, leaf in
             jax.tree_util.tree_flatten_with_path(frozen)[0]}
    return losses, jax.device_get(state.params), kinds

  on_device, params_device, device_kinds = run(())
  on_host, params_host, host_kinds = run(("frozen",))
  assert set(device_kinds.values()) == {"device"}
  assert host_kinds["kernel"] == "pinned_host" and host_kinds["scale_shift_table"] == "device"
  np.testing.assert_allclose(on_host, on_device, rtol=1e-6)
  assert on_host[0] != on_host[-1]  # the adapters trained
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params_host, params_device)
  config.model.remat_policy = "none"
  with pytest.raises(config_lib.ConfigError, match="remat_policy='none' keeps every layer's copy"):
    config_lib.validate(config, 4)
