"""Mesh construction from ICI/DCN sizes and logical-axis shardings on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from sora_jax import config as config_lib
from sora_jax.model.dit import DiT
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import sharding as sharding_lib
from sora_jax.train import state as state_lib


def test_fake_devices_present():
  assert jax.device_count() == 8


@pytest.mark.parametrize("ici, dcn, expected", [
    ((1, -1, 1, 1), (1, 1, 1, 1), {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}),
    ((1, 4, 1, 2), (1, 1, 1, 1), {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}),
    ((-1, 1, 1, 1), (1, 1, 1, 1), {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}),
    ((1, -1, 1, 2), (2, 1, 1, 1), {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}),
])
def test_create_mesh_resolves_sizes(tiny_train_config, ici, dcn, expected):
  tiny_train_config.mesh.ici = ici
  tiny_train_config.mesh.dcn = dcn
  mesh = mesh_lib.create_mesh(tiny_train_config)
  assert dict(mesh.shape) == expected
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_hybrid_mesh_puts_dcn_outermost(tiny_train_config):
  # Two "slices" of 4 devices: each data index must hold one slice's devices (0-3 or 4-7).
  tiny_train_config.mesh.ici = (1, 4, 1, 1)
  tiny_train_config.mesh.dcn = (2, 1, 1, 1)
  mesh = mesh_lib.create_mesh(tiny_train_config)
  slices = [sorted(d.id for d in mesh.devices[i].flat) for i in range(2)]
  assert slices == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_create_mesh_on_a_subset(tiny_train_config):
  mesh = mesh_lib.create_mesh(tiny_train_config, jax.devices()[:1])
  assert mesh.size == 1


@pytest.mark.parametrize("ici, message", [
    ((3, 1, 1, 1), "does not divide the 8 devices"),
    ((1, 2, 1, 2), "expected the product of mesh.ici to be 8"),
])
def test_bad_mesh_is_one_clear_error(tiny_train_config, ici, message):
  tiny_train_config.mesh.ici = ici
  with pytest.raises(config_lib.ConfigError, match=message):
    mesh_lib.create_mesh(tiny_train_config)


def test_heads_not_divisible_by_tensor(tiny_train_config):
  tiny_train_config.mesh.ici = (1, 2, 1, 4)  # 2 heads over tensor=4
  with pytest.raises(config_lib.ConfigError, match="num_heads=2 is not divisible by the tensor"):
    config_lib.validate(tiny_train_config, 8)


@pytest.mark.parametrize("ici", [(1, 4, 1, 2), (1, 2, 2, 2)], ids=["fsdp4_tensor2", "fsdp2_context2_tensor2"])
def test_dit_params_get_fsdp_and_tensor_shardings(tiny_train_config, ici):
  tiny_train_config.mesh.ici = ici
  mesh = mesh_lib.create_mesh(tiny_train_config)
  rules = sharding_lib.logical_rules(tiny_train_config.mesh)
  model = DiT(config=tiny_train_config.model)
  with sharding_lib.mesh_context(mesh, rules):
    boxed = state_lib.abstract_params(model, tiny_train_config)
  shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  specs = {jax.tree_util.keystr(path): s.spec
           for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  names = {jax.tree_util.keystr(path): box.names
           for path, box in jax.tree_util.tree_flatten_with_path(
               boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
  assert specs, "no parameters"
  # Every embed axis goes to fsdp x context, every mlp / heads axis to tensor, everything else unsharded.
  expected_axis = {"embed": ("fsdp", "context"), "mlp": "tensor", "heads": "tensor"}
  seen = set()
  for key, spec in specs.items():
    logical = names[key]
    assert len(spec) == len(logical), key
    for name, mesh_axes in zip(logical, spec, strict=True):
      want = expected_axis.get(name)
      assert mesh_axes == want, (key, logical, spec)
      seen.add(name)
  assert {"embed", "mlp", "heads"} <= seen
  # Context devices share the weights too: each holds 1/(fsdp x context) of the embed axis.
  kernel = shardings["blocks"]["attn1"]["to_q"]["kernel"]
  model_config = tiny_train_config.model
  shape = (model_config.num_layers, model_config.dim, model_config.num_heads, 16)
  assert kernel.shard_shape(shape)[1] == model_config.dim // (ici[1] * ici[2])


def test_indivisible_dims_stay_replicated():
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = (("embed", "fsdp"),)
  boxed = {"odd": nn.Partitioned(jax.ShapeDtypeStruct((12,), jnp.float32), names=("embed",)),
           "even": nn.Partitioned(jax.ShapeDtypeStruct((16, 3), jnp.float32), names=("embed", None)),
           "plain": jax.ShapeDtypeStruct((5,), jnp.float32)}
  shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  assert shardings["odd"].is_fully_replicated
  assert shardings["even"].spec == PartitionSpec("fsdp", None)
  assert shardings["plain"].is_fully_replicated


def test_batch_sharding_uses_data_and_fsdp(tiny_train_config):
  tiny_train_config.mesh.ici = (2, 2, 1, 2)
  mesh = mesh_lib.create_mesh(tiny_train_config)
  rules = sharding_lib.logical_rules(tiny_train_config.mesh)
  assert sharding_lib.batch_sharding(mesh, rules).spec == PartitionSpec(("data", "fsdp"))
  assert sharding_lib.batch_size_divisor(mesh, rules) == 4


def test_bad_rule_is_named(tiny_train_config):
  tiny_train_config.mesh.logical_axis_rules = (("batch",),)
  with pytest.raises(ValueError, match="logical_axis_rules entry"):
    sharding_lib.logical_rules(tiny_train_config.mesh)


class _ProcessView:
  """A sharding as one process of a multi-process run sees it: only its own devices' rows."""

  def __init__(self, rows):
    self._rows = rows

  def addressable_devices_indices_map(self, shape):
    return {device: (slice(*rows),) for device, rows in enumerate(self._rows)}


