"""The PNG plots of a scaling fit: loss against compute with the frontier and its fit; the optimal
size and tokens against compute; the joint fit's loss against tokens per size."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _loglog(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.2)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_all(points, result: dict, fits: dict, out: Path, names: dict, budget: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = np.array([p.n_features for p in points], dtype=float)
    D = np.array([p.tokens for p in points], dtype=float)
    C = np.array([p.flops for p in points])
    L = np.array([p.loss for p in points])
    front = np.array([any(p.dir == q for q in result["frontier"]["points"]) for p in points])
    sizes = sorted(set(N.tolist()))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    c_hi = max(C.max(), budget or 0) * 1.5
    grid = np.geomspace(C.min() / 1.5, c_hi, 200)
    ylabel = f"held-out {result['loss']}"
    ff = fits["frontier"]

    # 1. loss against compute: runs by size (lines join token budgets), frontier, fit
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    for s, col in zip(sizes, colors):
        m = N == s
        o = np.argsort(C[m])
        ax.plot(C[m][o], L[m][o], "o-", color=col, ms=5, lw=1, alpha=0.8, label=f"N = {int(s):,}")
    ax.plot(C[front], L[front], "o", ms=11, mfc="none", mec="#d8553b", mew=1.5, label="frontier (lower envelope)")
    ax.plot(grid, ff.predict(grid), "--", color="#d8553b",
            label=f"L = {ff.E:.3g} + {ff.A:.3g} C^-{ff.a:.3f}")
    if ff.E > L.min() / 5:  # a vanishing E would squash the data into the top of a log axis
        ax.axhline(ff.E, color="grey", ls=":", lw=1, label=f"E = {ff.E:.3g} (irreducible)")
    if budget:
        ax.axvline(budget, color="black", ls=":", lw=1, label=f"budget {budget:.2g} FLOPs")
    _loglog(ax, "training compute C (FLOPs)", ylabel,
            f"{result['architecture']}, d_model={result['d_model']}: loss against compute")
    _save(fig, out / names["loss"])

    # 2. N_opt and D_opt against compute: frontier runs, envelope power laws, joint-fit optimum
    from pipeline.scaling.fit import compute_optimal
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    opt = [compute_optimal(fits["joint"], c, fits["fpt"]) for c in grid]
    ok = np.array([o is not None for o in opt])
    for ax, y, law, name, key in ((axes[0], N, fits["n_opt"], "N_opt (features)", "b"),
                                  (axes[1], D, fits["d_opt"], "D_opt (tokens)", "c")):
        ax.plot(C, y, ".", color="#999999", label="all runs")
        ax.plot(C[front], y[front], "o", color="#d8553b", label="frontier runs")
        ax.plot(grid, law.predict(grid), "--", color="#d8553b", label=f"envelope fit: C^{law.exponent:.3f}")
        if ok.any():
            j = np.array([o[0 if key == "b" else 1] if o else np.nan for o in opt])
            imp = (result["joint"].get("implied") or {}).get(key)
            lab = f"joint-fit optimum: C^{imp:.3f}" if imp is not None else "joint-fit optimum"
            ax.plot(grid[ok], j[ok], "-", color="#3b7dd8", label=lab)
        if budget:
            ax.axvline(budget, color="black", ls=":", lw=1)
        _loglog(ax, "training compute C (FLOPs)", name)
    fig.suptitle("compute-optimal dictionary size and tokens")
    _save(fig, out / names["optimal"])

    # 3. the joint fit: loss against tokens, one curve per size
    j = fits["joint"]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    dgrid = np.geomspace(D.min() / 1.5, D.max() * 1.5, 100)
    for s, col in zip(sizes, colors):
        m = N == s
        ax.plot(D[m], L[m], "o", color=col, label=f"N = {int(s):,}")
        ax.plot(dgrid, j.predict(s, dgrid), "-", color=col, lw=1)
    if j.E > L.min() / 5:
        ax.axhline(j.E, color="grey", ls=":", lw=1, label=f"E = {j.E:.3g}")
    _loglog(ax, "training tokens D", ylabel,
            f"L(N, D) = {j.E:.3g} + {j.A:.3g}/N^{j.alpha:.3f} + {j.B:.3g}/D^{j.beta:.3f}")
    _save(fig, out / names["joint"])
