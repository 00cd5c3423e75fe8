"""The Makefile's stage targets: `make help` lists them, and each passes ARGS as Hydra overrides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


STAGE_TARGETS = [t for t in ("cache", "train", "evaluate", "interpret", "steer", "publish", "plan", "sweep")
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


def test_make_cache_runs_the_stage_with_the_overrides(tiny_model_dir, text_dir, tmp_path):
    from pipeline.store import ActivationStore
    url = tmp_path / "acts"
    args = (f"model.name={tiny_model_dir} model.device=cpu data=files data.path=[{text_dir}/*] hooks=[layers.2] "
            f"context_size=32 n_tokens=200 store.chunk_contexts=2 store.shard_contexts=4 store.url={url} progress=false")
    out = make("cache", f"PY={sys.executable}", f"ARGS={args}", env={**os.environ, "PIPELINE_RUNS": str(tmp_path / "runs")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert ActivationStore.open(str(url)).n_tokens >= 200
