"""Generated docs sections: every one has a bench script that writes it, and `make bench-docs` runs it.

docs/ pages hold measured figures only between `<!-- NAME:begin -->` / `<!-- NAME:end -->` markers that
a script in bench/ rewrites from its results file (bench/docs_section.py); these checks keep a new
section or a new docs-writing benchmark from drifting out of `make bench-docs`.
"""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"<!-- (\S+):begin -->")


def _bench_docs_recipe() -> list[str]:
  """The command lines of the Makefile's bench-docs target."""
  lines = (REPO / "Makefile").read_text().splitlines()
  start = lines.index("bench-docs: install") + 1
  recipe = []
  for line in lines[start:]:
    if not line.startswith(("\t", " ")):
      break
    recipe.append(line.strip())
  return recipe


def test_every_section_is_closed_once():
  for page in sorted((REPO / "docs").glob("*.md")):
    text = page.read_text()
    names = BEGIN.findall(text)
    assert len(names) == len(set(names)), f"{page.name}: a section appears twice"
    for name in names:
      begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
      assert text.count(end) == 1 and text.index(begin) < text.index(end), f"{page.name}: {name}"


def test_every_section_has_a_bench_script_that_writes_it():
  sources = "".join(path.read_text() for path in (REPO / "bench").glob("*.py"))
  recipe = "\n".join(_bench_docs_recipe())
  for page in sorted((REPO / "docs").glob("*.md")):
    for name in BEGIN.findall(page.read_text()):
      # A section is named in its script, after the results file bench-docs passes it, or after the
      # tpu_fit study bench-docs runs.
      study = name.removeprefix("tpu_fit_")
      assert (f'"{name}"' in sources or f"/{name}.json" in recipe
              or f"--study={study} --write_docs" in recipe), f"{page.name}: nothing writes {name}"


def test_every_docs_writing_bench_script_is_in_bench_docs():
  recipe = _bench_docs_recipe()
  writers = sorted(path.name for path in (REPO / "bench").glob("*.py")
                   if "docs_section.write(" in path.read_text())
  assert writers, "no bench script writes docs"
  for script in writers:
    runs = [line for line in recipe if f"bench/{script}" in line]
    assert any("--write" in line for line in runs), f"make bench-docs does not rewrite {script}'s section"
