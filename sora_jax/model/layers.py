"""Building blocks of the DiT: dense layers with logical axis names, fp32 norms, timestep features.

Owns the dtype policy helpers (`dtype_of`), the `DenseGeneral` wrapper whose parameters carry
logical partitioning, `scale_features`, `LayerNorm`, `RMSNorm` and the sinusoidal timestep embedding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.model import cpu_kernels, platform
from sora_jax.model import lora as lora_lib

Initializer = Callable[..., jax.Array]
LogicalAxes = tuple[str | None, ...]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
  """The jnp dtype of a config dtype name (`float32`, `bfloat16`, `float16`)."""
  if name not in _DTYPES:
    raise ValueError(f"dtype {name!r} is not supported; expected one of {tuple(_DTYPES)}")
  return _DTYPES[name]


def logical(init: Initializer, axes: LogicalAxes) -> Initializer:
  """Wraps an initializer so the parameter it makes carries logical axis names."""
  return nn.with_logical_partitioning(init, axes)


def constrain(array: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Logical sharding constraint on an activation; a no-op outside a mesh with axis rules."""
  return nn.with_logical_constraint(array, axes)


def project(inputs: jax.Array, kernel: jax.Array, in_axes: int) -> jax.Array:
  """`inputs [..., *in] . kernel [*in, *out] -> [..., *out]`, `in` being the last `in_axes` input axes.

  DenseGeneral's product: one `dot_general`, which keeps the kernel's sharded axes apart; on one CPU
  device `cpu_kernels.flattened_product`.
  """
  if platform.one_cpu_device():
    return cpu_kernels.flattened_product(inputs, kernel, in_axes)
  contract_in = tuple(range(inputs.ndim - in_axes, inputs.ndim))
  return jax.lax.dot_general(inputs, kernel, ((contract_in, tuple(range(in_axes))), ((), ())))


