"""Sparse encoder and decoder steps for codes with few active latents per token (topk, batchtopk).

A code is `vals [batch, m]` at local feature indices `idx [batch, m]`. The dense work of a step
is then only the encoder's forward matmul; decoding, and the gradients of the decoder and of the
encoder's selected rows, cost O(batch * m * d_model) instead of O(batch * n_features * d_model).
`dense_*` are the plain reference versions the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rows_grad(idx: Tensor, g: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """[n_rows, d] with row r = sum over (b, j) with idx[b, j] = r of g[b, j] * x[b]: the weight
    gradient of a row gather, as one sparse-dense matmul (in fp32: sparse kernels lack bf16 on
    some devices, and the sums are over many tokens)."""
    b, m = idx.shape
    cols = torch.arange(b, device=idx.device).repeat_interleave(m)
    s = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), cols]), g.reshape(-1).float(), (n_rows, b),
                                check_invariants=False)
    return torch.sparse.mm(s, x.float())


class _GatherLinear(torch.autograd.Function):
    """vals[b, j] = x[b] . W[idx[b, j]] + bias[idx[b, j]]: given by the caller in forward (the
    encoder computed them already, tile by tile); backward touches only the selected rows."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, bias: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
        ctx.save_for_backward(x, W, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, W, idx = ctx.saved_tensors
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.embedding_bag(idx, W, per_sample_weights=g.to(W.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            gW = rows_grad(idx, g, x, W.shape[0]).to(W.dtype)
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(W.shape[0], device=g.device, dtype=W.dtype).index_add_(0, idx.reshape(-1), g.reshape(-1).to(W.dtype))
        return gx, gW, gb, None, None


def gather_linear(x: Tensor, W: Tensor, bias: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
    """The entries `vals` = (x @ W.T + bias).gather(1, idx), computed without grad by the caller,
    made differentiable in x, W and bias through the selected rows only."""
    return _GatherLinear.apply(x, W, bias, idx, vals.detach())


class _SparseDecode(torch.autograd.Function):
    """embedding_bag, with W's gradient as one sparse matmul: its own backward sorts the indices
    and fills a dense gradient first, about twice the time."""

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        ctx.save_for_backward(vals, idx, W)
        return F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, idx, W = ctx.saved_tensors
        gvals = gW = None
        if ctx.needs_input_grad[0]:  # g[b] . W[idx[b, j]]: embedding_bag's own kernel for it is the fastest
            with torch.enable_grad():
                v = vals.detach().requires_grad_()
                gvals, = torch.autograd.grad(F.embedding_bag(idx, W.detach(), per_sample_weights=v, mode="sum"), v, g)
        if ctx.needs_input_grad[2]:
            gW = rows_grad(idx, vals, g, W.shape[0]).to(W.dtype)
        return gvals, None, gW


def sparse_decode(vals: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """sum_j vals[b, j] * W[idx[b, j]]  ->  [batch, d]; gradients only for the rows used."""
    if idx.shape[1] == 0:  # nothing selected in this shard (embedding_bag rejects empty bags)
        return W.new_zeros(idx.shape[0], W.shape[1])
    return _SparseDecode.apply(vals.to(W.dtype), idx, W)


def dense_gather_linear(x: Tensor, W: Tensor, bias: Tensor, idx: Tensor) -> Tensor:
    return F.linear(x, W, bias).gather(1, idx)


def dense_decode(vals: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    code = torch.zeros(vals.shape[0], W.shape[0], dtype=W.dtype, device=W.device).scatter_add(1, idx, vals.to(W.dtype))
    return code @ W
