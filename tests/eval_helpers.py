"""Shared set-up of the eval / sample / export tests: a small config and a workdir with checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from sora_jax.configs import tiny


def small_config() -> ml_collections.ConfigDict:
  """The tiny demo config shrunk further (2 layers, width 48) so tests compile in seconds."""
  config = tiny.get_config()
  config.model.dim = 48
  config.model.num_heads = 2
  config.model.ffn_dim = 96
  config.model.num_layers = 2
  config.model.text_dim = 16
  config.model.compute_dtype = "float32"
  config.data.text_len = 8
  config.train.ema_decays = (0.9,)
  config.checkpoint.async_save = False
  return config


def random_like(tree, seed: int, scale: float = 0.2):
  """Random normal numpy leaves shaped like `tree`: makes every weight matter (the head starts at zero)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype), tree)


def make_workdir(workdir: str, config: ml_collections.ConfigDict, steps=(10,)) -> None:
  """Saves a train state with random raw and EMA weights at each of `steps` (different per step)."""
  from sora_jax.model.dit import DiT
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.parallel import sharding as sharding_lib
  from sora_jax.train import checkpoint as checkpoint_lib
  from sora_jax.train import optimizer as optimizer_lib
  from sora_jax.train import state as state_lib

  model = DiT(config.model)
  mesh = mesh_lib.create_mesh(config)
  rules = sharding_lib.logical_rules(config)
  optimizer = optimizer_lib.make_optimizer(config, state_lib.abstract_params(model, config))
  setup = state_lib.setup_state(model, config, optimizer, mesh, rules)
  state = setup.init(jax.random.PRNGKey(0))
  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  for step in steps:
    params = jax.device_put(random_like(state.params, seed=step), setup.shardings.params)
    ema = {key: jax.device_put(random_like(tree, seed=step + 1000, scale=0.1), setup.shardings.params)
           for key, tree in state.ema.items()}
    checkpointer.save(step, state.replace(step=jnp.asarray(step, jnp.int32), params=params, ema=ema))
  checkpointer.close()
