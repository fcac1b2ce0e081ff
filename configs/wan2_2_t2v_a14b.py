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

from sora_jax.configs import wan_14b


def get_config():
  # Each expert has Wan2.1-14B's shape, and the run its mesh, clips, batch split and schedule.
  config = wan_14b.get_config()
  config.model.experts = 2
  # WanPipeline's switch and Wan2.2's published sampling: 40 steps at shift 12, guidance 4 then 3.
  config.diffusion.boundary_ratio = 0.875
  config.diffusion.sample_shift = 12.0
  config.diffusion.sample_steps = 40
  config.diffusion.guidance_scale = 4.0
  config.diffusion.guidance_scale_2 = 3.0
  config.train.host_state = ("opt_state", "ema")
  return config
