"""What the audit tasks share, below all of them: the base of every task's settings (TaskConfig),
the two-class statistics (AUROC, effect size) and the small HTML pieces of their report sections.

Layers inside pipeline/audit (each imports only those below it):
    common                      this module
    concepts, search, splitting, crossmodal, neighbours, completeness, absorption
                                the computations (no HTML, no AuditConfig)
    autointerp/                 the autointerp task's settings, run and section (a package of its own)
    tasks/<name>.py             one task each: Config, run, render, summary
    tasks/__init__.py           the registry (TASKS)
    config.py                   AuditConfig (task: the picked task's Config)
    report.py, run.py           audit.html and the stage, iterating the registry
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TaskConfig:
    """The settings of one audit task: each task's `Config` (pipeline/audit/tasks/<name>.py)
    subclasses this. AuditConfig.task holds the picked task's Config (`audit/task=<name>` on the
    command line; its keys are `task.<key>=...`)."""

    def check(self, audit) -> None:
        """Checks that need the settings every task shares (audit: the AuditConfig: input,
        dashboard, out_dir); AuditConfig calls it on construction. A ConfigError names the bad value
        and the fix."""


def auroc(pos: Tensor, neg: Tensor, block: int = 16384) -> Tensor:
    """[F] AUROC of scores pos [P, F] against neg [N, F], per column: P(pos > neg) + P(pos = neg) / 2
    over all pairs (the Mann-Whitney U statistic / (P N)). 0.5: no separation; 1: every positive
    above every negative."""
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError(f"auroc needs at least one score of each class; got {pos.shape[0]} positive and "
                         f"{neg.shape[0]} negative")
    out = []
    for lo in range(0, pos.shape[1], block):
        p, n = pos[:, None, lo:lo + block], neg[None, :, lo:lo + block]
        out.append((p > n).float().mean((0, 1)) + 0.5 * (p == n).float().mean((0, 1)))
    return torch.cat(out)


def effect_size(pos: Tensor, neg: Tensor) -> Tensor:
    """[F] Cohen's d: (mean pos - mean neg) / pooled standard deviation, per column. The pooled
    deviation is floored at 1% of the column's largest absolute value (and 1e-8), so that a
    feature firing identically on every prompt of both classes cannot reach an infinite d."""
    p, n = pos.float(), neg.float()
    dof = max(p.shape[0] + n.shape[0] - 2, 1)
    var = ((p - p.mean(0)).pow(2).sum(0) + (n - n.mean(0)).pow(2).sum(0)) / dof
    scale = torch.cat([p, n]).abs().amax(0)
    sd = torch.maximum(var.sqrt(), 0.01 * scale).clamp_min(1e-8)
    return (p.mean(0) - n.mean(0)) / sd


# --- report pieces ------------------------------------------------------------------------------

def auroc_class(a: float) -> str:
    """The CSS class of an AUROC in audit.html (report.EXTRA_CSS): good >= 0.9, weak >= 0.7, bad."""
    return "good" if a >= 0.9 else ("weak" if a >= 0.7 else "bad")


def num(x, fmt: str = ".3f") -> str:
    """A number as shown in a table, "-" for None."""
    return "-" if x is None else format(x, fmt)


def cosine_bars(edges: list[float], counts: list[int], width: int = 520, height: int = 120) -> str:
    """Inline SVG bars of a histogram on linear bins (the dashboard's histogram_svg draws log bins)."""
    top = max(counts) or 1
    bw = (width - 20) / len(counts)
    bars = "".join(
        f'<rect class="bar" x="{10 + i * bw:.1f}" y="{height - 20 - (height - 30) * c / top:.1f}" '
        f'width="{max(bw - 1, 1):.1f}" height="{(height - 30) * c / top:.1f}"><title>{edges[i]:.1f}..'
        f'{edges[i + 1]:.1f}: {c}</title></rect>' for i, c in enumerate(counts))
    labels = "".join(f'<text class="axis" x="{10 + i * bw:.1f}" y="{height - 6}" text-anchor="middle">'
                     f'{edges[i]:g}</text>' for i in range(0, len(edges), 5))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="best-match cosine histogram">'
            f'{bars}{labels}</svg>')
