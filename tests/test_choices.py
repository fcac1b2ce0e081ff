"""The allowed values of sora_jax/choices.py are what the dispatching code handles, no more, no less."""

import jax
import numpy as np
import pytest
from sora_jax.configs import base

from sora_jax import choices
from sora_jax import config as config_lib
from sora_jax.data import schema
from sora_jax.diffusion import flow, samplers
from sora_jax.model import dit, layers
from sora_jax.train import optimizer


def test_dtypes_and_remat_policies_resolve_exactly_the_declared_names():
  assert all(layers.dtype_of(name) is not None for name in choices.DTYPES)
  for name in choices.REMAT_POLICIES:
    dit.remat_policy(name)
  with pytest.raises(ValueError, match="expected one of"):
    dit.remat_policy("some")
  with pytest.raises(ValueError, match="expected one of"):
    layers.dtype_of("float64")


def test_samplers_sigma_samplings_and_schedules_run_for_each_declared_name():
  for name in choices.SAMPLERS:
    assert samplers.sigma_schedule(name, 4, 3.0).shape == (5,)
  config = base.get_config()
  for name in choices.SIGMA_SAMPLINGS:
    config.diffusion.sigma_sampling = name
    sigma = flow.sample_sigma(jax.random.key(0), (64,), config.diffusion)
    assert np.all((np.asarray(sigma) >= 0) & (np.asarray(sigma) <= 1))
  for name in choices.SCHEDULES:
    config.train.schedule = name
    assert np.isfinite(float(optimizer.learning_rate_schedule(config.train)(10)))
  config.train.schedule = "linear"
  with pytest.raises(ValueError, match="train.schedule='linear'"):
    optimizer.learning_rate_schedule(config.train)


def test_record_dtypes_encode_and_config_refuses_other_names():
  for name in choices.RECORD_DTYPES:
    assert schema.array_dtype(name).itemsize == schema.storage_dtype(name).itemsize == 2
  with pytest.raises(schema.DatasetError, match="expected one of"):
    schema.storage_dtype("float32")
  config = base.get_config()
  config.data.record_dtype = "float32"
  with pytest.raises(config_lib.ConfigError, match=r"data.record_dtype='float32'; expected one of"):
    config_lib.validate(config)
