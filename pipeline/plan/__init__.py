"""Plan a run before it starts: per-rank memory, the smallest layout that fits, communication,
FLOPs and expected step time (the model: pipeline/cost_model.py).

    python -m pipeline.plan plan/target=llama3.1-8b plan/size=34m gpu_memory_gb=80   (make plan)
    python -m pipeline.plan sae.architecture=relu_l1 sae.n_features=4194304 optim.state_dtype=fp8

The step takes the trainer's own keys (sae.*, batch_size, optim.*, deepspeed.*: pipeline/step.py),
the machines and the layout search the planner's (PlanConfig in pipeline/cost_model.py).
"""

from dataclasses import replace

from pipeline.cost_model import Plan, PlanConfig, best_plan, make_plan, rank_memory
from pipeline.sae import sae_class

__all__ = ["Plan", "PlanConfig", "best_plan", "dry_run_command", "make_plan", "rank_memory", "run", "format_plan"]


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def format_plan(plan: Plan) -> str:
    c, m, sae = plan.cfg, plan.memory, plan.cfg.sae
    rows = [
        ("dictionary", f"{sae.architecture}, d_model={sae.d_model}, n_features={sae.n_features:,}"
                       + (f", k={sae.k}" if sae_class(sae.architecture).uses_k else "")),
        ("layout", f"data_parallel={plan.data_parallel} x feature_parallel={plan.feature_parallel} = "
                   f"{plan.gpus} GPUs on {plan.nodes} node(s) of {c.gpus_per_node}"),
        ("precision", f"{c.param_dtype} weights, {c.optim.state_dtype} Adam state, ZeRO-{c.deepspeed.zero_stage}, "
                      f"batch {c.batch_size} tokens"),
        ("-- per-rank memory", ""),
        ("weights", _gib(m.weights)), ("gradients", _gib(m.gradients)),
        ("fp32 master weights", _gib(m.master_weights)),
        (f"Adam state (m, v; {c.optim.state_dtype})", _gib(m.optimizer_state)),
        ("buffers (dead-latent counters)", _gib(m.buffers)),
        ("activations per step" + (f" (tile {sae.feature_tile})" if sae.feature_tile else ""), _gib(m.activations)),
        ("optimizer-step temporaries", _gib(m.optimizer_step)),
        ("communication buffers", _gib(m.communication)),
        ("runtime (framework, not tensors)", _gib(m.runtime)),
        ("total (state + largest phase)", f"{_gib(m.total)} of {_gib(c.gpu_memory_gb * 2**30 * c.usable_fraction)} usable -> "
                  + ("FITS" if plan.fits else "DOES NOT FIT")),
        ("loader shuffle buffer (host)", _gib(c.loader_bytes)),
        ("-- per step", ""),
        ("bytes communicated per rank", _gib(plan.comm_bytes_per_step)),
        ("of which across nodes", _gib(plan.comm_bytes_across_nodes)),
        ("FLOPs (whole step)", f"{plan.flops_per_step:.3e}"),
        ("expected step time", f"{plan.step_seconds * 1e3:,.1f} ms at {c.tflops} TFLOP/s, "
                               f"{c.mem_bandwidth_gbs} GB/s per GPU"),
        ("expected throughput", f"{plan.tokens_per_second:,.0f} tokens/s"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def dry_run_command(plan: Plan) -> str:
    """The trainer's dry run of this exact layout (meta device, one process, nothing allocated)."""
    c, sae = plan.cfg, plan.cfg.sae
    return (f"python -m pipeline.train dry_run=true sae.architecture={sae.architecture} sae.n_features={sae.n_features} "
            f"sae.d_model={sae.d_model} sae.k={sae.k} parallel.data_parallel={plan.data_parallel} "
            f"parallel.feature_parallel={plan.feature_parallel} batch_size={c.batch_size} "
            f"optim.state_dtype={c.optim.state_dtype} deepspeed.zero_stage={c.deepspeed.zero_stage} "
            f"deepspeed.precision={'fp32' if c.param_dtype == 'float32' else 'bf16'}")


def low_bit_hint(cfg: PlanConfig, plan: Plan) -> str | None:
    """What fp8 Adam state (optim.state_dtype=fp8) would change, when the plan uses fp32."""
    if cfg.optim.state_dtype != "fp32":
        return None
    alt = best_plan(replace(cfg, optim=replace(cfg.optim, state_dtype="fp8")))
    if plan.fits and alt.gpus >= plan.gpus:
        return None
    return (f"with optim.state_dtype=fp8 (Adam's m and v in fp8, ~2 instead of 8 bytes per parameter): "
            f"{alt.memory.total / 2**30:,.2f} GiB per rank, {alt.gpus} GPUs "
            f"(data_parallel={alt.data_parallel} x feature_parallel={alt.feature_parallel}) instead of {plan.gpus}")


def run(cfg: PlanConfig) -> Plan:
    plan = best_plan(cfg)
    print(format_plan(plan))
    hint = low_bit_hint(cfg, plan)
    if hint:
        print("\n" + hint)
    print(f"\ncheck the layout against the real modules:\n  {dry_run_command(plan)}")
    return plan
