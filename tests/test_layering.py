"""The package layering of docs/architecture.md, read from the source: which packages may import which."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sora_jax")

# package -> sora_jax packages its modules must never import (at the top or deferred inside a function)
FORBIDDEN = {
    "model": ("data", "train", "encoders", "evaluation", "export"),
    "diffusion": ("data", "train", "encoders", "evaluation", "export"),
    "encoders": ("model", "train", "evaluation", "export"),
    "data": ("train", "model", "evaluation", "export"),
    "parallel": ("data", "train", "encoders", "evaluation", "export"),
    # Talking to language models needs nothing of the trainer: recaption, sample and eval use it.
    "language": ("data", "train", "model", "diffusion", "encoders", "evaluation", "export", "parallel"),
}


# Modules of a forbidden package that a layer may still use: the numpy-only safetensors reader.
SHARED_MODULES = {"sora_jax.export.safetensors_io"}


def _imported_packages(path):
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sora_jax."):
      modules = [f"{node.module}.{alias.name}" for alias in node.names]
      if not all(module in SHARED_MODULES for module in modules):
        yield node.module.split(".")[1], node.lineno
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("sora_jax.") and alias.name not in SHARED_MODULES:
          yield alias.name.split(".")[1], node.lineno


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package):
  offenders = []
  directory = os.path.join(PACKAGE, package)
  for name in sorted(os.listdir(directory)):
    if name.endswith(".py"):
      for imported, line in _imported_packages(os.path.join(directory, name)):
        if imported in FORBIDDEN[package]:
          offenders.append(f"sora_jax/{package}/{name}:{line} imports sora_jax.{imported}")
  assert not offenders, offenders


def test_the_layering_check_sees_deferred_imports(tmp_path):
  path = tmp_path / "module.py"
  path.write_text("def f():\n  from sora_jax.train import loop\n")
  assert list(_imported_packages(str(path))) == [("train", 2)]
