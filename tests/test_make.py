"""The Makefile's stage targets: `make help` lists them, and each passes ARGS as Hydra overrides."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".venv/.setup-done"  # treated as up to date: these tests never (re)install anything


def make(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-o", STAMP, *argv], cwd=ROOT, capture_output=True,
                          text=True, **kw)


def help_targets() -> dict[str, str]:
    out = make("help")
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"^  make (\S+)\s+(.*)$", out.stdout, re.M))


def test_make_help_lists_the_targets():
    targets = help_targets()
    for t in ("setup", "demo", "test", "cache", "evaluate", "steer", "publish", "slurm", "docker", "bench", "clean"):
        assert t in targets, f"`make help` does not list {t}: {sorted(targets)}"


STAGE_TARGETS = [t for t in ("cache", "train", "evaluate", "interpret", "steer", "audit", "publish", "plan")
                 if (ROOT / "Makefile").read_text().count(f"\n{t}: ")]


@pytest.mark.parametrize("stage", STAGE_TARGETS)
def test_each_stage_target_passes_args_as_hydra_overrides(stage):
    out = make("-n", stage, "PY=py", "ARGS=a.b=1 +c=[2,3]")
    assert out.returncode == 0, out.stderr
    assert f"py -m pipeline.{stage} a.b=1 +c=[2,3]" in out.stdout.splitlines(), out.stdout
    assert stage in help_targets()


def test_slurm_target_passes_args_to_pipeline_sh():
    out = make("-n", "slurm", "ARGS=--stages cache cache:n_tokens=5")
    assert "slurm/pipeline.sh --stages cache cache:n_tokens=5" in out.stdout
