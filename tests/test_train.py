"""Training stage: single-process runs of `python -m pipeline.train` on a synthetic store,
resume after kill -9 and SIGTERM, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.store import ActivationStoreWriter, StoreLayout, commit

REPO = Path(__file__).resolve().parent.parent


def synthetic_store(url: str, n_rows: int = 2048, d_model: int = 16, seed: int = 0, scale: float = 3.0,
                    nan_row: int | None = None) -> str:
    """A committed store of sparse-ish synthetic activations: a mean plus a few of 48 random
    directions per row, the way an SAE's data looks (rows_per_context 32)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, d_model, generator=g)
    codes = torch.rand(n_rows, 48, generator=g) * (torch.rand(n_rows, 48, generator=g) < 0.1)
    x = scale * (codes @ dirs + 0.5 * torch.randn(d_model, generator=g) + 0.05 * torch.randn(n_rows, d_model, generator=g))
    if nan_row is not None:
        x[nan_row] = float("nan")
    rows_per_context = 32
    layout = StoreLayout(("blocks.0",), d_model, "float32", n_rows // rows_per_context, rows_per_context, 16, 8)
    w = ActivationStoreWriter(url, layout, {"fingerprint": f"synthetic-{seed}", "model": {"id": "synthetic"}})
    ctx = torch.arange(n_rows) // rows_per_context
    for shard in range(layout.n_shards):
        span = layout.shard_contexts_range(shard)
        rows = slice(span.start * rows_per_context, span.stop * rows_per_context)
        w.begin_shard(shard)
        w.append({"blocks.0": x[rows]}, torch.zeros(rows.stop - rows.start, dtype=torch.int32), ctx[rows],
                 torch.arange(rows.start, rows.stop) % rows_per_context)
        w.end_shard(len(span))
    w.close()
    assert commit(w) is not None
    return url


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, check: bool = True, **kw):
    """`python -m pipeline.train` as users run it (under torchrun when nproc > 1)."""
    launcher = [sys.executable, "-m", "pipeline.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "pipeline.train"]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    flags = [a for a in args if a.startswith("--")]  # Hydra's flags come before the overrides
    args = [a for a in args if not a.startswith("--")]
    p = subprocess.run(launcher + flags + ["hydra.output_subdir=null", "hydra/job_logging=none",
                                   "hydra/hydra_logging=none", "progress=false", *args],
                       cwd=REPO, env=e, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p
