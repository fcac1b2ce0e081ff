"""Parity of the sora_jax DiT with diffusers' WanTransformer3DModel on random weights, in fp32.

Also checks the weight conversion both ways and loading a `save_pretrained` directory.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sora_jax.export import diffusers as hf  # noqa: E402
from sora_jax.model import dit  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(1)

# diffusers kwargs, latent (T, H, W), text length, batch, per-token timesteps
CASES = {
    "tiny": (dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                  out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2,
                  rope_max_seq_len=32), (2, 4, 4), 8, 1, False),
    # odd frame count, non-square latent, 3 heads, text length 7, 3 clips at different timesteps,
    # out_channels != in_channels
    "odd": (dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=20, in_channels=5,
                 out_channels=3, text_dim=40, freq_dim=64, ffn_dim=96, num_layers=3,
                 rope_max_seq_len=16), (3, 6, 10), 7, 3, False),
    # patch (2, 1, 2), 5 heads of 14 channels, no cross-attention norm, per-token (Wan2.2) timesteps
    "per_token": (dict(patch_size=(2, 1, 2), num_attention_heads=5, attention_head_dim=14, in_channels=3,
                       out_channels=3, text_dim=16, freq_dim=256, ffn_dim=48, num_layers=2,
                       cross_attn_norm=False, rope_max_seq_len=64), (6, 3, 8), 5, 2, True),
    # Wan2.2 TI2V-5B's shape at hidden size: 48 latent channels (the Wan2.2 VAE), head_dim 128 as the
    # 5B's, per-token timesteps (diffusers' expand_timesteps: the given first frame at timestep 0)
    "wan2_2_ti2v": (dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=48,
                         out_channels=48, text_dim=32, freq_dim=256, ffn_dim=112, num_layers=2,
                         rope_max_seq_len=1024), (3, 4, 6), 6, 2, True),
}


def _torch_model(kwargs, seed=0):
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**kwargs).eval()
  # Perturb every tensor (norm scales, modulation tables, biases) so none sits at its trivial init.
  with torch.no_grad():
    for tensor in model.state_dict().values():
      scale = tensor.std() if tensor.numel() > 1 and tensor.std() > 0 else torch.tensor(1.0)
      tensor.add_(0.2 * scale * torch.randn_like(tensor))
  return model


def _inputs(kwargs, latent_thw, text_len, batch, per_token, seed=1):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, *latent_thw, kwargs["in_channels"])).astype(np.float32)
  tokens = int(np.prod([s // p for s, p in zip(latent_thw, kwargs["patch_size"], strict=True)]))
  shape = (batch, tokens) if per_token else (batch,)
  timesteps = rng.uniform(0, 1000, shape).astype(np.float32)
  text = rng.standard_normal((batch, text_len, kwargs["text_dim"])).astype(np.float32)
  return latents, timesteps, text


def _torch_forward(model, latents, timesteps, text):
  with torch.no_grad():
    out = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                torch.from_numpy(text), return_dict=False)[0]
  return out.permute(0, 2, 3, 4, 1).numpy()


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _perturbed(params, scale, seed):
  """Parameters plus seeded noise (numpy: eager jax ops would compile once per leaf shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape).astype(np.float32), params)


def _assert_close(ours, theirs):
  assert ours.shape == theirs.shape
  error = np.max(np.abs(np.asarray(ours) - theirs))
  # DESIGN.md holds us to 1e-5 max relative error (the issue asks 1e-4); we measure ~1e-6.
  assert error <= 1e-5 * np.max(np.abs(theirs)), (error, np.max(np.abs(theirs)))
  return error


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_matches_diffusers(case, scan_layers):
  kwargs, latent_thw, text_len, batch, per_token = CASES[case]
  torch_model = _torch_model(kwargs)
  model = hf.model_config(hf.model_config_from_diffusers(dict(torch_model.config)),
                          compute_dtype="float32", scan_layers=scan_layers)
  params = hf.params_from_diffusers(_state_dict(torch_model), model)
  inputs = _inputs(kwargs, latent_thw, text_len, batch, per_token)
  ours = jax.jit(dit.DiT(model).apply)({"params": params}, *map(jnp.asarray, inputs))
  theirs = _torch_forward(torch_model, *inputs)
  assert ours.dtype == jnp.float32
  _assert_close(ours, theirs)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_bit_exact(scan_layers):
  kwargs = CASES["odd"][0]
  model = hf.model_config(hf.model_config_from_diffusers(kwargs), scan_layers=scan_layers)
  params = dit.init_params(model, jax.random.key(3), (1, 2, 2, kwargs["in_channels"]), 4)
  params = _perturbed(params, 1.0, seed=3)
  state_dict = hf.params_to_diffusers(params, model)
  # diffusers accepts the state dict as its own: same names, same shapes, nothing missing.
  torch_model = diffusers.WanTransformer3DModel(**kwargs)
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  back = hf.params_from_diffusers(state_dict, model)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for ours, restored in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back),
                            strict=True):
    np.testing.assert_array_equal(np.asarray(ours), restored)


