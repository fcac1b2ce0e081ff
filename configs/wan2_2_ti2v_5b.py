"""Wan2.2 TI2V 5B: D 3072, 24 heads, FFN 14336, 30 layers, on the Wan2.2 VAE (4x16x16, 48 channels);
text-to-video and image-to-video in one run, 704x1280 clips of 121 frames at 24 fps (~27k tokens).

  python -m sora_jax.compile --config=configs/wan2_2_ti2v_5b.py     # FITS its v5p-64: 64 clips, ~51 GiB of 95
  python -m sora_jax.train --config=configs/wan2_2_ti2v_5b.py --workdir=/mnt/gcs/runs/ti2v5b \\
      --config.data.dir=/mnt/gcs/data/latents_wan22 \\
      --config.data.pretrained=/models/Wan2.2-TI2V-5B-Diffusers \\
      --config.train.init_from=/models/Wan2.2-TI2V-5B-Diffusers
  python -m sora_jax.sample --workdir=W --prompt="..." --image=first_frame.png --out=i2v.mp4

The transformer is Wan2.1's architecture at another size (diffusers' WanTransformer3DModel, the same key
map); what makes it Wan2.2 is the VAE, whose 16x spatial compression gives a 720p x 121 clip 27,280
tokens against 75,600 for Wan2.1 at 720p x 81, and the per-token timesteps with which the first latent
frame is given clean (diffusers' `expand_timesteps`, sora_jax's given-frames conditioning).
"""

from sora_jax.configs import base


def get_config():
  config = base.get_config()
  config.model.dim = 3072
  config.model.num_heads = 24
  config.model.ffn_dim = 14336
  config.model.num_layers = 30
  config.model.in_channels = 48
  config.model.out_channels = 48
  config.model.remat_policy = "full"
  config.mesh.target_topology = "v5p-64"  # 32 chips, 2 clips per chip (docs/scaling.md: 4 fit)
  config.data.vae_spatial_factor = 16
  config.data.vae_temporal_factor = 4
  config.data.fps = 24
  config.data.buckets = ((121, 704, 1280), (121, 1280, 704), (121, 928, 928))
  config.data.image_buckets = ((1, 704, 1280), (1, 1280, 704), (1, 928, 928))
  config.data.image_ratio = 0.1
  # With data.packing: one row holds a whole 121-frame clip (31 x 22 x 40 = 27,280 tokens).
  config.data.token_budget = 27280
  # One run learns text-to-video and image-to-video: half the clips start from their first latent frame.
  config.train.condition_prob = 0.5
  config.train.condition_frames = (1,)
  config.diffusion.sample_shift = 5.0
  config.train.global_batch_size = 64
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.ema_decays = (0.9999,)
  config.checkpoint.every_steps = 1000
  config.eval.num_frames = 121
  config.eval.height = 704
  config.eval.width = 1280
  return config
