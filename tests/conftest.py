"""Test set-up: 8 fake CPU devices for every test process (set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ---------------------------------------------------------------- trainer: tiny DiT config + dataset
# A shrunk configs/tiny.py (2 layers of width 32 on 4x4x4x12 latents) and a 32-clip prepared dataset
# written with the TFDS builder, shared by tests/test_train*.py, test_checkpoint*.py, test_mesh*.py.

import pytest  # noqa: E402


def _tiny_train_config():
  from sora_jax.configs import tiny

  config = tiny.get_config()
  config.model.dim = 32
  config.model.num_heads = 2
  config.model.ffn_dim = 64
  config.model.num_layers = 2
  config.model.text_dim = 16
  config.model.patch_size = (1, 2, 2)  # 4x4 latents -> 2x2 patch grid per frame
  config.data.buckets = ((4, 8, 8),)
  config.data.image_buckets = ((1, 8, 8),)
  config.data.text_len = 8
  config.data.read_threads = 1
  config.data.prefetch_buffer = 1
  config.train.num_steps = 4
  config.train.global_batch_size = 8
  config.train.warmup_steps = 2
  config.train.log_every = 1
  config.train.ema_decays = (0.9, 0.99)
  config.checkpoint.every_steps = 2
  config.train.fast_compile = True
  config.train.schedule = "constant"  # runs of different num_steps share one lr trajectory
  config.checkpoint.async_save = False
  return config


@pytest.fixture
def tiny_train_config():
  """A fresh, unlocked tiny trainer config (tests mutate it freely)."""
  return _tiny_train_config()


def write_tiny_train_dataset(out_dir: str, num_train: int = 32, marked: bool = False,
                             overflowing=(), record_dtype: str | None = None) -> str:
  """Writes a prepared dataset matching `tiny_train_config` (train and validation splits) to `out_dir`.

  With `marked`, train record i carries its index in text_embeds[0, 0], so a batch names its clips. The
  records in `overflowing` have finite latents of 1e30, whose squared error overflows float32: the
  loss and gradients of any batch holding one are non-finite, though the data passes validation
  (it needs record_dtype="bfloat16": float16 cannot hold 1e30).
  """
  import numpy as np

  from sora_jax.data import schema
  from sora_jax.offline import tfds_builder

  config = _tiny_train_config()
  text_len, text_dim = config.data.text_len, config.model.text_dim
  record_dtype = record_dtype or config.data.record_dtype
  overflowing = set(overflowing)

  def expand(index):
    rng = np.random.default_rng(index)
    frames = 4
    text_embeds = np.zeros((text_len, text_dim), np.float32)
    text_embeds[:5] = rng.normal(size=(5, text_dim))
    if marked:
      text_embeds[0, 0] = index
    latents = rng.normal(size=(frames, 4, 4, 12)).astype(np.float32)
    if index in overflowing:
      latents[:] = 1e30
    record = dict(
        latents=latents, text_embeds=text_embeds,
        text_len=5, caption=f"clip {index}", source=f"v{index}.mp4", clip_start_s=0.0, fps=8.0,
        num_frames=frames, height=8, width=8, is_image=False)
    yield f"clip-{index}", schema.encode(record, record_dtype)

  tfds_builder.write_dataset(
      out_dir, latent_channels=12, text_dim=text_dim, record_dtype=record_dtype,
      splits={"train": (list(range(num_train)), expand), "validation": (list(range(100, 108)), expand)},
      metadata={"schema_version": schema.SCHEMA_VERSION}, num_shards=1)
  return out_dir


@pytest.fixture(scope="session")
def tiny_train_dataset(tmp_path_factory) -> str:
  """Data dir of a prepared dataset matching `tiny_train_config` (train and validation splits)."""
  return write_tiny_train_dataset(str(tmp_path_factory.mktemp("tiny_train_dataset")))