def test_load_transformer_from_sharded_save_pretrained(tmp_path):
  kwargs, latent_thw, text_len, batch, per_token = CASES["odd"]
  torch_model = _torch_model(kwargs, seed=5)
  torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
  assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
  model = hf.load_transformer(str(tmp_path))
  assert model.config.num_heads == 3 and model.config.out_channels == 3
  inputs = _inputs(kwargs, latent_thw, text_len, batch, per_token, seed=6)
  _assert_close(model(*inputs), _torch_forward(torch_model, *inputs))
  np.testing.assert_array_equal(
      np.asarray(model.params["proj_out"]["kernel"]), _state_dict(torch_model)["proj_out.weight"].T)


def test_save_transformer_loads_in_diffusers(tmp_path):
  kwargs, latent_thw, text_len, batch, per_token = CASES["tiny"]
  model = hf.model_config(hf.model_config_from_diffusers(kwargs), compute_dtype="float32")
  params = dit.init_params(model, jax.random.key(0), (1, 2, 2, kwargs["in_channels"]), 4)
  params = _perturbed(params, 0.1, seed=7)
  files = hf.save_transformer(params, model, str(tmp_path), max_shard_bytes=30_000)
  assert any(name.endswith(".index.json") for name in files)
  torch_model = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path)).eval()
  inputs = _inputs(kwargs, latent_thw, text_len, 2, per_token, seed=2)
  ours = jax.jit(dit.DiT(model).apply)({"params": params}, *map(jnp.asarray, inputs))
  _assert_close(ours, _torch_forward(torch_model, *inputs))


def test_config_round_trip_and_rejections():
  model = hf.model_config(hf.model_config_from_diffusers(CASES["odd"][0]))
  again = hf.model_config_from_diffusers(hf.model_config_to_diffusers(model))
  for key, value in again.items():
    assert model[key] == value, key
  with pytest.raises(ValueError, match="image_dim"):
    hf.model_config_from_diffusers({"image_dim": 1280})
  with pytest.raises(ValueError, match="qk_norm"):
    hf.model_config_to_diffusers(hf.model_config(qk_norm=False))
  with pytest.raises(ValueError, match="abs_pos_embedding"):
    hf.model_config_to_diffusers(hf.model_config(abs_pos_embedding=True))
  with pytest.raises(ValueError, match="prediction='x0'"):
    hf.model_config_to_diffusers(hf.model_config(prediction="x0"))
  with pytest.raises(ValueError, match="lacks tensor"):
    state_dict = hf.params_to_diffusers(
        dit.init_params(model, jax.random.key(0), (1, 2, 2, 5), 4), model)
    del state_dict["proj_out.bias"]
    hf.params_from_diffusers(state_dict, model)


@pytest.mark.parametrize("name", ["wan_1_3b", "wan_14b", "wan2_2_ti2v_5b"])
def test_parameter_count_and_names_match_diffusers_at_full_size(name):
  from sora_jax import config as config_lib

  model = config_lib.load(f"configs/{name}.py").model
  with torch.device("meta"):  # shapes only: no memory for 14B parameters
    torch_model = diffusers.WanTransformer3DModel(**{
        k: v for k, v in hf.model_config_to_diffusers(model).items() if not k.startswith("_")})
  torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  assert sum(int(np.prod(s)) for s in torch_shapes.values()) == dit.count_params(dit.abstract_params(model))
  assert {e.name: e.torch_shape for e in hf.tensor_entries(model)} == torch_shapes
