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


# bf16 (deepspeed.precision=bf16: bf16 weights and activations, fp32 masters, gradients, loss;
# pipeline/train/engine.py). The same comparison against one process, over 1x2 feature-parallel
# and 2x1 data-parallel. A layout changes the order of reductions whose results are rounded to bf16
# (a shard's partial x_hat before the feature all-reduce, a rank's half-batch pre-activations and
# gradients): each is off by up to half a bf16 ulp, 2^-9 ~ 2e-3 relative, where fp32's is 2^-24.
# Through Adam (early steps ~lr * sign(g) whatever g's size) and through topk/batchtopk selections
# that a near-tie resolves differently (a latent gains or loses a token for a step), these grow to
# a few bf16 ulps of the weights' scale in STEPS steps: measured at most ~3 ulps (1.2e-2) in the
# norm of the difference (batchtopk's b_enc) and ~9 ulps (0.035) of a tensor's largest entry
# elementwise. Hence BF16_RTOL = 8 ulps = 2^-5 for the relative norm and the fp32-computed metrics
# (fp32's RTOL scaled by the epsilon ratio would be 2^16 * 1e-5 ~ 0.65: far looser than needed),
# and 16 ulps (2^-4) of the tensor's largest entry elementwise. l0 counts latents over a threshold,
# which one flipped near-tie moves by 1/32 (32 tokens a step): measured 2/32, allowed 0.1.
# On CUDA (marked gpu: benchmarks/gpu_check.sh runs it) the same runs train on the GPU: cuBLAS's bf16
# matmuls also accumulate in fp32 and round once, so the same tolerances hold. Two ranks on one GPU
# talk over gloo (nccl needs a GPU per rank, pipeline/parallel.py), on two GPUs or more over nccl.
BF16_LAYOUTS = {"fp2": (1, 2), "dp2": (2, 1)}
BF16_RTOL = 2 ** -5


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def bf16_runs(request, tmp_path_factory) -> dict[str, Path]:
    device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU variant runs everywhere)")
    root = tmp_path_factory.mktemp(f"layouts-bf16-{device}")
    store = synthetic_store(str(root / "store"))
    common = ["--multirun", "sae=" + ",".join(ARCHITECTURES), f"data.url={store}", "sae.n_features=32", "sae.k=4",
              "sae.k_aux=8", "sae.dead_tokens=32", "sae.sparsity_coef=0.1", "sae.threshold_init=0.5",
              "sae.bandwidth=0.5", f"n_tokens={32 * STEPS}", "batch_size=32", "log_every=1", "checkpoint_every=0",
              "optim.lr=0.003", "optim.sparsity_warmup_fraction=0.5", "optim.gradient_clipping=1.0",
              "deepspeed.zero_stage=1", "deepspeed.precision=bf16", "data.same_batches_at_any_layout=true",
              f"device={device}", f"hydra.sweep.dir={root / 'hydra'}"]
    out = {}
    for name, (dp, fp) in {"single": (1, 1), **BF16_LAYOUTS}.items():
        out[name] = root / name
        run_train(common + [f"out_dir={out[name]}/${{sae.architecture}}", f"parallel.data_parallel={dp}",
                            f"parallel.feature_parallel={fp}"], nproc=dp * fp, timeout=600)
    return out


@pytest.mark.parametrize("layout", BF16_LAYOUTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_layout_matches_single_process(bf16_runs, layout, arch):
    ref, got = metrics(bf16_runs["single"] / arch), metrics(bf16_runs[layout] / arch)
    assert len(ref) == len(got) == STEPS
    assert ref[-1]["loss"] != ref[0]["loss"]
    for r, g in zip(ref, got):
        for key in ("loss", "mse", "sparsity", "aux", "fvu"):
            assert g[key] == pytest.approx(r[key], rel=BF16_RTOL, abs=1e-4), (g["step"], key)
        assert g["l0"] == pytest.approx(r["l0"], abs=0.1), (g["step"], "l0")
    a, b = load(bf16_runs["single"] / arch / "sae"), load(bf16_runs[layout] / arch / "sae")
    assert (b.meta["training"]["data_parallel"], b.meta["training"]["feature_parallel"]) == BF16_LAYOUTS[layout]
    for name, t in a.state_dict().items():
        if name in ("tokens_since_fired", "threshold_steps"):
            continue
        assert rel(b.state_dict()[name], t) <= BF16_RTOL, name
        torch.testing.assert_close(b.state_dict()[name], t, rtol=BF16_RTOL, atol=2 ** -4 * t.abs().max().item())


FVU_MARGIN = 0.02


def test_bf16_heldout_fvu_matches_fp32(tmp_path):
    """bf16 training of a small topk dictionary reaches fp32's held-out FVU within FVU_MARGIN
    (absolute), same data, seed and schedule, in one launch (a Hydra multirun over the precision).
    Rounding alone costs almost nothing: bf16 weights and inputs are within 2^-9 relative of fp32's,
    which adds ~(2^-9)^2 ~ 4e-6 to an FVU. What differs is the trajectory (topk's selection on
    near-ties, rounded activations in the gradients); FVU_MARGIN allows that, ~5% of
    fp32's FVU here (0.387; bf16 measured within 3e-4 of it), while a bf16 run that loses updates (no fp32 masters: ZeRO-0's drift) or
    rounds its loss would fall further behind."""
    store = synthetic_store(str(tmp_path / "store"))
    # evaluated on 1024 rows of the training store: synthetic_store cannot make other rows of the same
    # distribution (another seed moves the directions and the mean), and both precisions see the same ones
    evaluation = store
    run_train(["--multirun", "deepspeed.precision=fp32,bf16", f"data.url={store}", "sae=topk", "sae.n_features=32",
               "sae.k=4", "sae.k_aux=8", "sae.dead_tokens=64", "batch_size=64", f"n_tokens={64 * 64}",
               "optim.lr=0.003", "log_every=16", "checkpoint_every=0", f"heldout_url={evaluation}",
               "heldout_tokens=1024", f"out_dir={tmp_path}/${{deepspeed.precision}}",
               f"hydra.sweep.dir={tmp_path / 'hydra'}"], timeout=600)
    fp32, bf16 = (json.loads((tmp_path / p / "heldout.json").read_text())["fvu"] for p in ("fp32", "bf16"))
    assert fp32 < 0.5, fp32  # it learned something: the comparison means something
    assert abs(bf16 - fp32) <= FVU_MARGIN, (bf16, fp32)


def test_bf16_without_fp32_masters_is_refused():
    """bf16 with ZeRO-0 (no fp32 master weights) is a ConfigError naming the fix, also when `auto`
    resolves to bf16 (CUDA), before DeepSpeed's own NotImplementedError."""
    from pipeline.errors import ConfigError
    from pipeline.train.config import DeepSpeedConfig, TrainConfig
    from pipeline.train.engine import deepspeed_config
    with pytest.raises(ConfigError, match="zero_stage=1"):
        DeepSpeedConfig(zero_stage=0, precision="bf16")
    cfg = TrainConfig(deepspeed=DeepSpeedConfig(zero_stage=0))  # auto: fp32 on CPU is fine
    assert not deepspeed_config(cfg, torch.device("cpu"))["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="zero_stage=1"):
        deepspeed_config(cfg, torch.device("cuda"))
