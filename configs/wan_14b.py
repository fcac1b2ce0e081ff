"""Wan2.1 T2V 14B: D 5120, 40 heads, FFN 13824, 40 layers, 720p clips of 81 frames, sized for a v5p-128.

  python -m sora_jax.compile --config=configs/wan_14b.py     # FITS its v5p-128: ~63 GiB of 95 per chip
  python -m sora_jax.train --config=configs/wan_14b.py --workdir=/mnt/gcs/runs/wan14b \
      --config.data.dir=/mnt/gcs/data/latents
"""

from sora_jax.configs import base


def get_config():
  config = base.get_config()
  config.model.dim = 5120
  config.model.num_heads = 40
  config.model.ffn_dim = 13824
  config.model.num_layers = 40
  config.model.remat_policy = "full"
  config.mesh.ici = (1, -1, 1, 4)
  # 64 chips: FSDP 16 x tensor 4; 256 clips per step as 8 micro-batches of 32 (2 clips per 4-chip
  # tensor group; one step of all 256 needs ~16x the activations). `compile --max_batch` re-derives it.
  config.mesh.target_topology = "v5p-128"
  config.data.buckets = ((81, 720, 1280), (81, 1280, 720), (81, 960, 960))
  config.data.image_buckets = ((1, 720, 1280), (1, 1280, 720), (1, 960, 960))
  config.data.image_ratio = 0.1
  config.diffusion.sample_shift = 5.0
  config.train.global_batch_size = 256
  config.train.grad_accum_steps = 8
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.ema_decays = (0.999, 0.9999)
  config.checkpoint.every_steps = 1000
  config.eval.num_frames = 81
  config.eval.height = 720
  config.eval.width = 1280
  return config
