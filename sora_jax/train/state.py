"""The training state pytree and its shape-first, born-sharded initialisation.

Owns `TrainState` (step, params, opt_state, ema, rng, skip counters) and `create_train_state`:
eval_shape -> logical shardings -> jit(init, out_shardings), so no full copy of the model ever
sits on one device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sora_jax.choices import EXPERTS
from sora_jax.diffusion import experts as experts_lib
from sora_jax.model import lora as lora_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import ema as ema_lib

# An abstract raw key: a concrete PRNGKey would be placed on the current mesh, which fails for the
# compile-only devices of sora_jax.compile.
_RNG_SPEC = jax.ShapeDtypeStruct((2,), jnp.uint32)


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; checkpointed as one tree."""

  step: jax.Array  # int32 [], optimizer steps taken (skipped steps included)
  params: Any  # fp32 parameters (model.param_dtype); with model.experts = 2, {"high": tree, "low": tree}
  opt_state: Any  # optax state of the optimizer (with experts: {expert: state} per trained expert)
  ema: dict[str, Any]  # {"0.999": params-like tree, ...} (with experts: of the trained experts)
  rng: jax.Array  # uint32 [2], base key; step keys are fold_in(rng, step)
  skipped_steps: jax.Array  # int32 [], updates skipped for a non-finite loss or gradient (or a spike)
  nonfinite_run: jax.Array  # int32 [], consecutive skipped updates (rollback trigger)
  # float32 [4]: applied steps seen, running mean and mean square of their gradient norm, and the
  # updates skipped as spikes (train.spike_sigmas). With experts: {expert: [4]} per trained expert.
  grad_norm_stats: jax.Array = None


@dataclass(frozen=True)
class StateSetup:
  """The abstract state, its shardings and the jitted initialiser, built once per run."""

  abstract_state: TrainState  # ShapeDtypeStructs, unboxed
  shardings: TrainState  # NamedSharding per leaf
  init: Callable[[jax.Array], TrainState]  # rng -> sharded TrainState


def example_inputs(model: ml_collections.ConfigDict, batch_size: int = 1) -> tuple[np.ndarray, ...]:
  """Smallest dummy (latents, timesteps, text_embeds) for model.init: one patch, one text token.

  Parameter shapes do not depend on the input size, and init runs a forward pass, so the smallest
  input keeps initialisation cheap for any model size.
  """
  # numpy, not jnp: under a mesh of compile-only devices (sora_jax.compile) jnp would place them.
  latents = np.zeros((batch_size, *model.patch_size, model.in_channels), np.float32)
  timesteps = np.zeros((batch_size,), np.float32)
  text_embeds = np.zeros((batch_size, 1, model.text_dim), np.float32)
  return latents, timesteps, text_embeds


def _init_model(model: nn.Module) -> nn.Module:
  """`model` with the `xla` attention backend, to run init on `example_inputs`.

  Parameters do not depend on the backend, and a context-parallel one cannot split the one-token
  example sequence over the mesh.
  """
  if model.config.attention_backend == "xla":
    return model
  config = copy.deepcopy(model.config)
  config.attention_backend = "xla"
  return model.clone(config=config)


