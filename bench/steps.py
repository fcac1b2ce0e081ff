"""The train steps bench/ compares on the CPU: sora_jax's trainer step and the same step in diffusers +
torch, for named cases (a model size, a batch and a latent shape).

sora_jax: the trainer's own pieces (config -> mesh -> DiT -> make_optimizer -> setup_state ->
make_train_step, jitted with the state's shardings and donation) on one CPU device, fp32 compute.
diffusers: `WanTransformer3DModel` (same dims/heads/ffn/layers/patch/text_len) in train mode, the same
step written in torch: logit-normal sigma, x_t = (1 - sigma) x0 + sigma eps, MSE to eps - x0, caption
dropout, global-norm clip, AdamW, EMA.

No flags: bench/train_step.py (timing), bench/step_profile.py (where the time goes) and
bench/cpu_roofline.py (the matmul peak) all build their steps here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

RATIO_GOAL = 0.8  # sora_jax / diffusers+torch step time on the headline cases


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark point: a model size, a batch and a latent shape."""

  name: str  # row label
  model: str  # model size: tiny (configs/tiny.py as the demo trains it) or mid
  batch: int  # clips per step
  latent_shape: tuple[int, int, int]  # latent (T, H, W); channels come from the model
  headline: bool = False  # a goal row (ratio <= 0.8)

  @property
  def tokens_per_clip(self) -> int:
    patch = build_config(self).model.patch_size
    return math.prod(size // p for size, p in zip(self.latent_shape, patch, strict=True))


# `mid` is a 30M-parameter DiT, every model field pinned so it does not drift with configs/tiny.py.
# Its 8 layers stay a loop (tiny.py unrolls its 3): unrolled, XLA fuses the layers' backward into
# transposing copies that cost 1.3 s of a 6.5 s step (5.8 s looped).
_MID_MODEL = dict(dim=512, num_heads=8, ffn_dim=1536, num_layers=8, in_channels=16, out_channels=16,
                  text_dim=1024, patch_size=(1, 2, 2), freq_dim=256, scan_unroll=1)
_MID_TEXT_LEN = 64

HEADLINE = {
    # configs/tiny.py's batch and bucket: 8 frames of 32x32 pixels -> 8x16x16 latents.
    "tiny": Case("tiny", "tiny", 16, (8, 16, 16), headline=True),
    "mid": Case("mid", "mid", 1, (8, 32, 32), headline=True),  # 2048 tokens/clip
    "tiny_1024": Case("tiny 16x16x16", "tiny", 16, (16, 16, 16), headline=True),  # 1024 tokens/clip
}
SWEEP_CASES = {
    "tiny": [Case(f"tiny {t}x{s}x{s}", "tiny", 16, (t, s, s))
             for t, s in ((2, 16), (4, 16), (16, 32))],
    "mid": [Case(f"mid {t}x32x32", "mid", 1, (t, 32, 32)) for t in (1, 2, 4)],
}


def build_config(case: Case):
  """The sora_jax config of a case: configs/tiny.py (+ the mid model), fp32 compute, its batch."""
  from sora_jax.configs import tiny

  config = tiny.get_config()
  if case.model == "mid":
    for key, value in _MID_MODEL.items():
      config.model[key] = value
    config.data.text_len = _MID_TEXT_LEN
  config.model.compute_dtype = "float32"
  config.train.global_batch_size = case.batch
  config.train.grad_accum_steps = 1
  return config


def _cpu_jax_env() -> None:
  """One host device: drop a forced device count (the tests' XLA_FLAGS) inherited from the shell."""
  flags_env = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = flags_env.strip()
  os.environ["JAX_PLATFORMS"] = "cpu"  # an installed libtpu would otherwise probe for TPUs


def sora_jax_step(case: Case):
  """(one_step, info): the sora_jax trainer's jitted step on one CPU device, compiled for `case`.

  `one_step()` runs one optimizer step to completion and returns its loss; `info` holds the compile
  time, the parameter count and the compiled HLO text (for bench/step_profile.py).
  """
  _cpu_jax_env()
  import jax
  import numpy as np

  from sora_jax.model import dit
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.parallel import sharding as sharding_lib
  from sora_jax.train import step as step_lib

  config = build_config(case)
  mesh = mesh_lib.create_mesh(config, jax.devices()[:1])
  trainable = step_lib.build(config, mesh)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((case.batch, *case.latent_shape, config.model.in_channels), np.float32)
  text_embeds = rng.standard_normal((case.batch, config.data.text_len, config.model.text_dim), np.float32)
  batch = jax.device_put({"latents": latents, "text_embeds": text_embeds}, trainable.batch_sharding)
  session = {"state": trainable.setup.init(jax.random.PRNGKey(0))}
  with sharding_lib.mesh_context(mesh, trainable.rules):
    start = time.perf_counter()
    compiled = trainable.train_step.lower(session["state"], batch).compile()
    compile_s = time.perf_counter() - start

  def one_step() -> float:
    with sharding_lib.mesh_context(mesh, trainable.rules):
      session["state"], metrics = compiled(session["state"], batch)
      loss = float(metrics["loss"])
      jax.block_until_ready(session["state"])
    return loss

  return one_step, {"compile_s": compile_s, "params": dit.count_params(session["state"].params),
                    "hlo": compiled.as_text()}


def diffusers_step(case: Case):
  """(one_step, info): the same step in torch with diffusers' WanTransformer3DModel and AdamW."""
  import diffusers
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  config = build_config(case)
  m, t = config.model, config.train
  torch.manual_seed(0)
  model = diffusers.WanTransformer3DModel(
      patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads,
      attention_head_dim=m.dim // m.num_heads, in_channels=m.in_channels, out_channels=m.out_channels,
      text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.ffn_dim, num_layers=m.num_layers,
      cross_attn_norm=m.cross_attn_norm, eps=m.eps, rope_max_seq_len=m.rope_max_seq_len).train()
  params = [p for p in model.parameters() if p.requires_grad]
  # Same decay rule as sora_jax: matrices decay; norms, biases, modulation tables do not.
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "scale_shift" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "scale_shift" not in n)]
  optimizer = torch.optim.AdamW(
      [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
      lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.adam_eps, fused=True)
  ema = [p.detach().clone() for p in params]
  generator = torch.Generator().manual_seed(0)
  latents = torch.randn((case.batch, m.in_channels, *case.latent_shape), generator=generator)
  text_embeds = torch.randn((case.batch, config.data.text_len, m.text_dim), generator=generator)
  batch = latents.shape[0]

  def one_step() -> float:
    sigma = torch.sigmoid(config.diffusion.logit_mean + config.diffusion.logit_std * torch.randn(batch))
    noise = torch.randn_like(latents)
    sigma_b = sigma.view(batch, 1, 1, 1, 1)
    noisy = (1.0 - sigma_b) * latents + sigma_b * noise
    target = noise - latents
    keep = (torch.rand(batch) >= config.diffusion.caption_dropout).to(text_embeds.dtype)
    text = text_embeds * keep.view(batch, 1, 1)
    velocity = model(noisy, sigma * config.diffusion.num_train_timesteps, text, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(velocity, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - config.train.ema_decays[0])
    return float(loss.detach())

  return one_step, {"compile_s": 0.0, "params": sum(p.numel() for p in params)}


STEP_BUILDERS = {"sora_jax": sora_jax_step, "diffusers": diffusers_step}
