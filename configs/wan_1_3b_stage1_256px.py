"""Wan2.1-1.3B from scratch, stage 1 of 3: 256px images and 33-frame clips (docs/recipe.md).

Half of each batch is images, the rest short low-resolution clips, as Wan2.1 and Open-Sora 2.0 begin.
Stage 2 (configs/wan_1_3b_stage2_480p.py) starts from this run's EMA weights.

  python -m sora_jax.compile --config=configs/wan_1_3b_stage1_256px.py
  python -m sora_jax.train --config=configs/wan_1_3b_stage1_256px.py --workdir=gs://BUCKET/runs/stage1 \\
      --config.data.dir=gs://BUCKET/data/256px
"""

from sora_jax.configs import wan_1_3b


def get_config():
  config = wan_1_3b.get_config()
  config.data.buckets = ((33, 256, 256), (33, 192, 336), (33, 336, 192))
  config.data.image_buckets = ((1, 256, 256), (1, 192, 336), (1, 336, 192))
  config.data.image_ratio = 0.5
  config.train.global_batch_size = 256
  config.train.num_steps = 50_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.eval.num_frames = 33
  config.eval.height, config.eval.width = 256, 256
  return config