def scale_features(inputs: jax.Array, scale: jax.Array) -> jax.Array:
  """`inputs * scale` for a `scale` broadcast over some of the inputs' axes (a norm's weight over batch
  and tokens, a clip's modulation over its tokens), with the scale's gradient as one `dot_general`.

  Autodiff of the product gives the scale's gradient as `sum(g * inputs)` over the broadcast axes,
  which XLA's CPU backend fuses into a multiply-reduce far slower than the same sum written as a
  contraction when one long clip fills the batch (`bench/cpu_reductions.py` measures both); there
  are a dozen such sums per block.
  The value and the inputs' gradient are those of the plain product.
  """
  if scale.ndim > inputs.ndim:
    raise ValueError(f"scale {scale.shape} has more axes than inputs {inputs.shape}")
  scale_shape = (1,) * (inputs.ndim - scale.ndim) + tuple(scale.shape)
  summed = tuple(axis for axis, (n, s) in enumerate(zip(inputs.shape, scale_shape, strict=True))
                 if s == 1 and n != 1)
  if not summed or tuple(jnp.broadcast_shapes(inputs.shape, scale_shape)) != tuple(inputs.shape):
    return inputs * scale
  return _scale_features(inputs, scale, summed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scale_features(inputs: jax.Array, scale: jax.Array, summed: tuple[int, ...]) -> jax.Array:
  del summed
  return inputs * scale


def _scale_features_fwd(inputs, scale, summed):
  del summed
  return inputs * scale, (inputs, scale)


def _scale_features_bwd(summed, residuals, grad):
  inputs, scale = residuals
  kept = tuple(axis for axis in range(inputs.ndim) if axis not in summed)
  # Contract the broadcast axes of grad and inputs; the other axes are batch axes of the product.
  scale_grad = jax.lax.dot_general(grad, inputs, ((summed, summed), (kept, kept)))
  return (grad * scale).astype(inputs.dtype), scale_grad.reshape(scale.shape).astype(scale.dtype)


_scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


class DenseGeneral(nn.Module):
  """A matmul over the trailing `len(in_shape)` axes with named kernel axes and a bias.

  The kernel has shape `in_shape + out_shape` (e.g. `[D, H, Dh]` for a q projection), is stored in
  `param_dtype` and multiplied in `dtype` (TPU/GPU accumulate bf16 products in fp32).
  """

  in_shape: Sequence[int]
  out_shape: Sequence[int]
  kernel_axes: LogicalAxes
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  use_bias: bool = True
  lora: lora_lib.LoraSpec | None = None  # adapters (lora_a, lora_b) where it targets this projection

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    in_shape, out_shape = tuple(self.in_shape), tuple(self.out_shape)
    if len(self.kernel_axes) != len(in_shape) + len(out_shape):
      raise ValueError(f"kernel_axes {self.kernel_axes} do not name the kernel {in_shape + out_shape}")
    if inputs.shape[inputs.ndim - len(in_shape):] != in_shape:
      raise ValueError(f"{self.name}: input {inputs.shape} does not end with {in_shape}")
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)

    # The initializers see the 2-D [fan_in, fan_out] view so xavier/variance scaling use true fans.
    def kernel_init(rng, shape, dtype):
      del shape
      return self.kernel_init(rng, (fan_in, fan_out), dtype).reshape(in_shape + out_shape)

    kernel = self.param("kernel", logical(kernel_init, self.kernel_axes), in_shape + out_shape,
                        self.param_dtype)
    if self.lora is not None and self.lora.frozen_on_host:
      kernel = jax.device_put(kernel, jax.memory.Space.Device)  # this layer's slice only, when it runs
    outputs = project(inputs.astype(self.dtype), kernel.astype(self.dtype), len(in_shape))
    if self.use_bias:
      bias = self.param("bias", logical(self.bias_init, self.kernel_axes[len(in_shape):]), out_shape,
                        self.param_dtype)
      outputs = outputs + bias.astype(self.dtype)
    if self.lora is not None and self.lora.adapts(self.path):
      outputs = outputs + self._adapter(inputs, fan_in)
    return outputs

  def _adapter(self, inputs: jax.Array, fan_in: int) -> jax.Array:
    """scale · (x·A)·B: the low-rank update, computed on the activations (no kernel-sized product)."""
    in_shape, out_shape, rank = tuple(self.in_shape), tuple(self.out_shape), self.lora.rank
    n_in = len(in_shape)
    a_init = lambda rng, shape, dtype: lora_lib.init_a(rng, fan_in, rank, dtype).reshape(shape)
    a = self.param(lora_lib.A, logical(a_init, (*self.kernel_axes[:n_in], None)), (*in_shape, rank),
                   self.param_dtype)
    b = self.param(lora_lib.B, logical(nn.initializers.zeros_init(), (None, *self.kernel_axes[n_in:])),
                   (rank, *out_shape), self.param_dtype)
    low = project(inputs.astype(self.dtype), a.astype(self.dtype), n_in)
    return self.lora.scale * project(low, b.astype(self.dtype), 1)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in fp32 (optionally affine), returning fp32."""

  eps: float = 1e-6
  affine: bool = False
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    values = inputs.astype(jnp.float32)
    mean = jnp.mean(values, axis=-1, keepdims=True)
    centred = values - mean
    variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(variance + self.eps)
    if self.affine:
      width = inputs.shape[-1]
      scale = self.param("scale", logical(nn.initializers.ones_init(), (self.axis_name,)), (width,),
                         self.param_dtype)
      bias = self.param("bias", logical(nn.initializers.zeros_init(), (self.axis_name,)), (width,),
                        self.param_dtype)
      normed = scale_features(normed, scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return normed


class RMSNorm(nn.Module):
  """RMSNorm over the trailing `len(feature_shape)` axes in fp32, with a learned scale.

  For q/k normalisation across heads the features are `[H, Dh]`: Wan normalises the full width.
  """

  feature_shape: Sequence[int]
  feature_axes: LogicalAxes
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    feature_shape = tuple(self.feature_shape)
    reduce_axes = tuple(range(inputs.ndim - len(feature_shape), inputs.ndim))
    values = inputs.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(values), axis=reduce_axes, keepdims=True)
    scale = self.param("scale", logical(nn.initializers.ones_init(), self.feature_axes), feature_shape,
                       self.param_dtype)
    normed = values * jax.lax.rsqrt(mean_square + self.eps)
    return scale_features(normed, scale.astype(jnp.float32)).astype(inputs.dtype)


def timestep_embedding(timesteps: jax.Array, width: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features `[cos, sin]` of timesteps (any shape) -> `[..., width]` fp32.

  Matches diffusers' `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`.
  """
  if width % 2:
    raise ValueError(f"timestep embedding width must be even; got {width}")
  half = width // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
  angles = timesteps.astype(jnp.float32)[..., None] * jnp.exp(exponent)
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
