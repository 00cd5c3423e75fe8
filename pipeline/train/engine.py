"""The DeepSpeed side of training, built in one place: its config (every default that changes
results set explicitly), the learning-rate schedule, and the engine around a sharded SAE.

Precision. bf16 training (deepspeed.precision=bf16; `auto` resolves to bf16 on CUDA and fp32 on
CPU, see precision()) is CASTING, not autocast: there is no torch.autocast region anywhere in the
trainer. DeepSpeed casts the module's parameters to bf16 (the SAE builds them in fp32), the loop
casts each input batch to bf16 (pipeline/train/loop.py), and every forward and backward matmul then
runs on bf16 tensors (with fp32 accumulation inside the matmul kernels, rounded to bf16 on output).
fp32 is kept where rounding would accumulate or where a sum runs over many terms:
  - master weights and the Adam state: ZeRO-1 (DeepSpeed's BF16_Optimizer, chosen for bf16 with
    fp32 gradient accumulation) and ZeRO-2 keep an fp32 copy of every parameter (partitioned over
    the data-parallel ranks) and apply the update there; the bf16 parameters are a rounded copy
    taken after each step. An update smaller than half a bf16 ulp of a weight (2^-9 relative) is
    therefore not lost. ZeRO-0 has no fp32 master (the bf16 weights would be updated in place and
    small updates rounded away: FACTS.md "DeepSpeed on CPU"), so bf16 with zero_stage=0 is refused
    with a ConfigError (pipeline/step.py check_precision), before DeepSpeed's own NotImplementedError.
  - gradients: accumulated in fp32 (data_types.grad_accum_dtype) and all-reduced in fp32
    (communication_data_type), averaged after the reduction; the global gradient norm used for
    clipping is computed in fp32 from them.
  - the loss: the MSE and AuxK terms upcast x and x_hat to fp32 before the difference
    (pipeline/sae/base.py _finish, topk.py auxk), so the residual of a good reconstruction, a small
    difference of two large numbers, is not rounded to 8 bits; the logged metrics (metrics.py) and
    the held-out FVU (heldout.py, in float64) are computed from fp32 / float64 copies as well.
  - the sparse paths' weight gradients (pipeline/sae/sparse.py rows_grad and the Triton kernels):
    sums over every token that selected a row, accumulated in fp32 and cast to the parameter's
    dtype once at the end (sparse kernels also lack bf16 on some devices).
  - decoder row norms (unit-norm architectures) are computed by torch's norm, which accumulates in
    fp32 for bf16 input; the relu_l1 penalty's norms come out of its bf16 matmul column like x_hat.
What is bf16: the weights used in forward/backward, activations, x_hat, the encoder
pre-activations (hence topk's selection can differ from fp32's on near-ties), and the exported
dictionary, which is the bf16 copy of the weights (stored as fp32: at most half a bf16 ulp, 2^-9
relative, from the fp32 masters). tests/test_train_parallel.py checks bf16 layouts against one
process and bf16's held-out FVU against fp32's."""

from __future__ import annotations

import torch

from pipeline.parallel import Mesh
from pipeline.sae import SparseAutoencoder
from pipeline.step import check_precision
from pipeline.train.config import TrainConfig
from pipeline.train.low_bit import low_bit_adam
from pipeline.train.recipe import run_learning_rate, warmup_steps


def precision(cfg: TrainConfig, device: torch.device) -> str:
    """bf16 (fp32 master weights in ZeRO) on GPU, fp32 on CPU, unless set."""
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(cfg: TrainConfig, device: torch.device) -> dict:
    bf16 = precision(cfg, device) == "bf16"
    check_precision("bf16" if bf16 else "fp32", cfg.deepspeed.zero_stage)  # also `auto` resolved to bf16
    dp = cfg.parallel.data_parallel
    ds = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // dp,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {
            "lr": run_learning_rate(cfg), "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
            "torch_adam": True,      # torch.optim.Adam: no compiled op, the same on CPU and GPU
            "fused": True,           # its one-pass kernel (CPU and CUDA)
            "adam_w_mode": False}},  # Adam, not AdamW (weight decay is 0 anyway)
        "gradient_clipping": cfg.optim.gradient_clipping,  # DeepSpeed's default is 1.0: never implicit
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage,
                              "reduce_scatter": True, "overlap_comm": False,
                              "contiguous_gradients": True},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "prescale_gradients": False,        # average gradients after the reduction, in fp32
        "gradient_predivide_factor": 1.0,
        "communication_data_type": "fp32",  # gradient all-reduce in fp32 also under bf16
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,     # we log ourselves
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if bf16:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.optim.state_dtype != "fp32":
        del ds["optimizer"]  # a client optimizer (pipeline/train/low_bit.py) replaces DeepSpeed's
    return _merge(ds, cfg.deepspeed.overrides)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up over lr_warmup_steps, constant, linear decay to 0 over the last
    lr_decay_fraction of the steps. Called with the number of optimizer steps taken."""
    steps, warm = cfg.steps, warmup_steps(cfg.optim, cfg.steps)
    decay_start = steps - int(cfg.optim.lr_decay_fraction * steps)

    def f(step: int) -> float:
        scale = min(1.0, (step + 1) / warm) if warm else 1.0
        if step >= decay_start:
            scale *= max(0.0, (steps - step) / max(1, steps - decay_start))
        return scale
    return f


def sparsity_scale(cfg: TrainConfig, step: int) -> float:
    """lambda's warm-up factor at `step` (0-based)."""
    warm = int(cfg.optim.sparsity_warmup_fraction * cfg.steps)
    return min(1.0, (step + 1) / warm) if warm else 1.0


def build_engine(cfg: TrainConfig, sae: SparseAutoencoder, mesh: Mesh, device: torch.device):
    """deepspeed.initialize with the mesh's mpu: ZeRO then partitions and averages over the
    data-parallel group only, and clips with the norm over all feature shards."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, device)
    lr = run_learning_rate(cfg)
    groups = [{"params": g["params"], "lr": lr * g["lr_scale"]} for g in sae.to(device).param_groups()]
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=sae, model_parameters=groups, optimizer=low_bit_adam(cfg.optim, lr, groups), config=ds_cfg,
        mpu=mesh.mpu(), lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        dist_init_required=False)
    return engine


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