def test_process_batch_shard_by_rows_held():
  # 2 processes split the batch (fsdp over hosts): disjoint halves.
  assert sharding_lib.process_batch_shard(_ProcessView([(8, 12), (12, 16)]), 16) == (1, 2)
  # The batch split 2 ways inside each process and not across them (context over hosts): every
  # process holds all 16 rows and reads the whole batch.
  assert sharding_lib.process_batch_shard(_ProcessView([(0, 8), (8, 16), (0, 8)]), 16) == (0, 1)
  assert sharding_lib.process_batch_shard(_ProcessView([(None, None)]), 16) == (0, 1)
  with pytest.raises(ValueError, match=r"holds rows \[\(0, 4\), \(8, 12\)\].*one contiguous, equal share"):
    sharding_lib.process_batch_shard(_ProcessView([(0, 4), (8, 12)]), 16)


def test_traced_spec_follows_the_rules_and_pins():
  mesh = jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "context", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rules = (("batch", ("data", "fsdp", "context")), ("seq", "context"), ("heads", "tensor"))
  seen = {}

  def trace(x):
    seen["rules"] = sharding_lib.traced_spec(("batch", "seq", "heads"))
    seen["whole"] = sharding_lib.traced_spec(("batch", "seq", "heads"), {"seq": None})
    seen["pinned"] = sharding_lib.traced_spec(("batch", "seq", "heads"), {"seq": "context"})
    return x

  with sharding_lib.mesh_context(mesh, rules):
    jax.jit(trace)(jnp.zeros(2))
  P = jax.sharding.PartitionSpec
  # tensor (size 1) is left out; batch takes context first under the rules, so seq finds it taken.
  assert seen["rules"] == P(("data", "fsdp", "context"), None, None)
  assert seen["whole"] == P(("data", "fsdp", "context"), None, None)
  assert seen["pinned"] == P(("data", "fsdp"), "context", None)
  assert sharding_lib.traced_spec(("batch",)) == P(None)  # no mesh


