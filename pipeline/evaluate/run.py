"""The evaluation loop: held-out contexts -> clean forward (capturing the hook) -> SAE -> forwards
with the reconstruction spliced in and with the hook ablated -> metrics.json + density histogram."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.evaluate.common import context_batches, typical_rows
from pipeline.evaluate.config import EvalConfig
from pipeline.evaluate.dictionary import Dictionary
from pipeline.models import ActivationCapture, LoadedModel, load_model, replace_output

METRICS_FILE = "metrics.json"
HISTOGRAM_FILE = "density_histogram.png"


def run(cfg: EvalConfig) -> dict:
    """Evaluate the SAE at cfg.checkpoint; write cfg.out_dir/metrics.json (returned) and the histogram."""
    loaded = load_model(cfg.model)
    dictionary = Dictionary.load(cfg.checkpoint, loaded, cfg.hook)
    metrics = evaluate(dictionary, loaded, cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics["histogram_png"] = str(out / HISTOGRAM_FILE)
    plot_density_histogram(metrics["feature_density"], metrics["n_tokens_reconstruction"], out / HISTOGRAM_FILE)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    print(summary(metrics), flush=True)
    print(f"wrote {out / METRICS_FILE} and {out / HISTOGRAM_FILE}", flush=True)
    return metrics


class _Sums:
    """Streaming sums in float64 for the reconstruction metrics."""

    def __init__(self, d: int, n_features: int, device):
        self.rows = self.outliers = 0
        self.sq_err = self.sq_norm = self.cos = self.l0 = 0.0
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.fired = torch.zeros(n_features, dtype=torch.int64, device=device)


def evaluate(d: Dictionary, loaded: LoadedModel, cfg: EvalConfig, batches: list | None = None) -> dict:
    """The metrics of one SAE on the held-out contexts of cfg.data (no files written); `batches`
    ([batch, context_size] token ids) replaces cfg.data when given."""
    model, tok = loaded.model, loaded.tokenizer
    device = loaded.device
    if batches is None:
        batches = list(context_batches(cfg.data, tok, cfg.context_size, cfg.n_tokens, cfg.batch_size))
    p = cfg.exclude_positions_below
    masked_ids = {i for i in (tok.bos_token_id, tok.pad_token_id) if i is not None and i != tok.eos_token_id}
    mean = None
    if "mean" in cfg.ablations:
        mean = _ablation_mean(d, loaded, cfg, batches)

    s = _Sums(d.d_model, d.n_features, device)
    ce = {k: 0.0 for k in ("clean", "spliced", *cfg.ablations)}
    kl = {k: 0.0 for k in ("spliced", *cfg.ablations)}
    n_pred = 0
    bar = tqdm(total=sum(b.numel() for b in batches), unit="tok", unit_scale=True, disable=not cfg.progress,
               desc="evaluate", mininterval=2)
    start = time.perf_counter()
    for ids in batches:
        ids = ids.to(device)
        captured = {}

        def record(x):
            captured["x"] = x
            return x

        with torch.inference_mode(), replace_output(model, d.hook, record):
            clean_logits = model(input_ids=ids, use_cache=False).logits
        x = captured["x"]
        d.check_width(x)
        x_hat = _reconstruct(d, x[:, p:], cfg.exclude_norm_factor, s)

        targets = ids[:, p + 1:]
        keep = torch.ones_like(targets, dtype=torch.bool)
        for t in masked_ids:
            keep &= targets != t
        n_pred += int(keep.sum())
        clean_lp = F.log_softmax(clean_logits[:, p:-1].float(), dim=-1)
        del clean_logits
        ce["clean"] += _ce_sum(clean_lp, targets, keep)
        clean_p = clean_lp.exp()
        neg_entropy = _rowdot(clean_p, clean_lp)  # KL(p || q) = sum p log p - sum p log q
        variants = {"spliced": x_hat.to(x.dtype)}
        if "zero" in cfg.ablations:
            variants["zero"] = torch.zeros((), dtype=x.dtype, device=device)
        if mean is not None:
            variants["mean"] = mean.to(x.dtype)
        for name, value in variants.items():
            def splice(out, value=value):
                out = out.clone()
                out[:, p:] = value
                return out
            with torch.inference_mode(), replace_output(model, d.hook, splice):
                lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, p:-1].float(), dim=-1)
            ce[name] += _ce_sum(lp, targets, keep)
            kl[name] += float(((neg_entropy - _rowdot(clean_p, lp)) * keep).sum())
            del lp
        bar.update(ids.numel())
    bar.close()
    seconds = time.perf_counter() - start
    if n_pred == 0 or s.rows == 0:
        raise ConfigError(f"no position left to score: context_size={cfg.context_size}, exclude_positions_below={p}. "
                          "Fix: lower exclude_positions_below or raise context_size")
    return _metrics(d, cfg, s, {k: v / n_pred for k, v in ce.items()}, {k: v / n_pred for k, v in kl.items()},
                    n_pred, sum(b.numel() for b in batches), seconds)


def _reconstruct(d: Dictionary, x, norm_factor: float | None, s: _Sums):
    """The SAE's reconstruction of x [batch, t, d] (every row, for splicing); the reconstruction
    sums are taken over the rows that are not norm outliers."""
    rows = x.reshape(-1, x.shape[-1]).float()
    valid = typical_rows(rows, norm_factor)
    x_hat = torch.empty_like(rows)
    out = d.forward(rows[valid])
    x_hat[valid] = out.x_hat.float()
    if not bool(valid.all()):
        x_hat[~valid] = d.forward(rows[~valid]).x_hat.float()
    xv, hv = rows[valid].double(), out.x_hat.double()
    s.rows += int(valid.sum())
    s.outliers += int((~valid).sum())
    s.sq_err += float((xv - hv).pow(2).sum())
    s.sq_norm += float(xv.pow(2).sum())
    s.sum_x += xv.sum(0)
    s.cos += float(F.cosine_similarity(xv, hv, dim=1, eps=1e-12).sum())
    s.fired += out.fired.to(s.fired.device).long()
    s.l0 += float(out.l0) * int(valid.sum())
    return x_hat.reshape(x.shape)


def _rowdot(a, b):
    """sum over the last dim of a * b, as a batched matmul (no [batch, t, vocab] temporary)."""
    n, v = a.shape[0] * a.shape[1], a.shape[-1]
    return torch.bmm(a.reshape(n, 1, v), b.reshape(n, v, 1)).view(a.shape[:-1])


def _ce_sum(logprobs, targets, keep) -> float:
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float((nll * keep).sum())


def _ablation_mean(d: Dictionary, loaded: LoadedModel, cfg: EvalConfig, batches) -> torch.Tensor:
    """The mean hook activation over non-outlier rows: of the evaluation tokens (a truncated pass)
    or the SAE's training store."""
    if cfg.mean_source == "store":
        from pipeline.store import ActivationStore
        url = cfg.store_url or getattr(d.sae, "meta", {}).get("store")
        if not url:
            raise ConfigError("mean_source=store, but the checkpoint names no store. Fix: set store_url=... "
                              "or mean_source=eval")
        store = ActivationStore.open(url)
        hook = d.hook if d.hook in store.hooks else store.hook(None)
        return store.stats[hook].mean.to(loaded.device)
    capture = ActivationCapture(loaded, [d.hook])
    total, count = torch.zeros(d.d_model, dtype=torch.float64, device=loaded.device), 0
    for ids in batches:
        rows = capture(ids)[d.hook][:, cfg.exclude_positions_below:].reshape(-1, d.d_model).double()
        d.check_width(rows)
        rows = rows[typical_rows(rows, cfg.exclude_norm_factor)]
        total += rows.sum(0)
        count += rows.shape[0]
    return (total / max(count, 1)).float()


