"""The planner's arithmetic against the real sharded modules built on the meta device."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pipeline.parallel import ParallelDims
from pipeline.plan import PlanConfig, best_plan, rank_memory
from pipeline.cost_model import shard_buffers_bytes, shard_parameters
from pipeline.sae import SAEConfig, create
from pipeline.step import DeepSpeedConfig, OptimConfig

FP32_ZERO0 = DeepSpeedConfig(zero_stage=0, precision="fp32")
BF16_ZERO1 = DeepSpeedConfig(zero_stage=1, precision="bf16")


@pytest.mark.parametrize("d_model", [576, 4096, 8192])
@pytest.mark.parametrize("n_features", [2**20, 2**22, 2**25])
@pytest.mark.parametrize("architecture", ["relu_l1", "topk", "jumprelu", "batchtopk"])
def test_parameter_and_buffer_counts_match_meta_modules(d_model, n_features, architecture):
    fp = 3  # not a divisor: the first shard holds one more feature
    dims = ParallelDims(1, fp)
    sae = create(SAEConfig(architecture=architecture, n_features=n_features, d_model=d_model),
                 dims.feature_range(n_features, 0), device="meta")
    n_local = len(sae.features)
    assert n_local == -(-n_features // fp)
    assert sum(p.numel() for p in sae.parameters()) == shard_parameters(architecture, d_model, n_local)
    buffers = sum(b.numel() * b.element_size() for b in sae.buffers())
    assert buffers == shard_buffers_bytes(architecture, n_local)
    mem = rank_memory(PlanConfig(sae=SAEConfig(d_model=d_model, n_features=n_features, architecture=architecture),
                                 deepspeed=FP32_ZERO0), 1, fp)
    assert mem.weights == 4 * sum(p.numel() for p in sae.parameters())


def test_34m_features_on_llama_8b_width_fits_80gb_gpus():
    plan = best_plan(PlanConfig(sae=SAEConfig(d_model=4096, n_features=2**25), deepspeed=BF16_ZERO1,
                                batch_size=4096, gpu_memory_gb=80))
    assert plan.fits and plan.memory.total <= 80 * 2**30 * 0.9
    smaller = rank_memory(plan.cfg, 1, plan.feature_parallel - 1).total
    assert smaller > 80 * 2**30 * 0.9, "the planner must return the smallest feature-parallel degree"


def test_zero_partitions_optimizer_state_over_data_parallel():
    cfg = PlanConfig(sae=SAEConfig(d_model=576, n_features=2**20), deepspeed=BF16_ZERO1)
    one, four = rank_memory(cfg, 1, 2), rank_memory(cfg, 4, 2)
    assert four.optimizer_state * 4 == pytest.approx(one.optimizer_state, rel=1e-6)
    assert four.weights == one.weights and four.gradients == one.gradients


def test_cli_prints_a_plan():
    out = subprocess.run([sys.executable, "-m", "pipeline.plan", "plan/target=smollm2-135m", "plan/size=1m",
                          "gpu_memory_gb=24", "deepspeed.precision=fp32"], capture_output=True, text=True, check=True).stdout
    assert "n_features=1,048,576" in out and "FITS" in out and "tokens/s" in out


def test_plan_says_what_fp8_adam_state_saves():
    """34M features at d=4096: fp8 m and v need fewer feature shards, and the plan says so."""
    from pipeline.plan import low_bit_hint
    cfg = PlanConfig(sae=SAEConfig(d_model=4096, n_features=2**25), deepspeed=BF16_ZERO1, gpu_memory_gb=80)
    fp32, fp8 = best_plan(cfg), best_plan(replace(cfg, optim=OptimConfig(state_dtype="fp8")))
    assert fp8.feature_parallel < fp32.feature_parallel  # Adam's state over all shards: about a quarter
    assert fp8.memory.optimizer_state * fp8.feature_parallel < fp32.memory.optimizer_state * fp32.feature_parallel / 3
    hint = low_bit_hint(cfg, fp32)
    assert f"{fp8.gpus} GPUs" in hint and f"instead of {fp32.gpus}" in hint
    assert low_bit_hint(replace(cfg, optim=OptimConfig(state_dtype="fp8")), fp8) is None
    out = subprocess.run([sys.executable, "-m", "pipeline.plan", "plan/target=llama3.1-8b", "plan/size=34m"],
                         capture_output=True, text=True, check=True).stdout
    assert "with optim.state_dtype=fp8" in out


@pytest.mark.parametrize("architecture", ["relu_l1", "topk", "jumprelu", "batchtopk"])
def test_feature_tiles_bound_the_step_transients(architecture):
    """Untiled, a step holds [batch, n_local] matrices; tiled, its transients grow with the tile,
    not with n_features, and the forward pass (no gradients yet) no longer sets the peak."""
    def plan(**sae):
        return PlanConfig(sae=SAEConfig(d_model=576, architecture=architecture, **sae),
                          deepspeed=DeepSpeedConfig(zero_stage=1, precision="fp32"), batch_size=4096)
    b, tile = 4096, 8192
    for n_features in (2**20, 2**22):
        n = n_features // 2
        untiled = rank_memory(plan(n_features=n_features), 1, 2)
        tiled = rank_memory(plan(n_features=n_features, feature_tile=tile), 1, 2)
        assert untiled.forward >= b * n * 4 and untiled.total >= untiled.weights + untiled.forward
        assert tiled.forward < 3 * b * tile * 4 + 2**27
        assert tiled.total < untiled.total
        assert tiled.total == (tiled.weights + tiled.master_weights + tiled.optimizer_state + tiled.buffers
                               + tiled.communication + tiled.runtime + tiled.gradients
                               + max(tiled.backward, tiled.optimizer_step))
    small = rank_memory(plan(n_features=2**20, feature_tile=tile), 1, 2)
    big = rank_memory(plan(n_features=2**22, feature_tile=tile), 1, 2)
    assert big.forward == small.forward  # nothing in the forward transients scales with n_features


@pytest.mark.parametrize("architecture", ["relu_l1", "topk"])
def test_zero_keeps_a_flat_gradient_copy_in_the_optimizer_step(architecture):
    """DeepSpeed's ZeRO-1 flattens the gradient partition into a new tensor while the module's
    gradients still exist, and keeps an fp32 master copy; ZeRO-0 in fp32 steps in place."""
    sae = SAEConfig(d_model=576, n_features=2**18, architecture=architecture, feature_tile=4096)
    zero1, zero0 = (rank_memory(PlanConfig(sae=sae, deepspeed=DeepSpeedConfig(zero_stage=z, precision="fp32")), 1, 2)
                    for z in (1, 0))
    assert zero1.optimizer_step == zero1.gradients and zero0.optimizer_step == 0  # the flat copy
    assert zero1.backward == zero0.backward
    extra = zero1.master_weights + max(0, zero1.optimizer_step - zero1.backward)
    assert zero1.total - zero0.total == extra
    if architecture == "relu_l1":  # small tiled transients: the optimizer step sets the peak
        assert extra > zero1.master_weights


def test_auxk_adds_two_gradient_sized_temporaries_to_backward():
    sae = SAEConfig(d_model=576, n_features=2**18, architecture="topk", feature_tile=8192)
    on, off = (rank_memory(PlanConfig(sae=s, deepspeed=DeepSpeedConfig(precision="fp32")), 1, 2)
               for s in (sae, replace(sae, k_aux=0)))
    assert on.backward - off.backward == 2 * 2**17 * 576 * 4
    assert on.forward == off.forward and on.total > off.total
