"""BatchTopK SAE: Bussmann et al., "BatchTopK Sparse Autoencoders" (2024).

As topk, but the k * batch largest ReLU'd pre-activations of the whole (global) batch are kept,
so the number of active latents varies per token and averages k. Inference uses one global
threshold instead: the running mean over training steps of the smallest activation kept.

Under sharding and data parallelism every rank proposes its largest k * batch values, all ranks
see all proposals, and each keeps its entries at least the (k * batch)-th largest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae.base import SAEConfig
from pipeline.sae.topk import TopK


class BatchTopK(TopK):
    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig, features: range | None = None, device=None):
        super().__init__(cfg, features, device)
        self.register_buffer("threshold", torch.zeros((), device=device))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long, device=device))

    def select_code(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        scores = pre.relu()
        if self.training:
            m = self.cfg.k * int(self.comm.sum_batch(torch.tensor(pre.shape[0], device=pre.device)).item())
            top = scores.flatten().topk(min(m, scores.numel())).values
            proposals = torch.full((m,), -1.0, device=pre.device, dtype=pre.dtype)
            proposals[:len(top)] = top
            thr = self.comm.gather_all(proposals).topk(m).values[-1].clamp_min(0)
            if thr > 0:  # running mean of the batch thresholds: the inference threshold
                self.threshold_steps += 1
                self.threshold += (thr.to(self.threshold.dtype) - self.threshold) / self.threshold_steps
        else:
            thr = self.threshold.to(scores.dtype)
        # per token, the largest entries up to the most any token of this shard keeps
        width = max(int((scores >= thr).logical_and(scores > 0).sum(1).max()), 1)
        top, idx = scores.topk(width, dim=1, sorted=False)
        return idx, (top >= thr) & (top > 0)
