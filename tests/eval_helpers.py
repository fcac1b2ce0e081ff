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
  config.model.patch_size = (1, 2, 2)  # the tests' small latents; independent of the demo's patch
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
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import checkpoint as checkpoint_lib
  from sora_jax.train import step as step_lib

  mesh = mesh_lib.create_mesh(config)
  setup = step_lib.build(config, mesh).setup
  state = setup.init(jax.random.PRNGKey(0))
  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  for step in steps:
    params = jax.device_put(random_like(state.params, seed=step), setup.shardings.params)
    ema = {key: jax.device_put(random_like(tree, seed=step + 1000, scale=0.1), setup.shardings.params)
           for key, tree in state.ema.items()}
    checkpointer.save(step, state.replace(step=jnp.asarray(step, jnp.int32), params=params, ema=ema))
  checkpointer.close()


def eval_config() -> ml_collections.ConfigDict:
  """small_config with 4-frame 8x8 clips and a short eval (8 examples, 4 sigmas, 3 sampler steps)."""
  config = small_config()
  config.data.buckets = ((4, 8, 8),)
  config.data.image_buckets = ((1, 8, 8),)
  config.data.read_threads = 1
  config.data.prefetch_buffer = 1
  config.eval.num_examples = 8
  config.eval.batch_size = 8
  config.eval.sigma_grid = 4
  config.eval.num_frames = 4
  config.eval.height = 8
  config.eval.width = 8
  config.eval.prompts = ("a red circle moves left on a blue background",)
  config.eval.adherence_prompts = 2
  config.diffusion.sample_steps = 3
  config.diffusion.guidance_scale = 2.0
  return config


def make_dataset(out_dir: str, config: ml_collections.ConfigDict, num_train: int = 8,
                 num_eval: int = 12) -> None:
  """A prepared dataset of random latents for `config` (4x4x4x12), with a trained tokenizer.

  Sets config.data.dir and config.data.tokenizer to what it wrote.
  """
  import os

  from sora_jax.data import schema
  from sora_jax.encoders import tokenizer as tokenizer_lib
  from sora_jax.offline import synthetic, tfds_builder

  text_len, text_dim = config.data.text_len, config.model.text_dim
  captions = [synthetic.caption_for(c, s, d, b) for c, b in synthetic.valid_pairs()
              for s in synthetic.SHAPES for d in synthetic.DIRECTIONS]
  tokenizer = tokenizer_lib.train(captions, vocab_size=config.data.vocab_size)
  tokenizer_path = os.path.join(out_dir, "tokenizer.model")
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(tokenizer_path)

  def expand(index):
    rng = np.random.default_rng(index)
    text_embeds = np.zeros((text_len, text_dim), np.float32)
    text_embeds[:5] = rng.normal(size=(5, text_dim))
    record = dict(
        latents=rng.normal(size=(4, 4, 4, 12)).astype(np.float32), text_embeds=text_embeds,
        text_len=5, caption=captions[index % len(captions)], source=f"v{index}.mp4", clip_start_s=0.0,
        fps=8.0, num_frames=4, height=8, width=8, is_image=False)
    yield f"clip-{index}", schema.encode(record, config.data.record_dtype)

  data_dir = os.path.join(out_dir, "dataset")
  tfds_builder.write_dataset(
      data_dir, latent_channels=12, text_dim=text_dim, record_dtype=config.data.record_dtype,
      splits={"train": (list(range(num_train)), expand),
              "validation": (list(range(1000, 1000 + num_eval)), expand)},
      metadata={"schema_version": schema.SCHEMA_VERSION}, num_shards=1)
  config.data.dir = data_dir
  config.data.tokenizer = tokenizer_path
