"""Equivalence of layouts: for every architecture, training with feature_parallel = 2 and 3
(32 features: shards of 11, 11, 10), data_parallel = 2, 2 x 2 (ZeRO-1, and ZeRO-2), and 2 feature
shards whose encoders run in tiles of 5 (sae.feature_tile), launched
with torchrun as users launch it, gives the same losses and final weights as a single process
with the same global batch, within 1e-5 relative (fp32, gloo, global-norm clipping on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.sae import ARCHITECTURES, load
from test_train import run_train, synthetic_store

pytestmark = pytest.mark.slow

LAYOUTS = {"fp2": (1, 2), "fp3": (1, 3), "dp2": (2, 1), "2x2": (2, 2), "2x2-zero2": (2, 2), "fp2-tile5": (1, 2)}
EXTRA = {"2x2-zero2": ["deepspeed.zero_stage=2"],
         "fp2-tile5": ["sae.feature_tile=5"]}  # encoder in tiles of 5 of each 16-feature shard
STEPS = 6
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One launch per layout, training all four architectures in one Hydra multirun."""
    root = tmp_path_factory.mktemp("layouts")
    store = synthetic_store(str(root / "store"))
    common = ["--multirun", "sae=" + ",".join(ARCHITECTURES), f"data.url={store}", "sae.n_features=32", "sae.k=4", "sae.k_aux=8", "sae.dead_tokens=32",
              "sae.sparsity_coef=0.1", "sae.threshold_init=0.5", "sae.bandwidth=0.5",
              f"n_tokens={32 * STEPS}", "batch_size=32", "log_every=1", "checkpoint_every=0", "optim.lr=0.003",
              "optim.sparsity_warmup_fraction=0.5", "optim.gradient_clipping=1.0", "deepspeed.zero_stage=1",
              "data.same_batches_at_any_layout=true", f"hydra.sweep.dir={root / 'hydra'}"]
    out = {}
    for name, (dp, fp) in {"single": (1, 1), **LAYOUTS}.items():
        out[name] = root / name
        run_train(common + EXTRA.get(name, []) + [f"out_dir={out[name]}/${{sae.architecture}}", f"parallel.data_parallel={dp}",
                                   f"parallel.feature_parallel={fp}"], nproc=dp * fp, timeout=600)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_matches_single_process(runs, layout, arch):
    ref, got = metrics(runs["single"] / arch), metrics(runs[layout] / arch)
    assert len(ref) == len(got) == STEPS
    for r, g in zip(ref, got):
        for key in ("loss", "mse", "sparsity", "aux", "l0", "fvu"):
            assert g[key] == pytest.approx(r[key], rel=RTOL, abs=1e-7), (g["step"], key)
    a, b = load(runs["single"] / arch / "sae"), load(runs[layout] / arch / "sae")
    assert (b.meta["training"]["data_parallel"], b.meta["training"]["feature_parallel"]) == LAYOUTS[layout]
    for name, t in a.state_dict().items():
        if name in ("tokens_since_fired", "threshold_steps"):
            continue
        assert rel(b.state_dict()[name], t) <= RTOL, name
        torch.testing.assert_close(b.state_dict()[name], t, rtol=RTOL, atol=RTOL * t.abs().max().item())


def test_training_moved_the_weights(runs):
    """The comparison means something: the weights changed, AuxK and the sparsity warm-up were active."""
    for arch in ARCHITECTURES:
        m = metrics(runs["single"] / arch)
        assert m[-1]["loss"] != m[0]["loss"]
        if arch in ("topk", "batchtopk"):
            assert any(r["aux"] > 0 for r in m), arch
        if arch in ("relu_l1", "jumprelu"):
            assert m[0]["sparsity"] < m[-1]["sparsity"] or m[0]["l0"] > m[-1]["l0"], arch