def make_boxed_init(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose param-like leaves are still nn.Partitioned boxes (for the specs)."""
  inputs, init_model = example_inputs(config.model), _init_model(model)

  def init(rng: jax.Array) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    # One DiT keeps its historical key; each expert folds in its index, so the two start apart.
    key = lambda name: params_rng if name is None else jax.random.fold_in(params_rng, EXPERTS.index(name))
    params = experts_lib.per_expert(config.model, lambda name: init_model.init(key(name), *inputs)["params"])
    if lora_lib.spec_of(config.train):
      # A LoRA run trains and keeps the adapters only; XLA drops the frozen weights' unused init.
      params = lora_lib.split(params)[1]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=per_trained(config, optimizer.init, params),
        ema=ema_lib.init(trainable(params, config), config.train.ema_decays),
        rng=state_rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        nonfinite_run=jnp.zeros((), jnp.int32),
        grad_norm_stats=per_trained(config, lambda _: jnp.zeros((4,), jnp.float32), params),
    )

  return init


def trainable(params: Any, config: ml_collections.ConfigDict) -> Any:
  """The part of `params` the optimizer and EMA see: all of one DiT, or {expert: tree} of trained experts."""
  if not experts_lib.names(config.model):
    return params
  return {name: params[name] for name in experts_lib.trained(config)}


def per_trained(config: ml_collections.ConfigDict, make: Callable[[Any], Any], params: Any) -> Any:
  """make(params) for one DiT; {expert: make(params[expert])} for each trained expert."""
  if not experts_lib.names(config.model):
    return make(params)
  return {name: make(params[name]) for name in experts_lib.trained(config)}


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict) -> Any:
  """Boxed ShapeDtypeStruct tree of the parameters a step trains (logical names kept), without
  allocating anything: one DiT's, or a LoRA run's adapters.

  With experts this is the tree of each one (the optimizer's decay mask is built from it)."""
  inputs, init_model = example_inputs(config.model), _init_model(model)
  boxed = jax.eval_shape(lambda rng: init_model.init(rng, *inputs)["params"], _RNG_SPEC)
  return lora_lib.split(boxed)[1] if lora_lib.spec_of(config.train) else boxed


@dataclass(frozen=True)
class FrozenSetup:
  """A LoRA run's frozen weights: their abstract tree (train.lora_base_dtype) and shardings."""

  abstract: Any  # ShapeDtypeStructs, unboxed
  shardings: Any  # NamedSharding per leaf (host memory is not used for them)


def frozen_setup(model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 rules: sharding_lib.LogicalRules) -> FrozenSetup | None:
  """Shapes and shardings of the weights a LoRA run adapts (the DiT without adapters); None otherwise."""
  if not lora_lib.spec_of(config.train):
    return None
  inputs, init_model = example_inputs(config.model), _init_model(model)
  with sharding_lib.mesh_context(mesh, rules):
    boxed = jax.eval_shape(lambda rng: init_model.init(rng, *inputs)["params"], _RNG_SPEC)
  frozen = lora_lib.split(boxed)[0]
  dtype = jnp.dtype(config.train.lora_base_dtype)
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), nn.meta.unbox(frozen))
  shardings = sharding_lib.tree_shardings(frozen, mesh, rules)
  if "frozen" in tuple(config.train.host_state):  # the projection kernels; norms and tables stay
    shardings = jax.tree_util.tree_map_with_path(
        lambda path, s: s.with_memory_kind("pinned_host") if path[-1].key == "kernel" else s, shardings)
  return FrozenSetup(abstract=abstract, shardings=shardings)


def place_frozen(params: Any, frozen: FrozenSetup) -> Any:
  """A DiT's weights (numpy or jax) cast to train.lora_base_dtype and placed in the frozen shardings."""
  if jax.tree.structure(params) != jax.tree.structure(frozen.abstract):
    raise ValueError(f"the weights to adapt have the tree {jax.tree.structure(params)}; the model expects "
                     f"{jax.tree.structure(frozen.abstract)}")
  place = lambda leaf, expected, sharding: jax.device_put(_as_dtype(leaf, expected.dtype), sharding)
  return jax.tree.map(place, params, frozen.abstract, frozen.shardings)


def setup_state(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: sharding_lib.LogicalRules,
) -> StateSetup:
  """Shapes and shardings of the state, and a jitted init whose outputs are born sharded."""
  boxed_init = make_boxed_init(model, config, optimizer)
  with sharding_lib.mesh_context(mesh, rules):
    boxed = jax.eval_shape(boxed_init, _RNG_SPEC)
  shardings = with_host_state(sharding_lib.tree_shardings(boxed, mesh, rules), config.train)
  abstract_state = nn.meta.unbox(boxed)
  jitted = jax.jit(lambda rng: nn.meta.unbox(boxed_init(rng)), out_shardings=shardings,
                   compiler_options=compiler_options(config.train))

  def init(rng: jax.Array) -> TrainState:
    with sharding_lib.mesh_context(mesh, rules):
      return jitted(rng)

  return StateSetup(abstract_state=abstract_state, shardings=shardings, init=init)


