"""TopK SAE: Gao et al., "Scaling and evaluating sparse autoencoders" (OpenAI, 2024).

    z     = ReLU(TopK_k(W_enc (x - b_dec) + b_enc))
    x_hat = W_dec^T z + b_dec
    loss  = ||x - x_hat||^2 + alpha ||e - e_hat||^2

where e = x - x_hat (no grad) and e_hat decodes the top k_aux *dead* latents (AuxK). Decoder rows
have unit norm, gradients parallel to them removed (see decoder_weight). Tied init W_enc = W_dec;
b_dec (Gao's b_pre) starts at the data mean.

Under feature sharding the top-k is global: each shard proposes its local top k, every shard
sees all proposals, and keeps its candidates that are at least the k-th largest overall. Only the
encoder's forward matmul is dense; decoding and gradients use the k active rows (sparse.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.base import ForwardOutput, SparseAutoencoder
from pipeline.sae.sparse import gather_linear, sparse_decode


class TopK(SparseAutoencoder):
    architecture = "topk"

    def pre_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(encoder bias, dense pre-activations without grad) for this shard's features.
        W_enc (x - b_dec) + b_enc = W_enc x + (b_enc - W_enc b_dec): b_dec enters the sharded
        encoder through a [features] bias, so no [batch, d_model] gradient is ever formed."""
        bias = self.b_enc - self.W_enc @ self.comm.enter(self.b_dec)
        with torch.no_grad():
            pre = torch.addmm(bias, x, self.W_enc.t())
        return bias, pre

    def select(self, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Global top-k per row of `scores` [batch, local features]: local indices [batch, <=k]
        and a mask of those that are among the k largest over all shards."""
        top, idx = scores.topk(min(k, scores.shape[1]), dim=1, sorted=False)
        proposals = F.pad(top, (0, k - top.shape[1]), value=float("-inf"))  # k from every shard
        kth = self.comm.gather_features(proposals).topk(k, dim=1).values[:, -1:]
        return idx, top >= kth

    def select_code(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Which latents are active: the k largest of each token (batchtopk overrides this)."""
        return self.select(pre, self.cfg.k)

    def code(self, x: Tensor, bias: Tensor, pre: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
        """Differentiable ReLU'd values of the selected latents; zero where not kept."""
        vals = gather_linear(x, self.W_enc, bias, idx, pre)
        return torch.where(keep, vals.relu(), torch.zeros_like(vals))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse code (vals [batch, k], local idx [batch, k])."""
        bias, pre = self.pre_acts(x)
        idx, keep = self.select_code(pre)
        return self.code(x, bias, pre, idx, keep), idx

    def decode(self, vals: Tensor, idx: Tensor) -> Tensor:
        """This shard's partial reconstruction (no bias)."""
        return sparse_decode(vals * self.inv_decoder_norm()[idx], idx, self.W_dec)

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> ForwardOutput:
        dead = self.dead_mask()
        bias, pre = self.pre_acts(x)
        idx, keep = self.select_code(pre)
        vals = self.code(x, bias, pre, idx, keep)
        x_hat = self.comm.reduce(self.decode(vals, idx)) + self.b_dec
        aux = self.auxk(x, x_hat, bias, pre, dead)
        fired = torch.bincount(idx[vals > 0], minlength=len(self.features))
        zero = torch.zeros((), device=x.device, dtype=x_hat.dtype)
        return self._finish(x, x_hat, zero, aux, fired)

    def auxk(self, x: Tensor, x_hat: Tensor, bias: Tensor, pre: Tensor, dead: Tensor) -> Tensor:
        """alpha * ||e - e_hat||^2, e_hat decoded from the top k_aux dead latents (0 if none)."""
        zero = torch.zeros((), device=x.device, dtype=x_hat.dtype)
        if not self.training or self.cfg.k_aux == 0:
            return zero
        n_dead = int(self.comm.sum_features(dead.sum()).item())
        if n_dead == 0:
            return zero
        dead_idx = dead.nonzero().squeeze(1)  # select among the dead columns only (may be none here)
        local, keep = self.select(pre.index_select(1, dead_idx), min(self.cfg.k_aux, n_dead))
        idx = dead_idx[local]
        e_hat = self.comm.reduce(self.decode(self.code(x, bias, pre, idx, keep), idx))
        e = (x - x_hat).detach()
        return self.cfg.aux_coef * (e - e_hat).pow(2).sum(-1).mean()
