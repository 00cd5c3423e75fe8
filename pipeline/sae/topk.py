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
The encoder runs tile by tile (SAEConfig.feature_tile) into running top-k's (tiled.py): the code
and the AuxK candidates, so no [batch, local features] matrix is needed even for AuxK.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.base import ForwardOutput, SparseAutoencoder, SparseCode, register
from pipeline.sae.sparse import gather_dot, gather_linear, native_bf16_matmul, sparse_decode
from pipeline.sae.tiled import RunningTopK, tiles

SCAN_EXTRA = 16
"""Candidates a bf16 scan keeps beyond k (or k / 2 if more): on SmolLM2 layer-15 rows at init, the
exact top 32 was among the bf16 top 32 + 16 on every one of 4,096 rows at 4,096 and 65,536 latents
(+ 4: 0.1% and 1% of rows differed; + 0: 27% and 49%)."""


@register
class TopK(SparseAutoencoder):
    architecture = "topk"
    uses_k = sparse_step = True
    saelens_architecture = "topk"
    saelens_apply_b_dec_to_input = True
    forward_tiles = 1.25
    """[b, tile] pre-activation tiles the planner counts in forward: one, and at most a quarter
    tile of AuxK's dead columns."""
    running_topks = 2
    """Running top-k's of 4 b k (w + 8) bytes the planner counts in both phases (a bf16 scan keeps k +
    max(16, k / 2) candidates: at most 2k for k >= 16)."""
    refinable = True
    """Its selector is per token, so a low-precision scan can be refined (scan_precision)."""

    @classmethod
    def saelens_config(cls, config: dict) -> dict:
        return {"k": config["k"], "rescale_acts_by_decoder_norm": False}

    @classmethod
    def planned_communication_bytes(cls, b: int, k: int, fp: int) -> int:
        """Every feature shard's k proposals per token (values and int64 indices), gathered."""
        return 2 * b * k * 12 * fp

    @classmethod
    def planned_transients(cls, b: int, n: int, d: int, k: int, tile: int, w: int, auxk: bool) -> tuple[int, int]:
        """Forward: the pre-activation tiles (no grad) and the running top-k's (tiled.py). Backward
        (sparse.py): the running top-k's, and with AuxK on, its code's W_enc and W_dec gradients,
        two dense [n, d] tensors held until autograd adds the main path's."""
        running = 4 * b * k * (w + 8) * cls.running_topks
        return int(cls.forward_tiles * b * tile * w) + running, 2 * n * d * w * auxk + running

    def encoder_bias(self) -> Tensor:
        """b_enc - W_enc b_dec [features], no grad: W_enc (x - b_dec) + b_enc = W_enc x + this, so
        the tiles' pre-activations are one addmm each (gradients: sparse.gather_linear)."""
        with torch.no_grad():
            return self.b_enc - self.W_enc @ self.b_dec

    def scan(self, x: Tensor, bias: Tensor, aux_k: int = 0, dead: Tensor | None = None) -> tuple:
        """One pass over the encoder's tiles, without grad: (the code's selector, the running
        top aux_k over the dead latents or None). With a low-precision scan (scan_dtype) each keeps
        `extra` more candidates, then only their exact pre-activations compete (refine)."""
        low = self.scan_dtype(x)
        extra = 0 if low is None else max(SCAN_EXTRA, self.cfg.k // 2)
        sel = self.selector(x, extra)
        aux = RunningTopK(aux_k + extra, x.shape[0], x.device, x.dtype) if aux_k else None
        with torch.no_grad():
            xs, bs = (x, bias) if low is None else (x.to(low), bias.to(low))
            for t in tiles(len(self.features), self.tile()):
                pre = torch.addmm(bs[t], xs, self.W_enc[t].to(xs.dtype).t())
                sel.add(pre, lambda i, s=t.start: i + s)
                if aux is not None:  # only this tile's dead columns compete
                    cols = dead[t].nonzero().squeeze(1)
                    if 4 * len(cols) <= pre.shape[1]:  # few: copy them out (at most a quarter tile)
                        aux.add(pre.index_select(1, cols), lambda i, c=cols + t.start: c[i])
                    else:  # many: hide the live ones in place (-inf is never among the k kept)
                        aux.add(pre.masked_fill_(~dead[t], float("-inf")), lambda i, s=t.start: i + s)
            if low is not None:
                self.refine(sel, x, bias, self.cfg.k)
                if aux is not None:
                    self.refine(aux, x, bias, aux_k)
        return sel, aux

    def scan_dtype(self, x: Tensor) -> torch.dtype | None:
        """bf16 where sae.scan_precision asks for it (or `auto` finds fp32 weights on a device with
        native bf16 matmuls), else None: the scan runs in x's dtype."""
        p = self.cfg.scan_precision
        if not self.refinable or p == "exact" or x.dtype == torch.bfloat16:
            return None
        return torch.bfloat16 if p == "bf16" or (x.dtype == torch.float32 and native_bf16_matmul(x.device)) else None

    def refine(self, sel: RunningTopK, x: Tensor, bias: Tensor, k: int) -> None:
        """Keep the k of `sel`'s candidates whose exact pre-activations are largest, with those values.
        A -inf candidate (a live latent hidden from AuxK) stays -inf."""
        exact = gather_dot(sel.idx, self.W_enc, x).add_(bias[sel.idx])
        exact = exact.masked_fill_(sel.vals == float("-inf"), float("-inf")).to(x.dtype)
        j = exact.topk(min(k, exact.shape[1]), dim=1, sorted=False).indices
        sel.idx, order = sel.idx.gather(1, j).sort(dim=1)  # in latent order: not the candidates' order,
        sel.vals = exact.gather(1, j).gather(1, order)    # which bf16 rounding decides
        sel.k = k

    def selector(self, x: Tensor, extra: int = 0) -> RunningTopK:
        """What the code keeps while the tiles go by: the k + extra largest per token (batchtopk overrides)."""
        return RunningTopK(self.cfg.k + extra, x.shape[0], x.device, x.dtype)

    def choose(self, sel: RunningTopK) -> tuple[Tensor, Tensor, Tensor]:
        """(local idx [batch, m], their pre-activations, mask of the kept ones) of the code."""
        return sel.idx, sel.vals, self.keep_global(sel.vals, self.cfg.k)

    def keep_global(self, top: Tensor, k: int) -> Tensor:
        """Which of this shard's per-row candidates `top` [batch, <=k] are among the k largest of
        their row over all shards: every shard proposes k (padded), all see all proposals."""
        proposals = F.pad(top, (0, k - top.shape[1]), value=float("-inf"))
        kth = self.comm.gather_features(proposals).topk(k, dim=1).values[:, -1:]
        return top >= kth

    def code(self, x: Tensor, b_dec: Tensor, idx: Tensor, pre: Tensor, keep: Tensor) -> Tensor:
        """Differentiable ReLU'd values of the selected latents (pre: their pre-activations, no
        grad); zero where not kept. b_dec: self.comm.enter(self.b_dec), entered once per forward,
        so that its gradient's all-reduce runs once on every shard, also on a shard whose AuxK code
        is empty (and so not part of the graph)."""
        vals = gather_linear(x, self.W_enc, self.b_enc, b_dec, idx, pre)
        return torch.where(keep, vals.relu(), torch.zeros_like(vals))

    def encode(self, x: Tensor) -> SparseCode:
        idx, pre, keep = self.choose(self.scan(x, self.encoder_bias())[0])
        return SparseCode(self.code(x, self.comm.enter(self.b_dec), idx, pre, keep), idx)

    def decode(self, vals: Tensor, idx: Tensor) -> Tensor:
        """This shard's partial reconstruction (no bias)."""
        return sparse_decode(vals, idx, self.W_dec, self.unit_norm)

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> ForwardOutput:
        dead = self.dead_mask()
        aux_k = self.aux_k(dead)
        sel, aux_sel = self.scan(x, self.encoder_bias(), aux_k, dead)
        idx, pre, keep = self.choose(sel)
        b_dec = self.comm.enter(self.b_dec)
        vals = self.code(x, b_dec, idx, pre, keep)
        x_hat = self.comm.reduce(self.decode(vals, idx)) + self.b_dec
        aux = self.auxk(x, x_hat, b_dec, aux_sel, aux_k)
        fired = torch.bincount(idx[vals > 0], minlength=len(self.features))
        zero = torch.zeros((), device=x.device, dtype=x_hat.dtype)
        return self._finish(x, x_hat, zero, aux, fired)

    def aux_k(self, dead: Tensor) -> int:
        """Latents AuxK decodes: k_aux, at most the dead ones of all shards; 0 when AuxK is off."""
        if not self.training or self.cfg.k_aux == 0:
            return 0
        return min(self.cfg.k_aux, int(self.comm.sum_features(dead.sum()).item()))

    def auxk(self, x: Tensor, x_hat: Tensor, b_dec: Tensor, sel: RunningTopK | None, k: int) -> Tensor:
        """alpha * ||e - e_hat||^2, e_hat decoded from the top k dead latents (0 if none). A shard
        may hold no dead latent: it still takes part in the global selection, with an empty code."""
        if sel is None:
            return torch.zeros((), device=x.device, dtype=x_hat.dtype)
        idx = sel.idx
        e_hat = self.comm.reduce(self.decode(self.code(x, b_dec, idx, sel.vals, self.keep_global(sel.vals, k)), idx))
        e = (x.float() - x_hat.float()).detach()  # fp32 under bf16, like the MSE (engine.py)
        return self.cfg.aux_coef * (e - e_hat.float()).pow(2).sum(-1).mean()
