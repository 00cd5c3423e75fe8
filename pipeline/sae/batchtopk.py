"""BatchTopK SAE: Bussmann et al., "BatchTopK Sparse Autoencoders" (2024).

As topk, but the k * batch largest ReLU'd pre-activations of the whole (global) batch are kept,
so the number of active latents varies per token and averages k. Inference uses one global
threshold instead: the running mean over training steps of the smallest activation kept.

Under sharding and data parallelism every rank proposes its largest k * batch values, all ranks
see all proposals, and each keeps its entries at least the (k * batch)-th largest. Tiled, the
proposals are a running top (k * batch) over the flattened tiles (tiled.py): O(batch * k) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae.base import SAEConfig, register
from pipeline.sae.tiled import RunningTopK
from pipeline.sae.topk import TopK


@register
class BatchTopK(TopK):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"  # inference keeps every latent above one threshold
    saelens_note = ("BatchTopK SAEs are published, as SAELens does, as JumpReLU SAEs whose threshold is the "
                    "global inference threshold learned in training.")
    forward_tiles = 2.25  # and the ReLU'd copy of each tile
    running_topks = 2
    refinable = False  # its selection is over the whole batch: the scan is exact

    @classmethod
    def saelens_config(cls, config: dict) -> dict:
        return {}  # a JumpReLU in SAELens: no k

    @classmethod
    def saelens_state(cls, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """SAELens's per-latent threshold is the one scalar threshold, repeated; the extras keep the scalar."""
        out, extras = super().saelens_state(state)
        out["threshold"] = state["threshold"].expand(state["b_enc"].shape[0]).contiguous()
        extras["threshold"] = state["threshold"].reshape(()).contiguous()
        return out, extras

    @classmethod
    def planned_buffer_bytes(cls, n: int, float_bytes: int) -> int:
        """And the running threshold (a float) and its int64 step count."""
        return super().planned_buffer_bytes(n, float_bytes) + 8 + float_bytes

    def __init__(self, cfg: SAEConfig, features: range | None = None, device=None):
        super().__init__(cfg, features, device)
        self.register_buffer("threshold", torch.zeros((), device=device))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long, device=device))

    def selector(self, x: Tensor, extra: int = 0) -> RunningTopK:
        """Training: this shard's k * (global batch) largest ReLU'd pre-activations over all
        tokens. Inference: every entry >= the learnt threshold."""
        if not self.training:
            return _AboveThreshold(self.threshold.to(x.dtype), x.shape[0], len(self.features))
        m = self.cfg.k * int(self.comm.sum_batch(torch.tensor(x.shape[0], device=x.device)).item())
        return _BatchTop(m, x.shape[0], len(self.features), x.device, x.dtype)

    def choose(self, sel) -> tuple[Tensor, Tensor, Tensor]:
        if self.training:
            m = sel.k
            proposals = torch.full((m,), -1.0, device=sel.vals.device, dtype=sel.vals.dtype)
            proposals[:sel.vals.shape[1]] = sel.vals[0]
            thr = self.comm.gather_all(proposals).topk(m).values[-1].clamp_min(0)
            if thr > 0:  # running mean of the batch thresholds: the inference threshold
                self.threshold_steps += 1
                self.threshold += (thr.to(self.threshold.dtype) - self.threshold) / self.threshold_steps
            vals, flat = sel.vals[0], sel.idx[0]
        else:
            thr, vals, flat = sel.thr, torch.cat(sel.vals), torch.cat(sel.flat)
        keep = (vals >= thr) & (vals > 0)
        return per_token(flat[keep] // sel.n, flat[keep] % sel.n, vals[keep], sel.batch)


class _BatchTop(RunningTopK):
    """The m largest ReLU'd entries of [batch, n] whose column blocks arrive one at a time: one
    running row whose ids are token * n + feature."""

    def __init__(self, m: int, batch: int, n: int, device, dtype):
        super().__init__(m, 1, device, dtype)
        self.batch, self.n = batch, n

    def add(self, pre: Tensor, ids) -> None:
        c = pre.shape[1]
        super().add(pre.relu().reshape(1, -1), lambda i: i // c * self.n + ids(i % c))


class _AboveThreshold:
    """Inference selector: every ReLU'd pre-activation >= the learnt threshold, tile by tile."""

    def __init__(self, thr: Tensor, batch: int, n: int):
        self.thr, self.batch, self.n, self.vals, self.flat = thr, batch, n, [], []

    def add(self, pre: Tensor, ids) -> None:
        rows, cols = ((pre >= self.thr) & (pre > 0)).nonzero(as_tuple=True)
        self.vals.append(pre[rows, cols])
        self.flat.append(rows * self.n + ids(cols))


def per_token(rows: Tensor, cols: Tensor, vals: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries (token, feature, value) as per-token lists (idx, values, keep) [batch, width],
    width the most any token has (at least 1), padded with keep = False."""
    counts = torch.bincount(rows, minlength=batch)
    width = max(int(counts.max()) if len(rows) else 0, 1)
    order = rows.argsort(stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    pos = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    idx = torch.zeros(batch, width, dtype=torch.long, device=rows.device)
    out = torch.zeros(batch, width, dtype=vals.dtype, device=rows.device)
    keep = torch.zeros(batch, width, dtype=torch.bool, device=rows.device)
    idx[rows, pos], out[rows, pos], keep[rows, pos] = cols, vals, True
    return idx, out, keep
