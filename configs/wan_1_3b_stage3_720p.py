"""Wan2.1-1.3B from scratch, stage 3 of 3: 720p clips of 81 frames, from stage 2's EMA weights.

75.6k tokens per clip: one clip per chip of a v5p-64, with splash attention and full remat. See
docs/recipe.md.

  python -m sora_jax.compile --config=configs/wan_1_3b_stage3_720p.py
  python -m sora_jax.train --config=configs/wan_1_3b_stage3_720p.py --workdir=gs://BUCKET/runs/stage3 \\
      --config.data.dir=gs://BUCKET/data/720p --config.train.init_from=gs://BUCKET/runs/stage2
"""

from sora_jax.configs import wan_1_3b


def get_config():
  config = wan_1_3b.get_config()
  config.data.buckets = ((81, 720, 1280), (81, 1280, 720), (81, 960, 960))
  config.data.image_buckets = ((1, 720, 1280), (1, 1280, 720), (1, 960, 960))
  config.data.image_ratio = 0.05
  config.data.token_budget = 75600
  config.train.init_weights = "ema_0.999"
  config.train.init_optimizer = "restart"
  config.train.global_batch_size = 32
  config.train.num_steps = 10_000
  config.train.learning_rate = 2e-5
  config.train.warmup_steps = 200
  config.eval.height, config.eval.width = 720, 1280
  return config
