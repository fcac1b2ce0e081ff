"""The package graph of docs/architecture.md, read from the source: layers, and no import cycle.

Every `import` of sora_jax counts, at the top of a module or deferred inside a function. A package
(or top-level module) may import only what sits below it in `LAYERS`; modules inside one package may
import each other but never in a cycle. The `python -m` shims belong to the binaries' layer.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sora_jax")

# Bottom to top. A unit is a package under sora_jax/ or a top-level module; units of one row must
# not import each other.
LAYERS = (
    ("sora_jax", "files", "choices", "patches", "host_malloc", "configs"),  # jax-free leaves
    ("config", "cli"),
    ("parallel",),
    ("model", "diffusion"),
    ("encoders", "language"),
    ("data",),  # the online input pipeline
    ("export",),  # weight formats of the PyTorch ecosystems, read by `train.init_from` too
    ("train",),
    ("offline",),  # prepare, recaption, synthetic data, checkpoint conversion
    ("evaluation",),
    ("tpu_fit",),
    ("main",),  # the binaries, and the `python -m` shims that call them
)
RANK = {unit: rank for rank, row in enumerate(LAYERS) for unit in row}


def _modules():
  """{module name: path} of every module of sora_jax (configs/ is packaged as sora_jax.configs)."""
  found = {}
  for base, prefix in ((PACKAGE, "sora_jax"), (os.path.join(ROOT, "configs"), "sora_jax.configs")):
    for directory, _, files in os.walk(base):
      for name in files:
        if name.endswith(".py"):
          relative = os.path.relpath(os.path.join(directory, name), base)[:-3].replace(os.sep, ".")
          module = prefix if relative == "__init__" else f"{prefix}.{relative.removesuffix('.__init__')}"
          found[module] = os.path.join(directory, name)
  return found


MODULES = _modules()


def _resolve(name):
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name


def imports_of(path):
  """[(imported sora_jax module, line)] of a source file, deferred imports included."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sora_jax":
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.append((full if full in MODULES else _resolve(node.module), node.lineno))
    elif isinstance(node, ast.Import):
      found.extend((_resolve(alias.name), node.lineno) for alias in node.names
                   if alias.name.split(".")[0] == "sora_jax")
  return found


def is_shim(module):
  """A `python -m` entry shim: only `from sora_jax.main.NAME import run` and a call of it."""
  imported = {target for target, _ in imports_of(MODULES[module])}
  return bool(imported) and all(target.startswith("sora_jax.main.") for target in imported)


def unit_of(module):
  if is_shim(module):
    return "main"
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def _edges():
  return [(module, target, line) for module, path in MODULES.items()
          for target, line in imports_of(path) if target and target != module]


def _cycles(graph):
  """Strongly connected components of more than one node (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for successor in sorted(graph.get(node, ())):
      if successor not in index:
        visit(successor)
        low[node] = min(low[node], low[successor])
      elif successor in on_stack:
        low[node] = min(low[node], index[successor])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_every_unit_has_a_layer():
  units = {unit_of(module) for module in MODULES}
  assert units <= set(RANK), f"units missing from LAYERS: {sorted(units - set(RANK))}"


def test_each_unit_imports_only_units_below_it():
  offenders = []
  for module, target, line in _edges():
    source, imported = unit_of(module), unit_of(target)
    if source != imported and RANK[imported] >= RANK[source]:
      offenders.append(f"{os.path.relpath(MODULES[module], ROOT)}:{line} ({source}) imports {target} "
                       f"({imported})")
  assert not offenders, "\n".join(offenders)


def test_no_cycle_between_packages():
  graph = {}
  for module, target, _ in _edges():
    if unit_of(module) != unit_of(target):
      graph.setdefault(unit_of(module), set()).add(unit_of(target))
  assert _cycles(graph) == []


def test_no_cycle_between_modules():
  graph = {}
  for module, target, _ in _edges():
    graph.setdefault(module, set()).add(target)
  assert _cycles(graph) == []


def test_shims_are_two_lines_of_code():
  shims = sorted(module for module in MODULES if is_shim(module))
  assert "sora_jax.data.synthetic" in shims and "sora_jax.train.__main__" in shims
  for module in shims:
    with open(MODULES[module], encoding="utf-8") as f:
      tree = ast.parse(f.read())
    code = [node for node in tree.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert len(code) == 2, f"{module} is not a shim: {len(code)} statements"


def test_the_checks_see_deferred_imports_and_cycles(tmp_path):
  path = tmp_path / "module.py"
  path.write_text("def f():\n  from sora_jax.train import loop\n")
  assert imports_of(str(path)) == [("sora_jax.train.loop", 2)]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_the_documented_layering_is_the_enforced_one(doc):
  with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
    text = f.read()
  rows = [" ".join(f"`{unit}`" for unit in row) for row in LAYERS]
  for row in rows:
    assert row in text, f"{doc} does not list the layer {row}"
