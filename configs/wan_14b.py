"""Wan2.1 T2V 14B: D 5120, 40 heads, FFN 13824, 40 layers, 720p clips of 81 frames, sized for a v5p-128.

  python -m sora_jax.compile --config=configs/wan_14b.py     # FITS its v5p-128
  python -m sora_jax.compile --config=configs/wan_14b.py --topology=v5p-8 \
      --config.train.global_batch_size=8 --config.train.grad_accum_steps=1   # FITS: 8 clips per step
  python -m sora_jax.train --config=configs/wan_14b.py --workdir=/mnt/gcs/runs/wan14b \
      --config.data.dir=/mnt/gcs/data/latents

Memory plan (docs/scaling.md): one 75,600-token clip per chip per micro-batch (two on a v5p-8), every
block rematerialised with its input kept in host memory (`offload`), that input in bf16 (the residual
stream between blocks is bf16, as in diffusers' bf16 pipeline: 0.7 GiB per layer per clip), AdamW
moments held in host memory between steps, one EMA. Pure FSDP: at 75k tokens per chip a layer's weight
all-gather hides behind its matmuls, so tensor parallelism would only add activation traffic.
"""

from sora_jax.configs import base


def get_config():
  config = base.get_config()
  config.model.dim = 5120
  config.model.num_heads = 40
  config.model.ffn_dim = 13824
  config.model.num_layers = 40
  config.model.remat_policy = "offload"
  # Halves the offloaded block inputs and their copies in flight: 8 clips per step on a v5p-8 need it
  # (host and device memory), 4 do not.
  config.model.residual_dtype = "bfloat16"
  config.mesh.ici = (1, -1, 1, 1)
  # 64 chips: 256 clips per step as 4 micro-batches of 64 (one clip per chip each).
  # `compile --max_batch` re-derives the split for another topology.
  config.mesh.target_topology = "v5p-128"
  config.data.buckets = ((81, 720, 1280), (81, 1280, 720), (81, 960, 960))
  config.data.image_buckets = ((1, 720, 1280), (1, 1280, 720), (1, 960, 960))
  config.data.image_ratio = 0.1
  # With data.packing: one row holds a whole 81-frame clip, or several images / shorter clips.
  config.data.token_budget = 75600
  config.diffusion.sample_shift = 5.0
  config.train.global_batch_size = 256
  config.train.grad_accum_steps = 4
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.ema_decays = (0.9999,)
  config.train.host_state = ("opt_state",)
  config.checkpoint.every_steps = 1000
  config.eval.num_frames = 81
  config.eval.height = 720
  config.eval.width = 1280
  return config
