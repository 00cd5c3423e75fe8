"""The math of the scaling-law fits, on plain arrays (no files, no torch).

    frontier = pareto_frontier(C, L)             # runs no cheaper run beats: the lower envelope
    f = fit_frontier(C[frontier], L[frontier])   # L(C) = E + A * C^-a
    b = fit_power(C[frontier], N[frontier])      # N_opt(C) = k * C^b (and D_opt likewise)
    j = fit_joint(N, D, L)                       # L(N, D) = E + A / N^alpha + B / D^beta

Both loss forms are fitted the Chinchilla way (Hoffmann et al. 2022, approach 3): a Huber loss on
the residuals of log L, the prediction written as a log-sum-exp so that every parameter lives in
log space, L-BFGS-B from a grid of starts, the best optimum kept. Inputs are divided by their
geometric mean before fitting (conditioning); the parameters are reported in the original units.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from pipeline.errors import ScalingFitError

HUBER_DELTA = 1e-3
"""Chinchilla's delta on log-loss residuals: nearly an L1 fit, robust to a few bad runs."""
MIN_FRONTIER = 4
"""Runs on the compute frontier needed for L(C) = E + A C^-a (3 parameters, one to spare)."""
MIN_JOINT = 6
"""Finished runs needed for L(N, D) (5 parameters, one to spare) ..."""
MIN_DISTINCT = 3
"""... with at least this many distinct sizes and token budgets (E, A and alpha need three sizes)."""


@dataclass
class FrontierFit:
    """L(C) = E + A * C^-a on the compute frontier."""

    E: float
    A: float
    a: float
    loss: float
    """The Huber objective at the optimum (sum over points)."""

    def predict(self, C) -> np.ndarray:
        return self.E + self.A * np.asarray(C, dtype=float) ** -self.a


