"""The view across checkpoints: one table of steps x metrics and a curve of each metric against the step.

Owns which numbers of a step's results are metrics (`metrics`: val loss, FVD, CLIP score and
consistency, adherence overall), the table `eval --all` prints, and W/eval/<metric>_vs_step.png.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sora_jax.evaluation import media, sample_scores

COLUMNS = ("val_loss", "fvd", "clip_score", "clip_consistency", "adherence")


def metrics(entry: dict[str, Any]) -> dict[str, float]:
  """The metrics of one weight set's results (those it has)."""
  values = {"val_loss": entry["loss"]}
  values.update({k: v for k, v in sample_scores.scalars(entry).items() if k in COLUMNS})
  overall = (entry.get("adherence") or {}).get("overall")
  if overall is not None:
    values["adherence"] = overall
  return values


def table(results: Sequence[dict[str, Any]]) -> str:
  """Steps x metrics, one row per (step, weight set), the columns any step has."""
  rows = [(r["step"], name, metrics(entry)) for r in sorted(results, key=lambda r: r["step"])
          for name, entry in r["weight_sets"].items()]
  if not rows:
    return ""
  columns = [c for c in COLUMNS if any(c in values for _, _, values in rows)]
  width = max(len("weights"), *(len(name) for _, name, _ in rows))
  lines = [f"{'step':>8}  {'weights':<{width}}  " + "  ".join(f"{c:>16}" for c in columns)]
  for step, name, values in rows:
    cells = [f"{values[c]:>16.4f}" if c in values else f"{'-':>16}" for c in columns]
    lines.append(f"{step:>8}  {name:<{width}}  " + "  ".join(cells))
  return "\n".join(lines)


def write_curves(workdir: str, results: Sequence[dict[str, Any]]) -> dict[str, str]:
  """W/eval/<metric>_vs_step.png for each metric measured at two or more steps; {metric: path}."""
  results = sorted(results, key=lambda r: r["step"])
  steps = [r["step"] for r in results]
  names = sorted({name for r in results for name in r["weight_sets"]})
  paths = {}
  for column in COLUMNS:
    curves = {name: [metrics(r["weight_sets"][name]).get(column) if name in r["weight_sets"] else None
                     for r in results] for name in names}
    if sum(value is not None for values in curves.values() for value in values) < 2:
      continue
    path = os.path.join(workdir, "eval", f"{column}_vs_step.png")
    media.write_curves(path, steps, curves, xlabel="step", ylabel=column, title=f"{column} by checkpoint")
    paths[column] = path
  return paths
