"""Every config file loads and validates; model sizes match diffusers; bad combinations fail clearly."""

import pathlib

import pytest

from sora_jax import config as config_lib
from sora_jax.export import diffusers as hf
from sora_jax.model import dit

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.name not in ("__init__.py", "base.py"))


def test_config_dir_is_not_empty():
  assert {"tiny.py", "demo.py", "wan_1_3b.py", "wan_14b.py"} <= {p.name for p in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_validates_and_builds_the_model(path):
  config = config_lib.load(str(path))
  config_lib.validate(config)
  # The model's parameter tree builds from shapes alone and agrees with the diffusers config round trip.
  params = dit.abstract_params(config.model)
  assert dit.count_params(params) > 0
  if config.model.abs_pos_embedding:  # configs/demo.py: trains and samples, but is no Wan model
    with pytest.raises(ValueError, match="abs_pos_embedding=True has no equivalent"):
      hf.model_config_to_diffusers(config.model)
    return
  again = hf.model_config_from_diffusers(hf.model_config_to_diffusers(config.model))
  for key, value in again.items():
    assert config.model[key] == value, (path.name, key)


def test_wan_1_3b_parameter_count_matches_diffusers():
  config = config_lib.load(str(CONFIG_DIR / "wan_1_3b.py"))
  # WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
  assert dit.count_params(dit.abstract_params(config.model)) == 1_418_996_800


def _base():
  return config_lib.load(str(CONFIG_DIR / "tiny.py"))


BAD = {
    "head_dim too small for RoPE": (lambda c: c.model.update(dim=16, num_heads=4), r"head_dim=4"),
    "odd head_dim": (lambda c: c.model.update(dim=28, num_heads=4), r"head_dim=7"),
    "dim not divisible by heads": (lambda c: c.model.update(dim=130), r"model.dim=130.*model.num_heads"),
    "latent not divisible by patch": (
        lambda c: c.model.update(patch_size=(3, 2, 2)), r"not divisible by model.patch_size"),
    "pixels not divisible by VAE": (
        lambda c: c.data.update(buckets=((8, 33, 32),)), r"data.vae_spatial_factor"),
    "grid beyond RoPE table": (lambda c: c.model.update(rope_max_seq_len=4), r"rope_max_seq_len"),
    "unknown attention backend": (
        lambda c: c.model.update(attention_backend="flash"), r"model.attention_backend='flash'"),
    "unknown remat policy": (lambda c: c.model.update(remat_policy="some"), r"model.remat_policy"),
    "unknown dtype": (lambda c: c.model.update(compute_dtype="fp8"), r"model.compute_dtype"),
    "heads vs tensor axis": (lambda c: c.mesh.update(ici=(1, -1, 1, 3)), r"num_heads=4.*tensor"),
    "pixel VAE channels": (lambda c: c.model.update(in_channels=16), r"model.in_channels=16"),
    "unknown prediction": (lambda c: c.model.update(prediction="eps"), r"model.prediction='eps'"),
    "unknown init optimizer": (
        lambda c: c.train.update(init_optimizer="keep"), r"train.init_optimizer='keep'"),
    "unknown init weights": (lambda c: c.train.update(init_weights="ema"), r"train.init_weights='ema'"),
    "x0 prediction with other output channels": (
        lambda c: c.model.update(prediction="x0", out_channels=6), r"in_channels == model.out_channels"),
    "x0 prediction with other timestep scale": (
        lambda c: (c.model.update(prediction="x0"), c.diffusion.update(num_train_timesteps=100)),
        r"num_train_timesteps=100 must be 1000"),
    "negative text position bias std": (
        lambda c: c.data.update(text_encoder_position_bias_std=-1.0),
        r"data.text_encoder_position_bias_std=-1.0 must be >= 0"),
    "unknown lr schedule": (lambda c: c.train.update(schedule="linear"), r"train.schedule='linear'"),
    "wsd without a cooldown": (
        lambda c: c.train.update(schedule="wsd", decay_fraction=0.0), r"train.decay_fraction=0.0"),
    "negative final shift": (lambda c: c.diffusion.update(final_shift=-1.0), r"diffusion.final_shift=-1.0"),
    "final shift over no steps": (
        lambda c: c.diffusion.update(final_shift=1.0, final_shift_fraction=0.0),
        r"diffusion.final_shift_fraction=0.0 must lie in \(0, 1\]"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_combination_gives_one_clear_error(name):
  mutate, message = BAD[name]
  config = _base()
  mutate(config)
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    config_lib.validate(config)
  # One line naming the input, not a traceback of nested causes.
  assert "\n" not in str(error.value)
  assert error.value.__cause__ is None
