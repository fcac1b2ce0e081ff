"""Wan2.1-1.3B from scratch, stage 2 of 3: 480p clips of 81 frames, from stage 1's EMA weights.

The model is stage 1's (same parameter shapes); resolution, frame count, buckets and the image share
change. A fresh AdamW with a short warmup; `--config.train.init_optimizer=carry` keeps stage 1's
moments instead. See docs/recipe.md.

  python -m sora_jax.compile --config=configs/wan_1_3b_stage2_480p.py
  python -m sora_jax.train --config=configs/wan_1_3b_stage2_480p.py --workdir=gs://BUCKET/runs/stage2 \\
      --config.data.dir=gs://BUCKET/data/480p --config.train.init_from=gs://BUCKET/runs/stage1
"""

from sora_jax.configs import wan_1_3b


def get_config():
  config = wan_1_3b.get_config()  # 480p x 81 buckets, 10% images
  config.train.init_weights = "ema_0.999"
  config.train.init_optimizer = "restart"
  config.train.global_batch_size = 64
  config.train.num_steps = 30_000
  config.train.learning_rate = 5e-5
  config.train.warmup_steps = 500
  return config
