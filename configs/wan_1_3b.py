"""Wan2.1 T2V 1.3B: D 1536, 12 heads, FFN 8960, 30 layers, 480p clips of 81 frames, sized for a v5p-64.

  python -m sora_jax.compile --config=configs/wan_1_3b.py     # FITS its v5p-64: ~20 GiB of 95 per chip
  python -m sora_jax.train --config=configs/wan_1_3b.py --workdir=/mnt/gcs/runs/wan13b \
      --config.data.dir=/mnt/gcs/data/latents
"""

from sora_jax.configs import base


def get_config():
  config = base.get_config()
  config.model.dim = 1536
  config.model.num_heads = 12
  config.model.ffn_dim = 8960
  config.model.num_layers = 30
  config.model.remat_policy = "full"
  config.mesh.target_topology = "v5p-64"  # 32 chips: 2 clips per chip under FSDP, splash attention
  config.data.buckets = ((81, 480, 832), (81, 832, 480), (81, 624, 624))
  config.data.image_buckets = ((1, 480, 832), (1, 832, 480), (1, 624, 624))
  config.data.image_ratio = 0.1
  # With data.packing: one row holds a whole 81-frame clip, or several images / shorter clips.
  config.data.token_budget = 32760
  config.diffusion.sample_shift = 3.0
  config.train.global_batch_size = 64
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.ema_decays = (0.999, 0.9999)
  config.checkpoint.every_steps = 1000
  config.eval.num_frames = 81
  return config
