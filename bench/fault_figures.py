"""Resilience figures of the multi-process fault tests: the docs/reliability.md "Figures" table.

Runs tests/test_faults.py (gloo processes on this CPU host) with $SORA_JAX_FAULT_FIGURES set, so each
test appends what it measured: steps lost (newest logged step at the fault minus the step the restart
resumes from), seconds from the fault until a survivor exits (`detect_s`), and seconds from the
restart's launch until it logs its first new step (`resume_s`: start-up, restore and compile of the
tiny model). Writes the records as JSON and prints them as a markdown table. Run it on a quiet
machine: the detection times depend on `train.peer_timeout_s` (15-20 s in the tests), the resume
times on the CPU.

  python bench/fault_figures.py [--out=bench/results/fault_figures.json]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("steps_lost", "detect_s", "resume_s", "kill_to_end_s", "peer_timeout_s")


def run_fault_tests(figures_path: str) -> int:
  env = dict(os.environ, SORA_JAX_FAULT_FIGURES=figures_path)
  command = [sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
             os.path.join(REPO, "tests", "test_faults.py")]
  return subprocess.run(command, cwd=REPO, env=env, check=False).returncode


def table(records: list[dict]) -> str:
  lines = ["| fault | passed | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
  for record in records:
    cells = ["" if record.get(key) is None else str(record[key]) for key in COLUMNS]
    lines.append(f"| {record['test']} | {record['passed']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "fault_figures.json"))
  args = parser.parse_args()
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as scratch:
    figures_path = os.path.join(scratch, "figures.jsonl")
    started = time.time()
    returncode = run_fault_tests(figures_path)
    records = []
    if os.path.exists(figures_path):
      with open(figures_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
  # A test records its figures as its last act, after every assertion: a record means it passed.
  for record in records:
    record["passed"] = True
  result = {
      "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
      "load_before": round(load_before, 2),
      "load_after": round(os.getloadavg()[0], 2),
      "pytest_returncode": returncode,
      "wall_s": round(time.time() - started, 1),
      "records": records,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(table(records))
  print(f"load {result['load_before']} -> {result['load_after']}; pytest exit {returncode}; "
        f"{len(records)} tests recorded figures; written to {args.out}")
  sys.exit(returncode)


if __name__ == "__main__":
  main()
