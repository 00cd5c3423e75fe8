"""Scaling-law fits of a sweep of training runs (python -m pipeline.scaling SWEEP_DIR budget=FLOPs).

    python -m pipeline.train +sweep=gao            # a Hydra multirun: sizes x token budgets (conf/sweep/)
    python -m pipeline.scaling runs/sweep/gao budget=1e18

reads every run's heldout.json, fits the compute frontier L(C) = E + A C^-a with N_opt ~ C^b and
D_opt ~ C^c, and the joint L(N, D) = E + A/N^alpha + B/D^beta, with bootstrap intervals and an
extrapolation check; writes scaling.json and PNG plots; answers for a budget with the planner.
"""

from pipeline.scaling.config import ScalingConfig
from pipeline.scaling.run import RESULT_FILE, read_sweep, run

__all__ = ["RESULT_FILE", "ScalingConfig", "read_sweep", "run"]
