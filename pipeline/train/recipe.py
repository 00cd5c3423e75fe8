"""The default training recipe: what `optim.lr=null` and `optim.lr_warmup_steps=null` (the defaults)
resolve to, so that a run of any width and budget trains well with nothing tuned.

Adam's best learning rate for an SAE falls with the dictionary's width: Gao et al. (2024) fit
lr ~ 1/sqrt(n_features) for TopK, which EleutherAI's sparsify also uses, and a rate that suits 4,096
latents diverges at a million. The rule here is that law with its constant measured on our trainer
(benchmarks/recipe.py, BENCHMARKS.md "Training recipe"): LR_AT_16K at 16,384 latents, scaled by
sqrt(16384 / n_features), for every architecture (the constant was measured for topk; relu_l1,
jumprelu and batchtopk train stably with it). Warm-up is WARMUP_FRACTION of the steps (at most
MAX_WARMUP): long runs get Gemma Scope's 1,000 steps, short runs are not spent warming up. The
resolved values are printed by the trainer and written to the export's cfg.json
(training.optim).
"""

from __future__ import annotations

import math

LR_AT_16K = 1.5e-3
WARMUP_FRACTION = 0.05
MAX_WARMUP = 1000


def learning_rate(optim, n_features: int) -> float:
    """optim.lr, or the recipe's rate for a dictionary of n_features latents."""
    return optim.lr if optim.lr is not None else LR_AT_16K * math.sqrt(2 ** 14 / n_features)


def warmup_steps(optim, steps: int) -> int:
    """optim.lr_warmup_steps, or the recipe's warm-up for a run of `steps` optimizer steps."""
    if optim.lr_warmup_steps is not None:
        return optim.lr_warmup_steps
    return min(MAX_WARMUP, int(WARMUP_FRACTION * steps))


def resolved(cfg) -> dict:
    """The optimizer settings a TrainConfig runs with (for the log and the export's cfg.json)."""
    o = cfg.optim
    return {"lr": learning_rate(o, cfg.sae.n_features), "lr_warmup_steps": warmup_steps(o, cfg.steps),
            "lr_decay_fraction": o.lr_decay_fraction, "betas": list(o.betas), "eps": o.eps,
            "gradient_clipping": o.gradient_clipping, "state_dtype": o.state_dtype,
            "rule": "optim.lr" if o.lr is not None else f"{LR_AT_16K:g} * sqrt(16384 / n_features)"}
