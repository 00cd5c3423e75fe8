"""SAELens's side of the interop tests: a script run by `.venv-saelens/bin/python`, the venv
`make setup-saelens` makes (SAELens brings transformer-lens, wandb and more: it stays out of .venv).
Tests that need it skip only where that venv is absent; CI (.ci/run) makes it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-saelens" / "bin" / "python"


def run_saelens(script: str, args: dict, env: dict | None = None, timeout: int = 600) -> str:
    """Run `script` in the SAELens venv with `args` as JSON in sys.argv[1]; its stdout. Fails the test
    on a non-zero exit, with SAELens's traceback."""
    if not PYTHON.is_file():
        pytest.skip("SAELens venv .venv-saelens is absent: run make setup-saelens")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    clean.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled", **(env or {})})
    p = subprocess.run([str(PYTHON), "-c", script, json.dumps(args)], env=clean, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"SAELens side failed:\n{p.stderr[-4000:]}"
    return p.stdout
