"""ODE samplers of the flow (noise at sigma = 1 to data at sigma = 0): flow Euler and UniPC-2, with CFG.

Owns the sigma/timestep schedules (equal to diffusers' FlowMatchEulerDiscreteScheduler and flow-sigma
UniPCMultistepScheduler for the same steps and shift), the jit-compiled sampling loop and seeded noise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import choices
from sora_jax.diffusion import conditioning

Array = jax.Array
# velocity_fn(latents [B, ...], timesteps [B] (= 1000 * sigma), text_embeds [B, L, D] or None) -> velocity
VelocityFn = Callable[[Array, Array, Array | None], Array]

SAMPLERS = choices.SAMPLERS


def _check(sampler: str, steps: int, shift: float) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r}; expected one of {SAMPLERS}")
  if not isinstance(steps, int | np.integer) or steps < 1:
    raise ValueError(f"steps={steps!r} must be a positive int")
  if not shift > 0:
    raise ValueError(f"shift={shift} must be > 0")


def _euler_schedule(steps: int, shift: float, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
  """FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps), to the float32 bit."""
  # The scheduler's training table, shifted once in float32: its last entry is the sigma_min the
  # inference grid ends at, and that grid is shifted again (as diffusers does).
  train_sigmas = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
  train_sigmas = train_sigmas / np.float32(num_train_timesteps)
  train_sigmas = (np.float32(shift) * train_sigmas) / (
      np.float32(1.0) + np.float32(shift - 1.0) * train_sigmas)
  sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
  sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
  sigmas = sigmas / num_train_timesteps
  sigmas = (shift * sigmas / (1.0 + (shift - 1.0) * sigmas)).astype(np.float32)
  timesteps = sigmas * np.float32(num_train_timesteps)
  return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def _unipc_schedule(steps: int, shift: float, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
  """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps)."""
  sigmas = np.linspace(1.0, 1.0 / num_train_timesteps, steps + 1)[:-1]
  sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
  # sigma = 1 would make log(alpha) = log(0) in the first update; diffusers nudges it below 1.
  if abs(sigmas[0] - 1.0) < 1e-6:
    sigmas[0] -= 1e-6
  # diffusers stores these timesteps as int64: the model sees 1000*sigma truncated (999, not 999.999).
  timesteps = np.trunc(sigmas * num_train_timesteps).astype(np.float32)
  return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


def _schedule(
    sampler: str, steps: int, shift: float, num_train_timesteps: int
) -> tuple[np.ndarray, np.ndarray]:
  _check(sampler, steps, shift)
  if sampler == "euler":
    return _euler_schedule(steps, shift, num_train_timesteps)
  return _unipc_schedule(steps, shift, num_train_timesteps)


def sigma_schedule(sampler: str, steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
  """Noise levels [steps + 1] (float32, decreasing, last 0) the sampler visits, as diffusers builds them."""
  return _schedule(sampler, steps, shift, num_train_timesteps)[0]


def model_timesteps(sampler: str, steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
  """Timesteps [steps] passed to the model at each step: 1000*sigma (Euler), truncated to int (UniPC)."""
  return _schedule(sampler, steps, shift, num_train_timesteps)[1]


def _unipc_coefficients(sigmas: np.ndarray) -> dict[str, np.ndarray]:
  """Per-step scalars of UniPC-2 (bh2, x0-prediction, lower_order_final), in diffusers' float32 order.

  The corrector's b-vector (phi functions of small h) loses digits to cancellation in float32: its
  weights differ from float64 ones by ~1e-4 relative at 50 steps. Following the reference's float32
  operations keeps the weights equal to diffusers' rather than merely close. Index i of each array
  belongs to step i (predictor sigma_i -> sigma_{i+1}, corrector of x_i using steps i-1 and i-2).
  """
  steps = len(sigmas) - 1
  f32 = np.float32
  with np.errstate(divide="ignore"):
    alpha = f32(1.0) - sigmas
    # lambda = log(alpha/sigma), the half log-SNR; +inf at the final sigma = 0.
    lam = np.log(alpha) - np.log(sigmas)
  order = np.array([min(2, steps - i, i + 1) for i in range(steps)])

  ratio, x0_coef, delta_coef, rk = (np.zeros(steps, f32) for _ in range(4))
  rho_p = np.zeros(steps, f32)
  for i in range(steps):
    h = lam[i + 1] - lam[i]
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)  # bh2 variant: B(h) = e^h - 1
    ratio[i] = sigmas[i + 1] / sigmas[i]
    x0_coef[i] = alpha[i + 1] * h_phi_1
    delta_coef[i] = alpha[i + 1] * b_h
    if order[i] == 2:
      rk[i] = (lam[i - 1] - lam[i]) / h
      rho_p[i] = 0.5  # diffusers' fixed predictor weight for order 2
    else:
      rk[i] = 1.0  # unused (weight 0); any finite value keeps the update exact

  corrector_on = np.arange(steps) > 0
  rho_c_prev, rho_c_this = np.zeros(steps, f32), np.zeros(steps, f32)
  for i in range(1, steps):
    j = i - 1  # the corrector of x_i revisits the predictor step j -> i with its order
    if order[j] == 1:
      rho_c_this[i] = 0.5
      continue
    hh = -(lam[j + 1] - lam[j])
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - f32(1.0)
    b = [h_phi_k * f32(1.0) / b_h]
    h_phi_k = h_phi_k / hh - f32(0.5)
    b.append(h_phi_k * f32(2.0) / b_h)
    system = np.array([[1.0, 1.0], [rk[j], 1.0]], f32)
    rho_c_prev[i], rho_c_this[i] = np.linalg.solve(system, np.array(b, f32)).astype(f32)

  return {
      "pred_ratio": ratio, "pred_x0": x0_coef, "pred_delta": delta_coef, "pred_rk": rk, "pred_rho": rho_p,
      "corr_on": corrector_on,
      "corr_ratio": np.concatenate([[f32(1.0)], ratio[:-1]]).astype(f32),
      "corr_x0": np.concatenate([[f32(0.0)], x0_coef[:-1]]).astype(f32),
      "corr_delta": np.concatenate([[f32(0.0)], delta_coef[:-1]]).astype(f32),
      "corr_rk": np.concatenate([[f32(1.0)], rk[:-1]]).astype(f32),
      "corr_rho_prev": rho_c_prev, "corr_rho_this": rho_c_this,
  }


def _guided_velocity(
    velocity_fn: VelocityFn,
    latents: Array,
    timestep: Array,
    cond: Array | None,
    uncond: Array | None,
    guidance_scale: float,
    given_tokens: Array | None = None,
    guidance_scale_2: float | None = None,
    boundary_timestep: float | None = None,
) -> Array:
  """v = v_uncond + g*(v_cond - v_uncond), both halves in one model call of batch 2B.

  With `given_tokens` [B, N], the model gets per-token timesteps: 0 on the given frames' tokens.
  With `boundary_timestep`, g is `guidance_scale_2` below it (the low-noise expert's scale).
  """
  timesteps = jnp.full((latents.shape[0],), timestep, jnp.float32)
  if given_tokens is not None:
    timesteps = conditioning.token_timesteps(timesteps, given_tokens)
  two_scales = boundary_timestep is not None and guidance_scale_2 != guidance_scale
  if guidance_scale == 1.0 and not two_scales:
    return velocity_fn(latents, timesteps, cond).astype(jnp.float32)
  velocity = velocity_fn(
      jnp.concatenate([latents, latents]),
      jnp.concatenate([timesteps, timesteps]),
      jnp.concatenate([cond, uncond]),
  ).astype(jnp.float32)
  velocity_cond, velocity_uncond = jnp.split(velocity, 2)
  scale = guidance_scale
  if two_scales:
    scale = jnp.where(timestep >= boundary_timestep, guidance_scale, guidance_scale_2)
  return velocity_uncond + scale * (velocity_cond - velocity_uncond)


@functools.partial(
    jax.jit,
    static_argnames=("velocity_fn", "sampler", "steps", "shift", "guidance_scale", "return_intermediates",
                     "num_train_timesteps", "guidance_scale_2", "boundary_timestep"))
def sample(
    velocity_fn: VelocityFn,
    noise: Array,
    *,
    sampler: str,
    steps: int,
    shift: float,
    guidance_scale: float = 1.0,
    cond: Array | None = None,
    uncond: Array | None = None,
    return_intermediates: bool = False,
    num_train_timesteps: int = 1000,
    given_latents: Array | None = None,
    given_cells: Array | None = None,
    given_tokens: Array | None = None,
    guidance_scale_2: float | None = None,
    boundary_timestep: float | None = None,
) -> Array | tuple[Array, Array]:
  """Integrates the flow ODE from `noise` [B, ...] (sigma = 1) to latents (sigma = 0) in `steps` steps.

  velocity_fn(latents, timesteps [B], text_embeds) is called once per step under lax.scan;
  guidance_scale != 1 runs classifier-free guidance with `uncond` (default: zeros, the null text
  caption dropout trains) batched with `cond`. Static: velocity_fn, sampler, steps, shift,
  guidance_scale -- pass model parameters through an enclosing jit (a velocity_fn that closes over
  traced params), not as constants captured by a fresh closure, which would recompile every call.
  With return_intermediates, also returns the latents after every step [steps, B, ...].

  Given frames (image-to-video, extension): `given_latents` [B, ...] holds their clean latents where
  `given_cells` (broadcasting against it) is true, `given_tokens` [B, N] marks their patch tokens
  (sora_jax.diffusion.conditioning). Those cells start clean, stay clean after every step and their
  tokens see timestep 0; only the rest is denoised.

  Two experts (a velocity_fn that switches at `boundary_timestep`): steps below the boundary guide
  with `guidance_scale_2` (None = guidance_scale), as WanPipeline does.
  """
  _check(sampler, steps, shift)
  noise = jnp.asarray(noise, jnp.float32)
  given = (given_latents, given_cells, given_tokens)
  if any(x is None for x in given) and any(x is not None for x in given):
    raise ValueError("given frames need given_latents, given_cells and given_tokens together")
  impose = ((lambda x: x) if given_latents is None
            else lambda x: conditioning.impose(x, given_latents, given_cells))
  noise = impose(noise)
  if guidance_scale_2 is None:
    guidance_scale_2 = guidance_scale
  if guidance_scale != 1.0 or guidance_scale_2 != 1.0:
    if cond is None:
      raise ValueError(f"guidance_scale={guidance_scale} needs cond text_embeds; got None")
    if uncond is None:
      uncond = jnp.zeros_like(cond)
    if uncond.shape != cond.shape:
      raise ValueError(f"uncond {uncond.shape} must have the shape of cond {cond.shape}")
  if cond is not None and cond.shape[0] != noise.shape[0]:
    raise ValueError(f"cond of batch {cond.shape[0]} does not match noise of batch {noise.shape[0]}")
  sigmas, timesteps = _schedule(sampler, steps, shift, num_train_timesteps)
  velocity = functools.partial(
      _guided_velocity, velocity_fn, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
      given_tokens=given_tokens, guidance_scale_2=guidance_scale_2, boundary_timestep=boundary_timestep)

  if sampler == "euler":
    per_step = {"timestep": timesteps, "dt": (sigmas[1:] - sigmas[:-1]).astype(np.float32)}

    def euler_step(latents, step):
      latents = impose(latents + step["dt"] * velocity(latents, step["timestep"]))
      return latents, latents if return_intermediates else None

    latents, intermediates = jax.lax.scan(euler_step, noise, per_step)
  else:
    per_step = _unipc_coefficients(sigmas)
    per_step.update(timestep=timesteps, sigma=sigmas[:-1])

    def unipc_step(carry, step):
      latents, last_latents, x0_prev, x0_prev2 = carry
      x0 = latents - step["sigma"] * velocity(latents, step["timestep"])
      # UniC: re-take the previous step from last_latents, now knowing x0 at its end point.
      corrected = step["corr_ratio"] * last_latents - step["corr_x0"] * x0_prev
      history = step["corr_rho_prev"] * ((x0_prev2 - x0_prev) / step["corr_rk"])
      corrected = corrected - step["corr_delta"] * (history + step["corr_rho_this"] * (x0 - x0_prev))
      latents = impose(jnp.where(step["corr_on"], corrected, latents))
      # UniP: extrapolate to the next sigma from x0 here and (order 2) at the previous step.
      slope = step["pred_rho"] * ((x0_prev - x0) / step["pred_rk"])
      next_latents = impose(step["pred_ratio"] * latents - step["pred_x0"] * x0 - step["pred_delta"] * slope)
      carry = (next_latents, latents, x0, x0_prev)
      return carry, next_latents if return_intermediates else None

    zeros = jnp.zeros_like(noise)
    (latents, *_), intermediates = jax.lax.scan(unipc_step, (noise, noise, zeros, zeros), per_step)
  if return_intermediates:
    return latents, intermediates
  return latents


def seeded_noise(seed: int, shape: tuple[int, ...], first_index: int = 0) -> Array:
  """Standard normal float32 noise [B, ...] where example b depends only on (seed, first_index + b).

  Eval videos keep the same noise per prompt whatever the batch size or host split.
  """
  if len(shape) < 1 or shape[0] < 1:
    raise ValueError(f"noise shape {tuple(shape)} must start with a positive batch size")
  key = jax.random.key(seed)
  example_keys = jax.vmap(lambda index: jax.random.fold_in(key, index))(
      jnp.arange(shape[0], dtype=jnp.uint32) + jnp.uint32(first_index))
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(example_keys)
