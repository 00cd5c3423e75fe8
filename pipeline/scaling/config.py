"""Configuration of the scaling-law fit (`python -m pipeline.scaling SWEEP_DIR [key=value ...]`,
conf/scaling.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import check_declared
from pipeline.cost_model import PlanConfig
from pipeline.errors import ConfigError

LOSSES = ("auto", "fvu", "nmse", "mse", "proxy_loss")
FITTED = ("d_model", "n_features", "architecture", "k")
"""The plan's sae keys that the fit sets (the sweep's dictionary at the recommended size)."""


@dataclass
class ScalingConfig:
    sweep_dir: str = "runs/sweep/gao"
    """A sweep: folders of training runs (any depth) that wrote heldout.json (train heldout_url=...)."""
    budget: float | None = None
    """Training compute in FLOPs to predict the optimal dictionary size and token count for."""
    loss: str = "auto"
    """The heldout.json key to fit: fvu (Gao et al.'s normalised MSE, up to a constant), nmse, mse, or
    proxy_loss (mse + lambda * sparsity, Scaling Monosemanticity's); auto: proxy_loss for relu_l1 and
    jumprelu (loss at a fixed lambda), fvu for topk and batchtopk (loss at a fixed k)."""
    bootstrap: int = 200
    """Resamples (with replacement, over runs) for the 95% confidence intervals; 0: none."""
    holdout_largest: int = 1
    """Extrapolation check: refit without the runs of this many largest sizes and predict them (0: off)."""
    huber_delta: float = 1e-3
    """Huber delta on residuals of log loss (Chinchilla's)."""
    seed: int = 0
    """Seeds the bootstrap."""
    out_dir: str | None = None
    """scaling.json and the PNG plots go here; default: sweep_dir."""
    plan: dict = field(default_factory=dict)
    """Planner settings for the budget's run (pipeline/cost_model.py PlanConfig: the trainer's step keys and
    the planner's own), e.g. +plan.gpu_memory_gb=80 +plan.tflops=400 +plan.optim.state_dtype=fp8;
    sae.d_model, sae.n_features, sae.architecture and sae.k come from the fit."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is not one of {list(LOSSES)}")
        if self.budget is not None and not self.budget > 0:
            raise ConfigError(f"budget={self.budget} must be a positive number of FLOPs, e.g. budget=1e18")
        if self.bootstrap < 0 or self.holdout_largest < 0 or not self.huber_delta > 0:
            raise ConfigError(f"bootstrap={self.bootstrap} and holdout_largest={self.holdout_largest} must be >= 0, "
                              f"huber_delta={self.huber_delta} > 0")
        check_declared(self.plan, PlanConfig, "plan.")  # a dict only because the fit fills in the dictionary's shape
        fitted = sorted(set(self.plan.get("sae") or {}) & set(FITTED))
        if fitted:
            raise ConfigError(f"plan sets {', '.join(f'sae.{k}' for k in fitted)}, which the fit chooses. Fix: leave "
                              f"out +plan.sae.{fitted[0]}=... (the recommended dictionary is planned)")
