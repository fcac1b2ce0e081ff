"""Tiny CPU config: the demo's ~3M-parameter DiT on synthetic moving shapes (`make demo`).

  python -m sora_jax.train --config=configs/tiny.py --workdir=/tmp/sora_tiny \
      --config.data.dir=/tmp/sora_demo/dataset
"""

from sora_jax.configs import base


def get_config():
  config = base.get_config()

  # 16x16-pixel clips -> 8x8x8x12 pixel-VAE latents -> 2x2 patches: 128 tokens of 48 values per clip.
  # Same step cost as 32x32 pixels with 4x4 patches (tokens of 192 values), but colour and background
  # are learnt in about half the steps (experiments/README.md). The width
  # must exceed the values per token, or the noise the patch embedding cannot carry stays in samples.
  config.model.patch_size = (1, 2, 2)
  config.model.dim = 256
  config.model.num_heads = 4
  config.model.ffn_dim = 512
  config.model.num_layers = 3
  config.model.in_channels = 12
  config.model.out_channels = 12
  config.model.text_dim = 64
  config.model.compute_dtype = "float32"
  # Three layers compile in seconds unrolled, and on a CPU the unrolled step is faster (no stacking of
  # each layer's saved activations); the parameters and their init are the same.
  config.model.scan_unroll = 0

  config.diffusion.sample_steps = 20
  config.diffusion.sample_shift = 1.0
  config.diffusion.guidance_scale = 4.0

  # 8 frames of 16x16 RGB; the pixel VAE halves height and width and stacks 2x2x3 into 12 channels
  config.data.fps = 8
  config.data.clip_stride_s = 1.0
  config.data.buckets = ((8, 16, 16),)
  config.data.image_buckets = ((1, 16, 16),)
  config.data.record_dtype = "float16"
  config.data.vae = "pixel"
  config.data.vae_spatial_factor = 2
  config.data.vae_temporal_factor = 1
  config.data.text_encoder = "tiny_umt5"
  config.data.text_len = 16
  # umT5's init (std d_model**-0.5) leaves "blue" the colour and "blue" the background nearly alike to
  # cross-attention; std 1.0 separates them: colour and background 99-100% instead of ~90%
  # (experiments/README.md: the text encoder's position bias).
  config.data.text_encoder_position_bias_std = 1.0
  config.data.vocab_size = 128
  config.data.shards = 2
  config.data.eval_fraction = 0.1

  config.mesh.ici = (1, -1, 1, 1)

  # ~9 minutes on 2 quiet CPU cores (docs/benchmarks.md, Demo)
  config.train.num_steps = 1200
  config.train.global_batch_size = 16
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 50
  config.train.schedule = "cosine"
  config.train.end_lr_ratio = 0.1
  config.train.weight_decay = 0.0
  config.train.ema_decays = (0.99,)  # a short run: a long average would still hold early weights
  config.train.log_every = 50

  config.eval.num_examples = 32
  config.eval.batch_size = 16
  config.eval.num_frames = 8
  config.eval.height = 16
  config.eval.width = 16
  config.eval.prompts = (
      "a red circle moves left on a blue background",
      "a green square moves up on a black background",
  )
  config.eval.watch_interval_s = 5.0
  config.eval.adherence_prompts = 40  # 5% steps: 16 gave scores too noisy to compare
  config.eval.sample_batch_size = 64  # every prompt in one call: a small model's step is mostly overhead

  config.checkpoint.every_steps = 600
  config.checkpoint.keep_last = 2
  return config