def with_host_state(shardings: TrainState, train: ml_collections.ConfigDict) -> TrainState:
  """The state's shardings with the parts named in train.host_state placed in pinned host memory."""
  parts = {}
  for part in (part for part in train.host_state if part != "frozen"):  # frozen: `frozen_setup`
    parts[part] = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), getattr(shardings, part))
  return shardings.replace(**parts)


def on_device(tree: Any) -> Any:
  """`tree` moved into accelerator memory inside a jitted function (a no-op for what is there already)."""
  return jax.device_put(tree, jax.memory.Space.Device)


def on_host(tree: Any) -> Any:
  """`tree` moved into pinned host memory inside a jitted function."""
  return jax.device_put(tree, jax.memory.Space.Host)


def state_from_params(params: Any, config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
                      setup: StateSetup, step: int = 0, opt_state: Any = None, ema: Any = None) -> TrainState:
  """A state at `step` around given weights (numpy or jax): fresh optimizer, EMA trees = the weights.

  With experts, `params` is {"high": tree, "low": tree}. `opt_state` / `ema` given (already placed in
  the setup's shardings) are used instead of fresh ones, which are then never built.

  Placed straight into the setup's shardings; no model init runs (that would compile the whole
  forward pass). The rng is the one `setup.init` derives from train.seed, so a run started from
  pretrained weights draws the same noise as one started from scratch.
  """
  abstract, shardings = setup.abstract_state.params, setup.shardings
  if jax.tree.structure(params) != jax.tree.structure(abstract):
    raise ValueError(f"pretrained parameters have the tree {jax.tree.structure(params)}; the model "
                     f"expects {jax.tree.structure(abstract)}")
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), expected in zip(leaves, jax.tree.leaves(abstract), strict=True):
    if tuple(np.shape(leaf)) != tuple(expected.shape):
      raise ValueError(f"pretrained parameter {jax.tree_util.keystr(path)} has shape {np.shape(leaf)}; the "
                       f"model expects {expected.shape}")
  placed = jax.tree.map(
      lambda leaf, expected, sharding: jax.device_put(_as_dtype(leaf, expected.dtype), sharding),
      params, abstract, shardings.params)
  _, state_rng = jax.random.split(jax.random.PRNGKey(int(config.train.seed)))
  return TrainState(
      step=jax.device_put(np.asarray(step, np.int32), shardings.step),
      params=placed,
      opt_state=opt_state if opt_state is not None else jax.jit(
          lambda p: per_trained(config, optimizer.init, p), out_shardings=shardings.opt_state)(placed),
      ema=ema if ema is not None else jax.jit(
          lambda p: ema_lib.init(trainable(p, config), config.train.ema_decays),
          out_shardings=shardings.ema)(placed),
      rng=jax.device_put(np.asarray(state_rng), shardings.rng),
      skipped_steps=jax.device_put(np.zeros((), np.int32), shardings.skipped_steps),
      nonfinite_run=jax.device_put(np.zeros((), np.int32), shardings.nonfinite_run),
      grad_norm_stats=jax.tree.map(lambda sharding: jax.device_put(np.zeros((4,), np.float32), sharding),
                                   shardings.grad_norm_stats),
  )


def _as_dtype(leaf: Any, dtype: Any) -> Any:
  # A global jax.Array (weights restored from another run) may span other processes' devices: it is
  # cast and resharded as it is, never gathered into this host's memory.
  if isinstance(leaf, jax.Array):
    return leaf.astype(dtype)
  return np.asarray(leaf).astype(dtype)


def compiler_options(train: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """XLA options of the jitted init and step: train.fast_compile trades step speed for compile time."""
  if train.fast_compile:
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return None