def _metrics(d: Dictionary, cfg: EvalConfig, s: _Sums, ce: dict, kl: dict, n_pred: int, n_positions: int,
             seconds: float) -> dict:
    n = s.rows
    mean_sq = s.sq_err / n
    variance = s.sq_norm / n - float((s.sum_x / n).pow(2).sum())
    fvu = mean_sq / variance if variance > 0 else float("nan")
    density = (s.fired.double() / n).cpu()
    m = {
        "sae": d.path, "hook": d.hook, "architecture": d.sae.cfg.architecture, "n_features": d.n_features,
        "d_model": d.d_model, "model": cfg.model.name,
        "data": asdict(cfg.data), "context_size": cfg.context_size,
        "n_tokens_evaluated": n_positions, "n_tokens_reconstruction": n, "n_outlier_rows_excluded": s.outliers,
        "n_predictions": n_pred,
        "rules": {"spliced_positions": f">= {cfg.exclude_positions_below}",
                  "outliers": (f"rows with norm > {cfg.exclude_norm_factor} x the batch median norm are left out of "
                               "the reconstruction metrics (still spliced)") if cfg.exclude_norm_factor else "none",
                  "masked_targets": "BOS and padding", "mean_ablation": cfg.mean_source if "mean" in cfg.ablations
                  else None},
        "mse": mean_sq, "mse_per_dim": mean_sq / d.d_model, "fvu": fvu, "explained_variance": 1 - fvu,
        "cosine_similarity": s.cos / n, "l0": s.l0 / n,
        "dead_fraction": float((density == 0).double().mean()),
        "dense_fraction": float((density > cfg.dense_threshold).double().mean()),
        "dense_threshold": cfg.dense_threshold,
        "ce_loss": ce, "kl_to_clean": kl,
        "delta_loss": ce["spliced"] - ce["clean"],
    }
    for a in cfg.ablations:
        gap = ce[a] - ce["clean"]
        m[f"ce_loss_recovered_vs_{a}"] = (ce[a] - ce["spliced"]) / gap if gap != 0 else float("nan")
    m["ce_loss_recovered"] = m.get("ce_loss_recovered_vs_zero")
    live = density[density > 0]
    edges = torch.linspace(-8, 0, 33)
    m["log10_density_histogram"] = {"edges": edges.tolist(),
                                    "counts": torch.histogram(live.log10().float().clamp(-8, 0), edges).hist.long().tolist(),
                                    "dead": int((density == 0).sum())}
    m["seconds"] = seconds
    m["tokens_per_second"] = n_positions / seconds if seconds else float("nan")
    m["feature_density"] = [float(f"{v:.6g}") for v in density.tolist()]
    return m


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
