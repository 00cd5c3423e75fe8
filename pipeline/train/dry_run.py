"""Dry run of a training layout: `python -m pipeline.train dry_run=true ...`.

Builds every feature shard of the configured dictionary on the `meta` device (shapes, no
memory) for the configured data_parallel x feature_parallel layout, in one process whatever the
target world size, and lays out the ZeRO-partitioned optimizer state the same way on `meta`. It
prints per-rank parameter counts and bytes and checks them against the planner's cost model
(pipeline.cost_model), so a plan for a 34M-feature cluster run is checked against the real
modules before the job is queued."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from pipeline.cost_model import PlanConfig, rank_memory, training_plan
from pipeline.device import planned_device
from pipeline.errors import ConfigError
from pipeline.sae import create
from pipeline.store import ActivationStore
from pipeline.train.config import TrainConfig
from pipeline.train.data import with_d_model
from pipeline.train.engine import precision
from pipeline.train.low_bit import low_bit_adam
from pipeline.train.recipe import run_learning_rate


def layout(cfg: TrainConfig) -> tuple[PlanConfig, list[dict]]:
    """The planner's config for `cfg`, and per feature shard: its features and the bytes of each
    kind of state, counted from meta tensors."""
    sae_cfg = cfg.sae
    if sae_cfg.d_model is None:  # only the width is read from the store
        sae_cfg = with_d_model(sae_cfg, ActivationStore.open(cfg.data.url, cfg.data.storage_options))
    dims = cfg.parallel
    dims.validate(dims.world_size, sae_cfg.n_features)
    device = planned_device(cfg.device, "device")  # the run's, not necessarily this machine's
    plan_cfg = training_plan(cfg, sae=sae_cfg, deepspeed=replace(cfg.deepspeed, precision=precision(cfg, device)),
                             data_parallel=dims.data_parallel, feature_parallel=dims.feature_parallel)
    dtype, dp, zero = plan_cfg.param_dtype, dims.data_parallel, cfg.deepspeed.zero_stage
    shards = []
    for fp_rank in range(dims.feature_parallel):
        sae = create(sae_cfg, dims.feature_range(sae_cfg.n_features, fp_rank), device="meta")
        sae.to(getattr(torch, dtype))
        params = sum(p.numel() for p in sae.parameters())
        # ZeRO >= 1 flattens the shard's parameters and gives each data-parallel rank 1/dp of the
        # fp32 master copy and of Adam's m and v (ceil: the last partition is padded)
        part = math.ceil(params / dp) if zero >= 1 else params
        state = adam_state(cfg, [p.numel() for p in sae.parameters()], part, dp if zero >= 1 else 1)
        # the fp32 master partition: DeepSpeed's ZeRO optimizer steps a flat clone even in fp32
        master = torch.empty(part if dtype != "float32" or zero >= 1 else 0, dtype=torch.float32, device="meta")
        grads = torch.empty(math.ceil(params / dp) if zero >= 2 else params, dtype=getattr(torch, dtype), device="meta")
        shards.append({
            "fp_rank": fp_rank, "features": [sae.features.start, sae.features.stop], "parameters": params,
            "weights": sum(p.numel() * p.element_size() for p in sae.parameters()),
            "gradients": grads.numel() * grads.element_size(),
            "master_weights": master.numel() * master.element_size(),
            "optimizer_state": sum(_nbytes(t) for t in state),
            "buffers": sum(b.numel() * b.element_size() for b in sae.buffers()),
        })
    return plan_cfg, shards


def adam_state(cfg: TrainConfig, sizes: list[int], part: int, dp: int) -> list[torch.Tensor]:
    """Adam's m and v on `meta`: fp32 over the flat partition of `part` values, or torchao's own
    buffers (pipeline/train/low_bit.py) for each tensor's 1/dp partition."""
    if cfg.optim.state_dtype == "fp32":
        return [torch.empty(part, dtype=torch.float32, device="meta") for _ in range(2)]
    params = [torch.nn.Parameter(torch.empty(math.ceil(n / dp), device="meta")) for n in sizes]
    adam = low_bit_adam(cfg.optim, run_learning_rate(cfg), [{"params": params}])
    return [adam._new_buffer(p, signed) for p in params for signed in (True, False)]


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (torchao's quantised state)."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def dry_run(cfg: TrainConfig) -> dict:
    """Print the layout and its check against the planner; raise if they disagree."""
    plan_cfg, shards = layout(cfg)
    planned = rank_memory(plan_cfg, cfg.parallel.data_parallel, cfg.parallel.feature_parallel)
    largest = shards[0]  # the first n % fp shards hold one more feature; the planner sizes for it
    keys = ("weights", "gradients", "master_weights", "optimizer_state", "buffers")
    mismatch = {k: (largest[k], getattr(planned, k)) for k in keys if largest[k] != getattr(planned, k)}
    gib = 2 ** 30
    sae = plan_cfg.sae
    print(f"dry run: {sae.architecture}, d_model={sae.d_model}, n_features={sae.n_features:,}, "
          f"data_parallel={cfg.parallel.data_parallel} x feature_parallel={cfg.parallel.feature_parallel}, "
          f"{plan_cfg.param_dtype} weights, ZeRO-{plan_cfg.deepspeed.zero_stage} (meta device, nothing allocated)")
    print(f"{'fp rank':>7} {'features':>25} {'parameters':>15} " + " ".join(f"{k:>16}" for k in keys) + "  (GiB)")
    distinct = {s["parameters"]: s for s in shards}.values()  # shards differ by at most one feature
    for s in distinct:
        lo, hi = s["features"]
        print(f"{s['fp_rank']:>7} {f'{lo:,}..{hi:,}':>25} {s['parameters']:>15,} "
              + " ".join(f"{s[k] / gib:>16.3f}" for k in keys))
    static = sum(largest[k] for k in keys)
    print(f"static state per rank {static / gib:,.3f} GiB; the planner adds {planned.activations / gib:,.3f} GiB of "
          f"step activations and {planned.communication / gib:,.3f} GiB of communication buffers: "
          f"{planned.total / gib:,.3f} GiB")
    if mismatch:
        raise ConfigError(f"the planner's per-rank bytes disagree with the modules built: {mismatch} "
                          "(meta, planner). This is a bug in pipeline/cost_model.py; please report it")
    print("matches the planner (pipeline.plan) exactly", flush=True)
    return {"plan": vars(planned), "shards": shards}
