"""The default training recipe: what `optim.lr=null` and `optim.lr_warmup_steps=null` (the defaults)
resolve to, so that a run of any width and budget trains well with nothing tuned.

Adam's best learning rate for an SAE falls with the dictionary's width: Gao et al. (2024) fit
lr ~ 1/sqrt(n_features) for TopK, which EleutherAI's sparsify also uses, and a rate that suits 4,096
latents diverges at a million. The rule here is that law with its constant measured on our trainer
(benchmarks/recipe.py, BENCHMARKS.md "Training recipe"): LR_AT_16K at 16,384 latents, scaled by
sqrt(16384 / n_features), for every architecture (the constant was measured for topk, with the dead
window below, on runs of ~100 steps: higher rates buy FVU only by killing latents; relu_l1 trains
stably with it, its lambda set for it in conf/sae/relu_l1.yaml).

The best rate also falls with the run's length, as for language models (Bjorck et al. 2024, "Scaling
Optimal LR Across Token Horizons": lr* ~ T^-beta). Here, at 16,384 latents and 1,269 steps (5.2M
tokens), the width rule's 2e-3 left 10.3% of the latents silent on 300k held-out rows where 1e-3 left
0.6%, for held-out FVU 0.117 against 0.119 (BENCHMARKS.md "Recipe v3"): so beyond REFERENCE_STEPS
the rate is scaled by (steps / REFERENCE_STEPS) ** -BUDGET_EXPONENT (x0.53 at 1,269 steps), down to
MIN_BUDGET_FACTOR: no run this long was measured, and the floor keeps a run of billions of tokens
from a rate nobody tried.

Warm-up is WARMUP_FRACTION of the steps (at most MAX_WARMUP): long runs get Gemma Scope's 1,000 steps, short runs are not spent warming up. The
resolved values are printed by the trainer and written to the export's cfg.json
(training.optim).

Dead latents: a latent is dead after DEAD_TOKENS (Gao et al.'s 10M) tokens without firing, or a
DEAD_FRACTION of the run if that is shorter, but never less than one batch nor MIN_FIRING_INTERVALS
times the gap between firings of a latent of average density (n_features / k tokens): a wide
dictionary in a short run would otherwise call most of its healthy latents dead and let AuxK's loss
swamp the reconstruction (262,144 latents, 51k tokens: 72% "dead" after 3 steps). With 10M in a run of a few
million tokens, AuxK never engages and the latents an early step knocks out stay dead for the rest
of the run (BENCHMARKS.md: 2.4% at 4,096 latents and 400k tokens, 0.8% with a 16th of the run and
AuxK's weight at 1/8, pipeline/sae/base.py aux_coef). A 64th rather than a 16th (recipe v4): at
16,384 latents x 2M tokens a 16th (125k tokens) left 3.4% of the latents silent on held-out rows while
the window counted 0.3% dead (rare latents, never dead by the window, so AuxK left them alone); 25.6k
tokens left 0.06%, FVU 0.1275 against 0.1278; at 4,096 x 400k, 6,400 tokens: 0.05% instead of 0.61%,
equal FVU. A run of 640M tokens or more gets Gao's window.
"""

from __future__ import annotations

import math
from dataclasses import replace

from pipeline.sae import SAEConfig
from pipeline.sae.base import DEAD_TOKENS, sae_class

LR_AT_16K = 2e-3
REFERENCE_STEPS = 100
BUDGET_EXPONENT = 0.25
MIN_BUDGET_FACTOR = 0.25
WARMUP_FRACTION = 0.05
MAX_WARMUP = 1000
DEAD_FRACTION = 1 / 64
MIN_FIRING_INTERVALS = 50


def learning_rate(optim, n_features: int, steps: int, architecture: str = "topk") -> float:
    """optim.lr, or the recipe's rate for a dictionary of n_features latents trained for `steps` steps
    (times the architecture's recipe_lr_scale: jumprelu's is 0.3)."""
    if optim.lr is not None:
        return optim.lr
    scale = sae_class(architecture).recipe_lr_scale
    return LR_AT_16K * math.sqrt(2 ** 14 / n_features) * budget_factor(steps) * scale


def run_learning_rate(cfg) -> float:
    """learning_rate of the run of TrainConfig `cfg`."""
    return learning_rate(cfg.optim, cfg.sae.n_features, cfg.steps, cfg.sae.architecture)


def budget_factor(steps: int) -> float:
    """1 up to REFERENCE_STEPS (where LR_AT_16K was measured), then (steps / REFERENCE_STEPS) ** -1/4,
    no lower than MIN_BUDGET_FACTOR (reached at 25,600 steps: rates below that are unmeasured here)."""
    return max(MIN_BUDGET_FACTOR, min(1.0, (steps / REFERENCE_STEPS) ** -BUDGET_EXPONENT))


def warmup_steps(optim, steps: int) -> int:
    """optim.lr_warmup_steps, or the recipe's warm-up for a run of `steps` optimizer steps."""
    if optim.lr_warmup_steps is not None:
        return optim.lr_warmup_steps
    return min(MAX_WARMUP, int(WARMUP_FRACTION * steps))


def dead_tokens(sae: SAEConfig, run_tokens: int, batch_size: int) -> int:
    """sae.dead_tokens, or the recipe's window for a run of `run_tokens` tokens."""
    if sae.dead_tokens is not None:
        return sae.dead_tokens
    interval = sae.n_features // sae.k  # tokens between firings of a latent of average density k / n
    return min(DEAD_TOKENS, max(batch_size, int(DEAD_FRACTION * run_tokens), MIN_FIRING_INTERVALS * interval))


def sae_config(sae: SAEConfig, cfg) -> SAEConfig:
    """`sae` with the recipe's values filled in for the run of TrainConfig `cfg` (what is built,
    checkpointed and exported)."""
    return replace(sae, dead_tokens=dead_tokens(sae, cfg.steps * cfg.batch_size, cfg.batch_size))


def resolved(cfg) -> dict:
    """The optimizer settings a TrainConfig runs with (for the log and the export's cfg.json)."""
    o = cfg.optim
    scale = sae_class(cfg.sae.architecture).recipe_lr_scale
    return {"lr": run_learning_rate(cfg), "lr_warmup_steps": warmup_steps(o, cfg.steps),
            "lr_decay_fraction": o.lr_decay_fraction, "betas": list(o.betas), "eps": o.eps,
            "gradient_clipping": o.gradient_clipping, "state_dtype": o.state_dtype,
            "rule": "optim.lr" if o.lr is not None else
            f"{LR_AT_16K:g} * sqrt(16384 / n_features) * max({MIN_BUDGET_FACTOR:g}, min(1, (steps / {REFERENCE_STEPS}) ** -{BUDGET_EXPONENT:g}))"
            + (f" * {scale:g} ({cfg.sae.architecture})" if scale != 1 else "")}
