"""ReLU SAE with an L1 penalty weighted by decoder norms: Anthropic, "Scaling Monosemanticity"
and the April 2024 training update.

    f     = ReLU(W_enc x + b_enc)
    x_hat = W_dec^T f + b_dec
    loss  = ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||

Decoder norms are free (they sit inside the penalty), so a feature's activation reads as
f_i ||W_dec,i||. Initialisation: W_enc = W_dec with small row norms, b_enc = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.base import ForwardOutput, SparseAutoencoder, SparseCode, register
from pipeline.sae.tiled import tiled_sum


@register
class ReluL1(SparseAutoencoder):
    architecture = "relu_l1"
    unit_norm_default = False

    def dense_code(self, x: Tensor) -> Tensor:
        """[batch, local features] latent activations, differentiable."""
        return F.relu(F.linear(self.comm.enter(x), self.W_enc, self.b_enc))

    def encode(self, x: Tensor) -> SparseCode:
        return SparseCode.from_dense(self.dense_code(x))

    @classmethod
    def planned_transients(cls, b: int, n: int, d: int, k: int, tile: int, w: int, auxk: bool) -> tuple[int, int]:
        """Untiled, plain autograd keeps the [b, n] code, then its gradient, and the [n, d + 8]
        decode-and-penalty matrix; tiled (tiled.py), one [b, tile] block at a time, recomputed in
        backward."""
        if tile >= n:
            decode = n * (d + 8) * w
            return b * n * w + decode, 2 * b * n * w + decode
        return 2 * b * tile * w, 3 * b * tile * w

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> ForwardOutput:
        x, d = self.comm.enter(x), x.shape[1]
        if self.tile() < len(self.features):  # tiled: no [batch, features] code kept for backward
            out, fired = tiled_sum(self.decode_tile, self.tile(), x, self.W_enc, self.b_enc, self.W_dec)
        else:
            out, f = self.decode_tile(x, self.W_enc, self.b_enc, self.W_dec)
            fired = self.count_fired(f)
        # each shard decodes its features; the partial reconstructions are summed over shards
        x_hat = self.comm.reduce(out[:, :d]) + self.b_dec
        sparsity = self.comm.reduce(self.cfg.sparsity_coef * sparsity_scale * out[:, d].mean())
        return self._finish(x, x_hat, sparsity, torch.zeros_like(sparsity), fired)

    def decode_tile(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor]:
        """([batch, d + 1 (+ pad)] partial reconstruction | sum_i f_i ||W_dec,i||, code f) of a block
        of features (the whole shard, or one tile of it)."""
        # ReLU in place: addmm's backward does not need its output (saves a [batch, features] pass)
        f = F.linear(x, W_enc, b_enc).relu_()
        W = self.decoder_weight(W_dec)
        d = W.shape[1]
        # One matmul decodes and gives the penalty: column d of [W | norms | 0] is sum_i f_i ||W_i||,
        # and its backward adds the penalty's gradient to the code's without another [batch, features]
        # pass. Zero columns pad the width to a multiple of 8 (an odd width is ~30% slower on CPU).
        return f @ F.pad(torch.cat([W, W.norm(dim=1, keepdim=True)], dim=1), (0, -(d + 1) % 8)), f
