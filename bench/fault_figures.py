"""Resilience figures of the multi-process fault tests: the docs/reliability.md "Figures" table.

Runs tests/test_faults.py (gloo processes on this CPU host) with $SORA_JAX_FAULT_FIGURES set, so each
test appends what it measured: steps lost (newest logged step at the fault minus the step the restart
resumes from), seconds from the fault until a survivor exits (`detect_s`), and seconds from the
restart's launch until it logs its first new step (`resume_s`: start-up, restore and compile of the
tiny model). Writes the records as JSON and prints them as a markdown table. Run it on a quiet
machine: the detection times depend on `train.peer_timeout_s` (15-20 s in the tests), the resume
times on the CPU.

  python bench/fault_figures.py [--out=bench/results/fault_figures.json] [--write_docs]
                                [--from_results=bench/results/fault_figures.json]

`--write_docs` puts the table in docs/reliability.md's `fault_figures` section; `--from_results` renders
a results file without running the tests.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import docs_section  # bench/, beside this script

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


# What each recording test injects, and what its steps-lost figure counts.
_FAULTS = {
    "sigkill_worker": ("SIGKILL of process 1 of 2 (worker)", "(`checkpoint.every_steps=2`)"),
    "sigkill_coordinator": ("SIGKILL of process 0 (coordinator)", ""),
    "launcher_restart": ("SIGKILL under the launcher, `MAX_RESTARTS=1`", ""),
    "sigterm_one_host": ("SIGTERM to one process", "(the agreed step is saved)"),
    "sigkill_during_async_save": ("SIGKILL during an async save",
                                  "(`every_steps=1`: the step being written)"),
    "nonfinite_one_host": ("non-finite gradients on one host, rollback", "updates (rolled back)"),
}


def report(result: dict) -> str:
  """The docs/reliability.md "Figures" section: conditions, then one row per fault."""
  records = result["records"]
  timeouts = sorted({r["peer_timeout_s"] for r in records if r.get("peer_timeout_s") is not None})
  lines = [
      f"Measured on {result['machine']} (load {result['load_before']} -> {result['load_after']} during the "
      f"run, so the seconds are upper bounds), tiny model, gloo"
      f"{', `train.peer_timeout_s=' + '/'.join(str(t) for t in timeouts) + '`' if timeouts else ''}; "
      f"pytest exit {result['pytest_returncode']}.",
      "",
      "| fault | passed | steps lost | detect (s) | resume (s) |",
      "|---|---|---|---|---|",
  ]
  for record in records:
    name, lost_note = _FAULTS.get(record["test"], (record["test"], ""))
    lost = "" if record.get("steps_lost") is None else f"{record['steps_lost']} {lost_note}".strip()
    detect = record.get("detect_s", "")
    if record.get("kill_to_end_s") is not None:
      detect = (f"{record['kill_to_end_s']} from the kill to the end of the restarted job (detect, restart, "
                f"the remaining steps)")
    resume = record.get("resume_s", "")
    lines.append(f"| {name} | {'yes' if record['passed'] else 'no'} | {lost} | {detect} | {resume} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "fault_figures.json"))
  parser.add_argument("--write_docs", action="store_true")
  parser.add_argument("--from_results", default=None, help="render this results file instead of measuring")
  args = parser.parse_args()
  if args.from_results:
    with open(args.from_results, encoding="utf-8") as f:
      result = json.load(f)
  else:
    result = measure(args.out)
  text = report(result)
  print(text)
  # A failed run's figures lack the tests that failed: they stay in its results file, not the docs.
  if args.write_docs and result["pytest_returncode"] == 0:
    docs_section.write("fault_figures", text, docs_section.RELIABILITY)
  sys.exit(result["pytest_returncode"])


def measure(out: str) -> dict:
  """Runs the fault tests with figure recording on; writes and returns the results."""
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
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(table(records))
  print(f"{len(records)} tests recorded figures; written to {out}")
  return result


if __name__ == "__main__":
  main()