def _activation_axes(config) -> set[tuple[str, ...]]:
  """The logical names of every activation constraint the DiT applies (bucketed and packed input)."""
  from sora_jax.model import dit, layers

  seen = set()
  original = layers.constrain

  def record(array, axes):
    seen.add(tuple(axes))
    return original(array, axes)

  model = DiT(config.model)
  latents = jnp.zeros((2, 2, 4, 4, config.model.in_channels))
  text = jnp.zeros((2, 3, config.model.text_dim))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(dit, "constrain", record)
    params = jax.eval_shape(model.init, jax.random.key(0), latents, jnp.zeros((2,)), text)
    jax.eval_shape(model.apply, params, latents, jnp.zeros((2, 8)), text)  # per-token timesteps
  return seen


def test_activation_placements_do_not_depend_on_the_order_of_the_rules(tiny_train_config):
  """Activations and parameters have names of their own: any order of the rules places them alike, and
  the residual stream keeps its batch on (data, fsdp) and its sequence on context."""
  import random

  rules = sharding_lib.logical_rules(tiny_train_config.mesh)
  specs = sorted(_activation_axes(tiny_train_config))
  assert all(name.startswith("act_") for spec in specs for name in spec)
  param_specs = [("layers", "embed", "heads", "head_dim"), ("layers", "mlp", "embed"), ("embed", "channels")]
  place = lambda order: [tuple(nn.logical_to_mesh_axes(spec, order)) for spec in specs + param_specs]
  expected = place(rules)
  hidden = tuple(nn.logical_to_mesh_axes(("act_batch", "act_seq", "act_embed"), rules))
  assert hidden == (("data", "fsdp"), "context", None)
  shuffled = random.Random(0)
  for _ in range(20):
    order = list(rules)
    shuffled.shuffle(order)
    assert place(tuple(order)) == expected, order
  assert place(tuple(reversed(rules))) == expected


def test_rules_saved_before_activation_names_place_activations_as_then(tiny_train_config):
  """A checkpoint's config from before the act_* names: from_json gives its activations the old placement."""
  saved = tiny_train_config.to_dict()
  saved["mesh"]["logical_axis_rules"] = [
      ["batch", ["data", "fsdp"]], ["seq", "context"], ["text_seq", None], ["embed", ["fsdp", "context"]],
      ["heads", "tensor"], ["head_dim", None], ["mlp", "tensor"], ["layers", None], ["act_embed", "tensor"]]
  rules = sharding_lib.logical_rules(config_lib.from_json(saved).mesh)
  table = dict(rules)
  assert table["act_batch"] == ("data", "fsdp") and table["act_seq"] == "context"
  assert table["act_temb"] == "tensor" and table["act_embed"] is None and table["act_mlp"] == "tensor"
  assert "batch" not in table and table["embed"] == ("fsdp", "context")


def test_an_accelerator_mesh_that_falls_back_to_row_major_order_says_why_once(monkeypatch):
  from sora_jax.parallel import mesh as mesh_module

  class FakeGpu:
    platform, device_kind = "gpu", "Fake GPU"

    def __init__(self, index):
      self.id = index

  def unknown_topology(*args, **kwargs):
    raise ValueError("no physical layout for a 2x2 mesh of these devices")

  warnings = []
  monkeypatch.setattr(mesh_module.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
  monkeypatch.setattr(mesh_module.mesh_utils, "create_device_mesh", unknown_topology)
  devices = [FakeGpu(index) for index in range(4)]
  for _ in range(2):
    layout = mesh_module._layout([2, 2], [1, 1], devices)  # noqa: SLF001
  assert [d.id for d in layout.reshape(-1)] == [0, 1, 2, 3]
  assert len(warnings) == 1 and "4 Fake GPU devices" in warnings[0] and "no physical layout" in warnings[0]
  mesh_module._layout([2, 2], [1, 1], jax.devices()[:4])  # noqa: SLF001
  assert len(warnings) == 1  # CPU devices have no topology to follow: nothing to warn about
