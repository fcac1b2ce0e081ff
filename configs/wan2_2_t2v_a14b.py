"""Wan2.2 T2V A14B: two 14B experts (Wan2.1-14B's shape), one for high noise and one for low, switched at
sigma = 0.875; 720p clips of 81 frames on the Wan2.1 VAE, sized for a v5p-128.

  python -m sora_jax.compile --config=configs/wan2_2_t2v_a14b.py     # its v5p-128 (docs/scaling.md)
  python -m sora_jax.train --config=configs/wan2_2_t2v_a14b.py --workdir=/mnt/gcs/runs/a14b \\
      --config.data.dir=/mnt/gcs/data/latents \\
      --config.data.pretrained=/models/Wan2.2-T2V-A14B-Diffusers \\
      --config.train.init_from=/models/Wan2.2-T2V-A14B-Diffusers
  # fine-tune the low-noise expert only (the high-noise one frozen, without optimizer state or EMA):
  python -m sora_jax.train ... --config.train.train_experts='("low",)'

Each step trains one expert on the whole batch: "high" with the probability that a training sigma
falls at or above the boundary, its clips' sigmas drawn from that part of the density (and "low" likewise
below it), so the run sees the noise levels one DiT would. Both experts' weights stay on the chips
(FSDP-sharded: 1.75 GiB of fp32 parameters per chip for the two); their AdamW moments and EMA wait in
host memory between steps, each expert's visiting only for its own update.
"""

from sora_jax.configs import base


def get_config():
  config = base.get_config()
  config.model.dim = 5120
  config.model.num_heads = 40
  config.model.ffn_dim = 13824
  config.model.num_layers = 40
  config.model.experts = 2
  config.model.remat_policy = "offload"
  config.mesh.ici = (1, -1, 1, 1)
  # 64 chips: 256 clips per step as 4 micro-batches of 64 (one clip per chip each), as Wan2.1-14B.
  config.mesh.target_topology = "v5p-128"
  config.data.buckets = ((81, 720, 1280), (81, 1280, 720), (81, 960, 960))
  config.data.image_buckets = ((1, 720, 1280), (1, 1280, 720), (1, 960, 960))
  config.data.image_ratio = 0.1
  config.data.token_budget = 75600
  # WanPipeline's switch and Wan2.2's published sampling: 40 steps at shift 12, guidance 4 then 3.
  config.diffusion.boundary_ratio = 0.875
  config.diffusion.sample_shift = 12.0
  config.diffusion.sample_steps = 40
  config.diffusion.guidance_scale = 4.0
  config.diffusion.guidance_scale_2 = 3.0
  config.train.global_batch_size = 256
  config.train.grad_accum_steps = 4
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.ema_decays = (0.9999,)
  config.train.host_state = ("opt_state", "ema")
  config.checkpoint.every_steps = 1000
  config.eval.num_frames = 81
  config.eval.height = 720
  config.eval.width = 1280
  return config
