"""The trainer's dry run (meta device, any target layout in one process) against the planner."""

import subprocess
import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.parallel import ParallelDims
from pipeline.plan import PlanConfig, best_plan, dry_run_command
from pipeline.cost_model import shard_parameters
from pipeline.sae import SAEConfig
from pipeline.train import DeepSpeedConfig, TrainConfig
from pipeline.train.dry_run import dry_run


def config(d_model, n_features, architecture="topk", dp=2, fp=3, zero=1, precision="bf16", **kw) -> TrainConfig:
    return TrainConfig(sae=SAEConfig(architecture=architecture, n_features=n_features, d_model=d_model),
                       parallel=ParallelDims(dp, fp), deepspeed=DeepSpeedConfig(zero_stage=zero, precision=precision),
                       dry_run=True, **kw)


@pytest.mark.parametrize("d_model", [576, 4096, 8192])
@pytest.mark.parametrize("n_features", [2**20, 2**22, 2**25])
def test_dry_run_matches_the_planner(d_model, n_features, capsys):
    out = dry_run(config(d_model, n_features))  # raises if any per-rank byte count differs
    assert "matches the planner" in capsys.readouterr().out
    shards = out["shards"]
    assert len(shards) == 3 and sum(s["features"][1] - s["features"][0] for s in shards) == n_features
    for s in shards:
        assert s["parameters"] == shard_parameters("topk", d_model, s["features"][1] - s["features"][0])
        assert s["weights"] == 2 * s["parameters"]  # bf16
        assert s["optimizer_state"] == 8 * -(-s["parameters"] // 2)  # fp32 m, v over 2 ZeRO-1 partitions
    assert out["plan"]["weights"] == shards[0]["weights"]


@pytest.mark.parametrize("architecture", ["relu_l1", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "fp32"), (2, "bf16")])
def test_dry_run_of_every_architecture_and_zero_stage(architecture, zero, precision):
    out = dry_run(config(576, 2**20 + 1, architecture, dp=4, fp=2, zero=zero, precision=precision))
    first, second = out["shards"]
    assert first["parameters"] > second["parameters"]  # 2^20 + 1 features: shard 0 holds one more
    assert (first["gradients"] < first["weights"]) == (zero == 2)


@pytest.mark.parametrize("state_dtype", ["fp8", "int8"])
@pytest.mark.parametrize("d_model,n_features,dp,zero,precision",
                         [(576, 2**20, 1, 0, "fp32"), (4096, 2**22, 2, 1, "bf16"), (8192, 2**25, 4, 2, "bf16")])
def test_dry_run_of_low_bit_adam_state_matches_the_planner(d_model, n_features, dp, zero, precision, state_dtype):
    """torchao's own buffers (built on meta) against the planner: ~2 bytes per parameter instead of 8."""
    from pipeline.train import OptimConfig
    out = dry_run(config(d_model, n_features, dp=dp, fp=2, zero=zero, precision=precision,
                         optim=OptimConfig(state_dtype=state_dtype)))
    s = out["shards"][0]
    partition = s["parameters"] / (dp if zero else 1)
    assert 2.0 * partition < s["optimizer_state"] < 2.1 * partition  # 1 byte per value + block scales


def test_dry_run_needs_no_store_when_d_model_is_given_and_rejects_bad_layouts(tmp_path):
    cfg = config(576, 4096, fp=2)
    cfg.data.url = str(tmp_path / "missing")
    dry_run(cfg)
    with pytest.raises(ConfigError, match="feature_parallel=8 is larger than sae.n_features=4"):
        dry_run(config(576, 4, "relu_l1", dp=1, fp=8))


def test_make_plan_34m_on_80gb_prints_a_fitting_plan_whose_dry_run_succeeds():
    plan = best_plan(PlanConfig(sae=SAEConfig(d_model=4096, n_features=2**25),
                                deepspeed=DeepSpeedConfig(zero_stage=1, precision="bf16"), batch_size=4096,
                                gpu_memory_gb=80))
    assert plan.fits
    out = subprocess.run([sys.executable, "-m", "pipeline.plan", "plan/target=llama3.1-8b", "plan/size=34m",
                          "gpu_memory_gb=80", "deepspeed.precision=bf16", "deepspeed.zero_stage=1", "batch_size=4096"],
                         capture_output=True, text=True, check=True).stdout
    assert "FITS" in out and dry_run_command(plan) in out
    cmd = dry_run_command(plan).split()
    assert cmd[:3] == ["python", "-m", "pipeline.train"]
    ran = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "matches the planner" in ran.stdout and f"feature_parallel={plan.feature_parallel}" in ran.stdout
