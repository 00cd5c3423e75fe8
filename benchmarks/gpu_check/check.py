"""The device check (benchmarks/gpu_check.sh): on a machine with one NVIDIA GPU, within 8 minutes
in all, install what the check needs, measure, run the GPU-marked tests, and print one JSON
summary (also written to OUT/summary.json; each step's output is in OUT/<step>.out and .err).

    benchmarks/gpu_check.sh [--dry-run] [--venv .venv-gpu] [--torch-spec SPEC] [--out runs/gpu_check]

--dry-run prints every step it would run, resolved (command, environment, time budget), and runs
nothing: it needs no GPU. --venv: the virtual environment made (or reused) by `make setup`; one
that already holds a CUDA torch keeps it with --torch-spec torch. --torch-spec: what `make setup`
installs as torch (default: the Makefile's pin; on Linux the registry's wheels of it are CUDA
builds). Standard library only: it runs before the environment exists. Exit status 0 when every
step ran and passed and every target was met, 1 otherwise (the summary says which)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from steps import DEADLINE_S, ROOT, Step, makefile_torch_spec, plan
from summary import StepResult, summarize


def main() -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the resolved steps, run nothing")
    ap.add_argument("--venv", default=".venv-gpu", help="virtual environment for the check (relative: to the checkout)")
    ap.add_argument("--torch-spec", default=None, help="pip spec of torch for `make setup` (default: the Makefile's)")
    ap.add_argument("--out", default="runs/gpu_check", help="output folder (relative: to the checkout)")
    ap.add_argument("--deadline", type=int, default=DEADLINE_S, help="seconds for all steps together")
    a = ap.parse_args()
    venv, out = (ROOT / a.venv).resolve(), (ROOT / a.out).resolve()
    steps = plan(venv, a.torch_spec or makefile_torch_spec(), out)
    if a.dry_run:
        print(f"gpu_check: {len(steps)} steps in {ROOT}, within {a.deadline} s in all, outputs in {out}")
        for i, s in enumerate(steps, 1):
            print(f"step {i}/{len(steps)} {s.name} (at most {s.budget_s} s): {s.what}\n  {command_line(s)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results = run(steps, out, time.monotonic() + a.deadline)
    doc = summarize(results, out)
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    passed = all(r.status == "ok" for r in results.values()) and not (doc["tests"] or {}).get("failed")
    return 0 if passed and all(t["met"] for t in doc.get("targets", {}).values()) else 1


def command_line(s: Step) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in s.env.items()), shlex.join(s.argv)])


def run(steps: list[Step], out: Path, deadline: float) -> dict[str, StepResult]:
    """Each step in turn, within its budget and the time left; after a failed setup or probe the
    rest cannot run (no environment, or no GPU)."""
    results: dict[str, StepResult] = {}
    blocked = None
    for s in steps:
        stdout = out / f"{s.name}.out"
        left = deadline - time.monotonic()
        if blocked or left < 1:
            results[s.name] = StepResult(f"not run: {blocked or 'out of time'}", 0.0, stdout)
            continue
        log(f"{s.name}: {command_line(s)}")
        t = time.monotonic()
        with open(stdout, "w") as o, open(out / f"{s.name}.err", "w") as e:
            try:
                p = subprocess.run(s.argv, cwd=ROOT, env={**os.environ, **s.env}, stdout=o, stderr=e,
                                   timeout=min(s.budget_s, left))
                status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode}; see {e.name})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {min(s.budget_s, left):.0f} s"
        results[s.name] = StepResult(status, time.monotonic() - t, stdout)
        log(f"{s.name}: {status} ({results[s.name].seconds:.1f} s)")
        if status != "ok" and s.name in ("setup", "probe"):
            blocked = f"the {s.name} step did not pass"
    return results


def log(line: str) -> None:
    print(f"gpu_check: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
