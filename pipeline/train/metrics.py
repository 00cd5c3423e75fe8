"""Per-step statistics of the global batch (one all-reduce) and their logging: progress bar,
TensorBoard and metrics.jsonl on rank 0."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.heldout import METRICS_LOG_FILE
from pipeline.parallel import Mesh
from pipeline.sae import ForwardOutput, SparseAutoencoder

_NAMES = ("loss", "mse", "sparsity", "aux", "l0", "sse", "sum_sq", "n", "nonfinite")


def step_stats(out: ForwardOutput, x: torch.Tensor, mesh: Mesh) -> dict:
    """Global-batch values of this step on every rank, in one all-reduce over the world: means
    over the data-parallel ranks, sums for sse/sum_sq/n/sum_x, nonfinite set if any rank's loss is."""
    x = x.float()
    n = torch.full((), float(x.shape[0]), device=x.device)
    # built where x is, read back once: one host sync per step (on a GPU each .item()/.cpu() waits
    # for the queued work; the non-finite check needs this step's values before backward)
    local = torch.stack([out.loss.float(), out.mse.float(), out.sparsity.float(), out.aux.float(), out.l0.float(),
                         out.mse.float() * x.shape[0], x.pow(2).sum(), n, (~torch.isfinite(out.loss)).float()])
    v = torch.cat([local, x.sum(0)])
    if dist.get_world_size() > 1:
        dist.all_reduce(v)
    v = v.cpu() / mesh.dims.feature_parallel   # feature-parallel ranks hold the same values
    s = dict(zip(_NAMES, v[:len(_NAMES)].tolist()))
    for k in ("loss", "mse", "sparsity", "aux", "l0"):
        s[k] /= mesh.dims.data_parallel
    var = s["sum_sq"] - v[len(_NAMES):].pow(2).sum().item() / s["n"]
    s["var"] = var
    s["fvu"] = s["sse"] / var if var > 0 else math.nan
    s["nonfinite"] = s["nonfinite"] > 0
    return s


class Logger:
    """Averages steps over a window of log_every steps and reports them."""

    def __init__(self, out_dir: Path, mesh: Mesh, sae: SparseAutoencoder, steps: int, start: int,
                 batch_size: int, log_every: int, dense_fraction: float, progress: bool):
        self.mesh, self.sae, self.batch_size, self.every = mesh, sae, batch_size, log_every
        self.dense_fraction = dense_fraction
        self.rank0 = mesh.rank == 0
        self.window: list[dict] = []
        self.fired = torch.zeros(len(sae.features), dtype=torch.long, device=sae.W_dec.device)
        self.t0 = time.perf_counter()
        self.bar = self.tb = self.jsonl = None
        if self.rank0:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start)
            self.jsonl = _truncate_jsonl(out_dir / METRICS_LOG_FILE, start)
            self.bar = tqdm(total=steps, initial=start, unit="step", disable=not progress, mininterval=1,
                            dynamic_ncols=True)
        self.last: dict = {}

    def step(self, step: int, stats: dict, fired: torch.Tensor) -> None:
        """After step `step` (0-based). Collective every log_every steps (dead/dense counts)."""
        self.window.append(stats)
        self.fired += fired
        if self.bar is not None:
            self.bar.update(1)
        if (step + 1) % self.every:
            return
        dt = time.perf_counter() - self.t0
        tokens_seen = (step + 1) * self.batch_size
        window_tokens = len(self.window) * self.batch_size
        comm = self.sae.comm
        dead_after = min(self.sae.dead_tokens, tokens_seen)
        fired = comm.sum_batch(self.fired)
        counts = comm.sum_features(torch.stack([(self.sae.tokens_since_fired >= dead_after).sum(),
                                                (fired > self.dense_fraction * window_tokens).sum()]))
        n = self.sae.cfg.n_features
        w = self.window
        row = {"step": step + 1, "tokens": tokens_seen,
               **{k: sum(s[k] for s in w) / len(w) for k in ("loss", "mse", "sparsity", "aux", "l0")},
               "fvu": sum(s["sse"] for s in w) / max(sum(s["var"] for s in w), 1e-30),
               "dead_fraction": counts[0].item() / n, "dense_fraction": counts[1].item() / n,
               "tokens_per_s": window_tokens / dt, "lr": w[-1]["lr"]}
        self.last = row
        self.window, self.t0 = [], time.perf_counter()
        self.fired.zero_()
        if not self.rank0:
            return
        for k, v in row.items():
            if k not in ("step", "tokens"):
                self.tb.add_scalar(f"train/{k}", v, step + 1)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self.bar.set_postfix_str(f"{row['tokens_per_s']:,.0f} tok/s loss {row['loss']:.4g} mse {row['mse']:.4g} "
                                 f"sparsity {row['sparsity']:.3g} L0 {row['l0']:.1f} FVU {row['fvu']:.3f} "
                                 f"dead {row['dead_fraction']:.1%}", refresh=False)
        if self.bar.disable:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    def close(self) -> None:
        if self.rank0:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


def _truncate_jsonl(path: Path, start: int):
    """Open metrics.jsonl for appending, dropping lines past `start` (a resumed run rewrites them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() and start > 0 else []
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start]
    path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a")
