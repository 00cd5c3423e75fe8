"""Reconstruction and downstream-loss metrics of a dictionary spliced into its model: context
batches -> clean forward (capturing the hook) -> SAE -> forwards with the reconstruction spliced in
and with the hook ablated. The evaluation stage writes them to metrics.json; the audit's
cross-modal check measures a VLM's text with the same code."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.analysis.batches import context_batches, typical_rows
from pipeline.analysis.config import InputConfig
from pipeline.analysis.dictionary import Dictionary
from pipeline.errors import ConfigError
from pipeline.models import ActivationCapture, LoadedModel, replace_output

METRICS_FILE = "metrics.json"
"""The evaluation stage's output in its out_dir: these metrics as JSON, `feature_density` (per feature,
the fraction of tokens it fired on) among them. The publishing stage reads it from the folder it is
given (eval_dirs) and carries it into a release under the same name."""
HISTOGRAM_FILE = "density_histogram.png"
"""The evaluation stage's plot of feature_density, beside METRICS_FILE (a release carries it too)."""

ABLATIONS = ("zero", "mean")
MEAN_SOURCES = ("eval", "store")


class _Sums:
    """Streaming sums in float64 for the reconstruction metrics."""

    def __init__(self, d: int, n_features: int, device):
        self.rows = self.outliers = 0
        self.sq_err = self.sq_norm = self.cos = self.l0 = 0.0
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.fired = torch.zeros(n_features, dtype=torch.int64, device=device)


def evaluate(d: Dictionary, loaded: LoadedModel, inp: InputConfig, ablations=ABLATIONS, mean_source: str = "eval",
             store_url: str | None = None, dense_threshold: float = 0.1, progress: bool = True,
             batches: list | None = None) -> dict:
    """The metrics of one SAE on the contexts of inp.data (no files written); `batches` ([batch,
    context_size] token ids) replaces inp.data when given. ablations: the downstream-loss baselines
    (zero: the hook's output replaced by 0; mean: by the mean activation, of the evaluation tokens
    or, mean_source=store, of the training store, store_url or the one cfg.json names); a feature
    firing on more than dense_threshold of the tokens counts as dense."""
    model, tok = loaded.model, loaded.tokenizer
    device = loaded.device
    if batches is None:
        batches = list(context_batches(inp.data, tok, inp.context_size, inp.n_tokens, inp.batch_size))
    p = inp.exclude_positions_below
    masked_ids = {i for i in (tok.bos_token_id, tok.pad_token_id) if i is not None and i != tok.eos_token_id}
    mean = None
    if "mean" in ablations:
        mean = _ablation_mean(d, loaded, inp, mean_source, store_url, batches)

    s = _Sums(d.d_model, d.n_features, device)
    ce = {k: 0.0 for k in ("clean", "spliced", *ablations)}
    kl = {k: 0.0 for k in ("spliced", *ablations)}
    n_pred = 0
    bar = tqdm(total=sum(b.numel() for b in batches), unit="tok", unit_scale=True, disable=not progress,
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
        x_hat = _reconstruct(d, x[:, p:], inp.exclude_norm_factor, s)

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
        if "zero" in ablations:
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
        raise ConfigError(f"no position left to score: input.context_size={inp.context_size}, "
                          f"input.exclude_positions_below={p}. Fix: lower exclude_positions_below or raise context_size")
    return _metrics(d, inp, ablations, mean_source, dense_threshold, s, {k: v / n_pred for k, v in ce.items()}, {k: v / n_pred for k, v in kl.items()},
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


def _ablation_mean(d: Dictionary, loaded: LoadedModel, inp: InputConfig, mean_source: str, store_url: str | None,
                   batches) -> torch.Tensor:
    """The mean hook activation over non-outlier rows: of the evaluation tokens (a truncated pass)
    or the SAE's training store."""
    if mean_source == "store":
        from pipeline.store import ActivationStore
        url = store_url or getattr(d.sae, "meta", {}).get("store")
        if not url:
            raise ConfigError("mean_source=store, but the checkpoint names no store. Fix: set store_url=... "
                              "or mean_source=eval")
        store = ActivationStore.open(url)
        hook = d.hook if d.hook in store.hooks else store.hook(None)
        return store.stats[hook].mean.to(loaded.device)
    capture = ActivationCapture(loaded, [d.hook])
    total, count = torch.zeros(d.d_model, dtype=torch.float64, device=loaded.device), 0
    for ids in batches:
        rows = capture(ids)[d.hook][:, inp.exclude_positions_below:].reshape(-1, d.d_model).double()
        d.check_width(rows)
        rows = rows[typical_rows(rows, inp.exclude_norm_factor)]
        total += rows.sum(0)
        count += rows.shape[0]
    return (total / max(count, 1)).float()


def _metrics(d: Dictionary, inp: InputConfig, ablations, mean_source: str, dense_threshold: float, s: _Sums, ce: dict, kl: dict, n_pred: int, n_positions: int,
             seconds: float) -> dict:
    n = s.rows
    mean_sq = s.sq_err / n
    variance = s.sq_norm / n - float((s.sum_x / n).pow(2).sum())
    fvu = mean_sq / variance if variance > 0 else float("nan")
    density = (s.fired.double() / n).cpu()
    m = {
        "sae": d.path, "hook": d.hook, "architecture": d.sae.cfg.architecture, "n_features": d.n_features,
        "d_model": d.d_model, "model": inp.model.name,
        "data": asdict(inp.data), "context_size": inp.context_size,
        "n_tokens_evaluated": n_positions, "n_tokens_reconstruction": n, "n_outlier_rows_excluded": s.outliers,
        "n_predictions": n_pred,
        "rules": {"spliced_positions": f">= {inp.exclude_positions_below}",
                  "outliers": (f"rows with norm > {inp.exclude_norm_factor} x the batch median norm are left out of "
                               "the reconstruction metrics (still spliced)") if inp.exclude_norm_factor else "none",
                  "masked_targets": "BOS and padding", "mean_ablation": mean_source if "mean" in ablations
                  else None},
        "mse": mean_sq, "mse_per_dim": mean_sq / d.d_model, "fvu": fvu, "explained_variance": 1 - fvu,
        "cosine_similarity": s.cos / n, "l0": s.l0 / n,
        "dead_fraction": float((density == 0).double().mean()),
        "dense_fraction": float((density > dense_threshold).double().mean()),
        "dense_threshold": dense_threshold,
        "ce_loss": ce, "kl_to_clean": kl,
        "delta_loss": ce["spliced"] - ce["clean"],
    }
    for a in ablations:
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
