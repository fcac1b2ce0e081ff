"""Writes a benchmark's report into a docs page between its `<!-- NAME:begin/end -->` markers.

Every bench script's `--write_docs` goes through `write(name, text)`: the section between the markers
is replaced (or appended with its markers when the page has none yet), the rest of the page is kept.
"""

import os

_DOCS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
DOCS = os.path.join(_DOCS_DIR, "benchmarks.md")
SCALING = os.path.join(_DOCS_DIR, "scaling.md")
RECIPE = os.path.join(_DOCS_DIR, "recipe.md")
DATA = os.path.join(_DOCS_DIR, "data.md")
RELIABILITY = os.path.join(_DOCS_DIR, "reliability.md")


def write(name: str, text: str, path: str = DOCS) -> None:
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  with open(path, encoding="utf-8") as f:
    page = f.read()
  section = f"{begin}\n{text.strip()}\n{end}"
  if begin in page and end in page:
    page = page[:page.index(begin)] + section + page[page.index(end) + len(end):]
  else:
    page = page.rstrip("\n") + "\n\n" + section + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  print(f"wrote the {name} section of {path}")
