"""The evaluation stage: the metrics of pipeline/analysis/metrics.py on held-out text ->
metrics.json + density histogram."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.metrics import HISTOGRAM_FILE, METRICS_FILE, evaluate
from pipeline.evaluate.config import EvalConfig


def run(cfg: EvalConfig) -> dict:
    """Evaluate the SAE at cfg.input.checkpoint; write cfg.out_dir/metrics.json (returned) and the histogram."""
    loaded, dictionary = Dictionary.from_input(cfg.input)
    metrics = evaluate(dictionary, loaded, cfg.input, cfg.ablations, cfg.mean_source, cfg.store_url,
                       cfg.dense_threshold, cfg.progress)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics["histogram_png"] = str(out / HISTOGRAM_FILE)
    plot_density_histogram(metrics["feature_density"], metrics["n_tokens_reconstruction"], out / HISTOGRAM_FILE)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    print(summary(metrics), flush=True)
    print(f"wrote {out / METRICS_FILE} and {out / HISTOGRAM_FILE}", flush=True)
    return metrics


def plot_density_histogram(density: list[float], n_tokens: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dens = torch.tensor(density, dtype=torch.float64)
    live = dens[dens > 0]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if len(live):
        ax.hist(live.log10().numpy(), bins=50, color="#3b7dd8")
    ax.axvline(math.log10(1 / max(n_tokens, 1)), color="grey", ls=":", lw=1, label="1 / tokens")
    ax.axvline(-1, color="#d8553b", ls="--", lw=1, label="dense (10%)")
    ax.set_xlabel("log10 feature density (fraction of tokens it fires on)")
    ax.set_ylabel("features")
    ax.set_title(f"{len(live)} live, {int((dens == 0).sum())} dead of {len(dens)} features ({n_tokens} tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(m: dict) -> str:
    ce = m["ce_loss"]
    lines = [f"evaluated {m['sae']} at {m['hook']} on {m['n_tokens_evaluated']} held-out tokens "
             f"({m['n_outlier_rows_excluded']} outlier rows left out of reconstruction metrics)",
             f"  MSE {m['mse']:.4g}  FVU {m['fvu']:.4f}  explained variance {m['explained_variance']:.4f}  "
             f"cosine {m['cosine_similarity']:.4f}",
             f"  L0 {m['l0']:.2f}  dead {m['dead_fraction']:.2%}  dense {m['dense_fraction']:.2%}",
             "  CE " + "  ".join(f"{k} {v:.4f}" for k, v in ce.items()),
             f"  delta loss {m['delta_loss']:.4f}  CE loss recovered {m['ce_loss_recovered']}  "
             f"KL(clean||spliced) {m['kl_to_clean']['spliced']:.4f}"]
    return "\n".join(lines)
