"""The binaries' layout: sora_jax/main holds them; `python -m`, the console scripts and a wheel reach them."""

import ast
import configparser
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "sora_jax")

# binary module in sora_jax/main -> (documented `python -m` module, console script, a flag it owns)
BINARIES = {
    "train": ("sora_jax.train", "sora-train", "--coordinator_address"),
    "eval": ("sora_jax.eval", "sora-eval", "--watch"),
    "sample": ("sora_jax.sample", "sora-sample", "--prompt"),
    "prepare": ("sora_jax.prepare", "sora-prepare", "--captions"),
    "export": ("sora_jax.export", "sora-export", "--import_from"),
    "compile": ("sora_jax.compile", "sora-compile", "--topology"),
    "recaption": ("sora_jax.recaption", "sora-recaption", "--captions"),
    "demo": ("sora_jax.demo", "sora-demo", "--num_videos"),
    "synthetic": ("sora_jax.data.synthetic", "sora-synthetic", "--num_videos"),
}


def test_every_binary_module_is_listed():
  modules = {name[:-3] for name in os.listdir(os.path.join(PACKAGE, "main"))
             if name.endswith(".py") and name != "__init__.py"}
  assert modules == set(BINARIES)


def _help(command):
  return subprocess.run([*command, "--help"], capture_output=True, text=True, check=False, timeout=300,
                        env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_python_m_and_the_console_script_reach_the_binary(binary):
  module, script, flag = BINARIES[binary]
  script_path = os.path.join(os.path.dirname(sys.executable), script)
  if not os.path.exists(script_path):
    pytest.fail(f"{script_path} is missing: `make install` (pip install -e .) writes the console scripts")
  with open(os.path.join(PACKAGE, "main", f"{binary}.py"), encoding="utf-8") as f:
    usage = ast.get_docstring(ast.parse(f.read())).splitlines()[0]
  for command in ([sys.executable, "-m", module], [script_path]):
    result = _help(command)  # absl's --help exits 1
    assert result.returncode == 1 and not result.stderr, result.stderr
    assert usage in result.stdout and flag in result.stdout, result.stdout[:2000]


def _sora_jax_imports(tree):
  """(module, line) of every sora_jax.main import, outside `if __name__ == "__main__":` blocks."""
  guarded = set()
  for node in ast.walk(tree):
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
      guarded.update(id(child) for child in ast.walk(node))
  for node in ast.walk(tree):
    if id(node) in guarded:
      continue
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sora_jax.main"):
      yield node.module, node.lineno
    elif isinstance(node, ast.Import):
      yield from ((alias.name, node.lineno) for alias in node.names if alias.name.startswith("sora_jax.main"))


def _shim_paths():
  for binary, (module, _, _) in BINARIES.items():
    relative = module.replace(".", "/")
    path = os.path.join(REPO, relative + ".py")
    yield binary, path if os.path.exists(path) else os.path.join(REPO, relative, "__main__.py")


def test_library_code_never_imports_a_binary():
  shims = {path for _, path in _shim_paths()}
  offenders = []
  for root, _, names in os.walk(PACKAGE):
    if os.path.basename(root) == "main" or "__pycache__" in root:
      continue
    for name in names:
      path = os.path.join(root, name)
      if name.endswith(".py") and path not in shims:
        with open(path, encoding="utf-8") as f:
          tree = ast.parse(f.read(), path)
        offenders += [f"{os.path.relpath(path, REPO)}:{line} imports {module}"
                      for module, line in _sora_jax_imports(tree)]
  assert not offenders, offenders


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_a_python_m_module_is_a_shim_or_runs_the_binary_under_its_main_guard(binary):
  path = dict(_shim_paths())[binary]
  with open(path, encoding="utf-8") as f:
    source = f.read()
  assert f"sora_jax.main import {binary}" in source or f"sora_jax.main.{binary} import run" in source
  if f"sora_jax.main.{binary} import run" in source:  # a shim holds nothing else: no flags, no logic
    statements = ast.parse(source).body
    assert len(statements) == 3, f"{path}: a shim is a docstring, the import and the __main__ guard"


def test_a_wheel_carries_every_package_config_and_console_script(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(REPO, name), source / name)
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
  shutil.copytree(PACKAGE, source / "sora_jax", ignore=ignore)
  shutil.copytree(os.path.join(REPO, "configs"), source / "configs", ignore=ignore)
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
       f"--wheel-dir={tmp_path / 'wheel'}", str(source)],
      capture_output=True, text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  (wheel,) = (tmp_path / "wheel").iterdir()
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    scripts = configparser.ConfigParser()
    scripts.read_string(archive.read(entry_points).decode())
  packages = {os.path.relpath(os.path.join(root, "__init__.py"), REPO)
              for root, _, files in os.walk(PACKAGE) if "__init__.py" in files}
  assert packages <= names, sorted(packages - names)
  assert "sora_jax/configs/base.py" in names and "sora_jax/configs/wan_1_3b.py" in names
  assert dict(scripts["console_scripts"]) == {
      script: f"sora_jax.main.{binary}:run" for binary, (_, script, _) in BINARIES.items()}