@dataclass
class JointFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    loss: float

    def predict(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * N ** -self.alpha + self.B * D ** -self.beta


@dataclass
class PowerLaw:
    """y = k * x^exponent, least squares in log-log space."""

    k: float
    exponent: float

    def predict(self, x) -> np.ndarray:
        return self.k * np.asarray(x, dtype=float) ** self.exponent


SAME_COMPUTE = 1.1
"""Runs whose compute differs by less than this factor from the next cheaper one count as one compute
level (a grid's diagonals of equal N x D, up to rounding); only the best of a level can be on the frontier."""


def pareto_frontier(C, L, same_compute: float = SAME_COMPUTE) -> np.ndarray:
    """Indices (by increasing C) of the lower envelope of loss against compute: the best run of
    each compute level (runs within `same_compute` of each other, chained), kept when it beats every
    cheaper level."""
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    order = np.argsort(C, kind="stable")
    levels: list[list[int]] = []
    for i in order:
        if levels and C[i] < C[levels[-1][-1]] * same_compute:
            levels[-1].append(i)
        else:
            levels.append([i])
    keep, best = [], math.inf
    for level in levels:
        i = min(level, key=lambda j: L[j])
        if L[i] < best:
            keep.append(i)
            best = L[i]
    return np.array(keep, dtype=int)


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative."""
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return loss, np.clip(r, -delta, delta)


def _lse(terms: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """log(sum exp(terms)) and the softmax weights of each term."""
    m = np.maximum.reduce(terms)
    ex = [np.exp(t - m) for t in terms]
    s = sum(ex)
    return m + np.log(s), [e / s for e in ex]


def _best_of(objective: Callable, starts: list[np.ndarray], bounds: list[tuple]) -> tuple[np.ndarray, float]:
    best_x, best_f = None, math.inf
    for x0 in starts:
        with np.errstate(all="ignore"):
            r = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                         options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-10})
        if np.isfinite(r.fun) and r.fun < best_f:
            best_x, best_f = r.x, float(r.fun)
    if best_x is None:
        raise ScalingFitError("every start of the fit diverged (non-finite objective); check the losses for "
                              "zeros or non-finite values")
    return best_x, best_f


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def _check(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ScalingFitError(f"{name} must be positive and finite for a log-space fit; got {x.tolist()}")
    return x


def fit_frontier(C, L, delta: float = HUBER_DELTA, starts: list | None = None) -> FrontierFit:
    """Fit L = E + A C^-a (params in log space: e = log E, log A, a) to frontier points."""
    C, L = _check("compute", C), _check("loss", L)
    if len(C) < MIN_FRONTIER:
        raise ScalingFitError(f"the compute frontier has {len(C)} runs; L(C) = E + A C^-a needs at least "
                              f"{MIN_FRONTIER}. Fix: add runs (more sizes x token budgets) so that more of them are "
                              "loss-optimal at their compute")
    c0 = _geomean(C)
    x, y = np.log(C / c0), np.log(L)

    def objective(p):
        e, la, a = p
        pred, (wE, wA) = _lse([np.full_like(x, e), la - a * x])
        h, dh = huber(pred - y, delta)
        return float(h.sum()), np.array([(dh * wE).sum(), (dh * wA).sum(), (-dh * wA * x).sum()])

    if starts is None:
        lo, hi = float(y.min()), float(y.max())
        starts = [np.array(s) for s in itertools.product([lo - 3, lo - 0.7, lo - 0.1], [hi - 3, hi - 1, hi],
                                                         [0.05, 0.2, 0.5, 1.0])]
    p, f = _best_of(objective, starts, [(-50, 50), (-50, 50), (0, 5)])
    e, la, a = (float(v) for v in p)
    return FrontierFit(E=math.exp(e), A=math.exp(la) * c0 ** a, a=a, loss=f)


def fit_joint(N, D, L, delta: float = HUBER_DELTA, starts: list | None = None) -> JointFit:
    """Fit L = E + A/N^alpha + B/D^beta (params: log E, log A, alpha, log B, beta)."""
    N, D, L = _check("n_features", N), _check("tokens", D), _check("loss", L)
    n_distinct, d_distinct = len(np.unique(N)), len(np.unique(D))
    if len(L) < MIN_JOINT or n_distinct < MIN_DISTINCT or d_distinct < MIN_DISTINCT:
        raise ScalingFitError(f"L(N, D) = E + A/N^alpha + B/D^beta needs at least {MIN_JOINT} finished runs with at "
                              f"least {MIN_DISTINCT} distinct sizes and {MIN_DISTINCT} distinct token budgets; got "
                              f"{len(L)} runs, {n_distinct} sizes, {d_distinct} token budgets. Fix: sweep more "
                              "sae.n_features and n_tokens values")
    n0, d0 = _geomean(N), _geomean(D)
    n, d, y = np.log(N / n0), np.log(D / d0), np.log(L)

    def objective(p):
        e, la, al, lb, be = p
        pred, (wE, wA, wB) = _lse([np.full_like(n, e), la - al * n, lb - be * d])
        h, dh = huber(pred - y, delta)
        return float(h.sum()), np.array([(dh * wE).sum(), (dh * wA).sum(), (-dh * wA * n).sum(),
                                         (dh * wB).sum(), (-dh * wB * d).sum()])

    if starts is None:
        lo, hi = float(y.min()), float(y.max())
        starts = [np.array([e, la, al, lb, be]) for e, la, lb in
                  itertools.product([lo - 3, lo - 0.5], [hi - 3, hi - 1], [hi - 3, hi - 1])
                  for al, be in itertools.product([0.1, 0.4, 1.0], [0.1, 0.4, 1.0])]
    p, f = _best_of(objective, starts, [(-50, 50), (-50, 50), (0, 5), (-50, 50), (0, 5)])
    e, la, al, lb, be = (float(v) for v in p)
    return JointFit(E=math.exp(e), A=math.exp(la) * n0 ** al, alpha=al, B=math.exp(lb) * d0 ** be, beta=be, loss=f)


def frontier_starts(f: FrontierFit, C) -> list[np.ndarray]:
    """The optimum of a previous fit as a start in the parametrisation fit_frontier uses for C."""
    c0 = _geomean(_check("compute", C))
    return [np.array([math.log(f.E), math.log(f.A) - f.a * math.log(c0), f.a])]


def joint_starts(j: JointFit, N, D) -> list[np.ndarray]:
    n0, d0 = _geomean(_check("n_features", N)), _geomean(_check("tokens", D))
    return [np.array([math.log(j.E), math.log(j.A) - j.alpha * math.log(n0), j.alpha,
                      math.log(j.B) - j.beta * math.log(d0), j.beta])]


def fit_power(x, y) -> PowerLaw:
    """y = k x^b by least squares on log y against log x."""
    x, y = _check("x", x), _check("y", y)
    if len(np.unique(x)) < 2:
        raise ScalingFitError(f"a power law needs points at 2 or more distinct x; got {x.tolist()}")
    b, logk = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(k=float(math.exp(logk)), exponent=float(b))


def compute_optimal(j: JointFit, C: float, flops_per_token: Callable[[float], float],
                    n_range: tuple[float, float] = (1.0, 1e13)) -> tuple[float, float] | None:
    """(N, D) minimising the joint fit's L(N, D) subject to flops_per_token(N) * D = C; None when
    the minimum sits at the edge of n_range (the fit then says: as small or as large as possible)."""
    lo, hi = math.log(n_range[0]), math.log(n_range[1])

    def loss(logn):
        n = np.exp(logn)
        return j.predict(n, C / flops_per_token(n))

    grid = np.linspace(lo, hi, 400)
    vals = loss(grid)  # flops_per_token takes arrays
    i = int(np.argmin(vals))
    if i in (0, len(grid) - 1) or not np.isfinite(vals[i]):
        return None
    r = minimize_scalar(lambda x: float(loss(x)), bracket=(grid[i - 1], grid[i], grid[i + 1]), tol=1e-10)
    n = math.exp(float(r.x))
    return n, float(C / flops_per_token(n))


def implied_exponents(j: JointFit, C_lo: float, C_hi: float,
                      flops_per_token: Callable[[float], float]) -> tuple[float, float] | None:
    """(b, c) of N_opt ~ C^b and D_opt ~ C^c implied by the joint fit over [C_lo, C_hi]: the slopes
    of log N_opt and log D_opt against log C (exact power laws for a dense step, where C ~ N D)."""
    Cs = np.geomspace(C_lo, C_hi, 9)
    opt = [compute_optimal(j, c, flops_per_token) for c in Cs]
    if any(o is None for o in opt):
        return None
    N, D = np.array([o[0] for o in opt]), np.array([o[1] for o in opt])
    return fit_power(Cs, N).exponent, fit_power(Cs, D).exponent


def as_dict(x) -> dict:
    return asdict(x)
