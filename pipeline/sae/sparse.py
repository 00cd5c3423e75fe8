"""Sparse encoder and decoder steps for codes with few active latents per token (topk, batchtopk).

A code is `vals [batch, m]` at local feature indices `idx [batch, m]`. The dense work of a step
is then only the encoder's forward matmul; decoding, and the gradients of the decoder and of the
encoder's selected rows, cost O(batch * m * d_model) instead of O(batch * n_features * d_model).
`dense_*` are the plain reference versions the tests compare against.

On CUDA, with triton installed, the gathers and scatters run as the Triton kernels of
triton_kernels.py (see triton_for); the torch code here is the CPU path and their reference.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # gather_dot's pattern


@functools.cache
def native_bf16_matmul(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively, several times faster than fp32: a CUDA GPU
    with bf16, or a CPU with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo, so False off Linux).
    Without them oneDNN emulates bf16, slower than fp32 (FACTS.md: ~7x on an AVX2 machine)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def triton_for(*tensors: Tensor):
    """The triton_kernels module if these tensors should use it, else None (the torch code here):
    they are all on CUDA and triton imports, or TRITON_INTERPRET=1 was set before the kernels
    were defined (triton's interpreter, which runs them on CPU tensors: the CPU tests). triton is
    imported only here, on first use, so a CPU process never pays for it."""
    cuda = all(t.is_cuda for t in tensors)
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    from pipeline.sae import triton_kernels as tk
    return tk if tk.AVAILABLE and (cuda or tk.INTERPRETED) else None


def rows_grad(idx: Tensor, g: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """[n_rows, d] with row r = sum over (b, j) with idx[b, j] = r of g[b, j] * x[b]: the weight
    gradient of a row gather, as one sparse-dense matmul (in fp32: sparse kernels lack bf16 on
    some devices, and the sums are over many tokens). Into zeros with addmm_: torch.sparse.mm
    makes a second [n_rows, d] tensor on the way (and is ~1.6x slower on CPU)."""
    b, m = idx.shape
    cols = torch.arange(b, device=idx.device).repeat_interleave(m)
    s = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), cols]), g.reshape(-1).float(), (n_rows, b),
                                check_invariants=False)
    return torch.zeros(n_rows, x.shape[1], device=x.device, dtype=torch.float32).addmm_(s, x.float())


def gather_dot(idx: Tensor, W: Tensor, x: Tensor) -> Tensor:
    """[b, m] with entry (b, j) = x[b] . W[idx[b, j]], in W's dtype with fp32 accumulation, without
    forming [b, features]: the Triton kernel on CUDA, else one sampled dense-dense product
    (torch.sparse.sampled_addmm at idx's pattern, ~5 ms for 4,096 x 64 entries at d = 576 on 2 CPU
    cores, where gathering the [b, m, d] rows first takes ~20x that)."""
    tk = triton_for(x, W, idx)
    if tk:
        return tk.gather_dot(idx, W, x.to(W.dtype))
    b, m = idx.shape
    if b * m == 0:
        return torch.empty(b, m, device=W.device, dtype=W.dtype)
    cols, order = idx.sort(dim=1)  # a CSR pattern lists each row's columns in order
    crow = torch.arange(0, b * m + 1, m, device=idx.device)
    pattern = torch.sparse_csr_tensor(crow, cols.reshape(-1), torch.zeros(b * m, device=W.device, dtype=W.dtype),
                                      (b, W.shape[0]), check_invariants=False)
    out = torch.sparse.sampled_addmm(pattern, x.to(W.dtype), W.t(), beta=0.0).values().view(b, m)
    return torch.empty_like(out).scatter_(1, order, out)  # back to idx's order


class _GatherLinear(torch.autograd.Function):
    """vals[b, j] = W[idx[b, j]] . (x[b] - c) + bias[idx[b, j]]: given by the caller in forward
    (the encoder computed them already, tile by tile); backward touches only the selected rows.
    The centre c (topk's b_dec) is an input of its own so that W's gradient is one sparse
    product with x - c, not that plus a dense rank-one [features, d] term from W @ c."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, bias: Tensor, c: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
        ctx.save_for_backward(x, W, c, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, W, c, idx = ctx.saved_tensors
        tk = triton_for(x, W, idx)
        gx = gW = gb = gc = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:  # sum_j g[b, j] W[idx[b, j]]
            gx = (tk.gather_sum(idx, W, g.to(W.dtype)) if tk else
                  F.embedding_bag(idx, W, per_sample_weights=g.to(W.dtype), mode="sum"))
            gc = -gx.sum(0) if ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[1]:
            gW = (tk.rows_grad if tk else rows_grad)(idx, g, x - c, W.shape[0]).to(W.dtype)
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(W.shape[0], device=g.device, dtype=W.dtype).index_add_(0, idx.reshape(-1), g.reshape(-1).to(W.dtype))
        return gx if ctx.needs_input_grad[0] else None, gW, gb, gc, None, None


def gather_linear(x: Tensor, W: Tensor, bias: Tensor, c: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
    """The entries `vals` = ((x - c) @ W.T + bias).gather(1, idx), computed without grad by the
    caller, made differentiable in x, W, bias and c through the selected rows only."""
    return _GatherLinear.apply(x, W, bias, c, idx, vals.detach())


class _SparseDecode(torch.autograd.Function):
    """embedding_bag, with W's gradient as one sparse matmul: its own backward sorts the indices
    and fills a dense gradient first, about twice the time. With unit-norm rows the rows are
    divided by their norms inside, so W's gradient stays that one [features, d] tensor (autograd
    through W / ||W|| would add a second, dense one)."""

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W: Tensor, unit_norm: bool) -> Tensor:
        inv = W.norm(dim=1).reciprocal() if unit_norm else None
        v = vals * inv[idx] if unit_norm else vals  # weights of the raw rows
        ctx.save_for_backward(v, idx, W, inv)
        ctx.unit_norm = unit_norm
        tk = triton_for(W, idx)
        return tk.gather_sum(idx, W, v) if tk else F.embedding_bag(idx, W, per_sample_weights=v, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        v, idx, W, inv = ctx.saved_tensors
        tk = triton_for(W, idx)
        gvals = gW = None
        if ctx.needs_input_grad[0] and tk:  # g[b] . W[idx[b, j]]
            gvals = tk.gather_dot(idx, W, g)
        elif ctx.needs_input_grad[0]:  # on CPU embedding_bag's own kernel for it is the fastest
            with torch.enable_grad():
                v_ = v.detach().requires_grad_()
                gvals, = torch.autograd.grad(F.embedding_bag(idx, W.detach(), per_sample_weights=v_, mode="sum"), v_, g)
        if gvals is not None and ctx.unit_norm:
            gvals = gvals * inv[idx]
        if ctx.needs_input_grad[2]:
            gW = (tk.rows_grad if tk else rows_grad)(idx, v, g, W.shape[0]).to(W.dtype)
            if ctx.unit_norm:  # d(W_r / |W_r|): remove the part along W_r
                _remove_parallel(gW, W, inv)
        return gvals, None, gW, None


def _remove_parallel(gW: Tensor, W: Tensor, inv: Tensor, block: int = 16384) -> None:
    """gW[r] -= (gW[r] . W[r]) / |W[r]|^2 * W[r] for every row, in place, a block of rows at a
    time (temporaries [block, d]). Over all rows rather than the rows used: gW is a dense
    [features, d] tensor whose unused rows are zero, so their correction is exactly zero, and
    blocks of contiguous rows need no row ids. Finding the used rows instead (idx.unique(), a
    sort of batch x k ids) and gathering and scattering them costs more than the whole pass on
    CPU at 4,096 latents: torch's CPU sort of 32,768 ids takes 0.6 ms on one thread, and ~170 ms
    on two threads when another process holds one of the two cores."""
    for s in range(0, W.shape[0], block):
        g, w = gW[s:s + block], W[s:s + block]
        coef = (g * w).sum(1, keepdim=True) * inv[s:s + block, None] ** 2
        g.sub_(w * coef)


def sparse_decode(vals: Tensor, idx: Tensor, W: Tensor, unit_norm: bool = False) -> Tensor:
    """sum_j vals[b, j] * W[idx[b, j]] (rows divided by their norms if unit_norm)  ->  [batch, d];
    gradients only for the rows used."""
    if idx.shape[1] == 0:  # nothing selected in this shard (embedding_bag rejects empty bags)
        return W.new_zeros(idx.shape[0], W.shape[1])
    return _SparseDecode.apply(vals.to(W.dtype), idx, W, unit_norm)


def dense_gather_linear(x: Tensor, W: Tensor, bias: Tensor, c: Tensor, idx: Tensor) -> Tensor:
    return F.linear(x - c, W, bias).gather(1, idx)


def dense_decode(vals: Tensor, idx: Tensor, W: Tensor, unit_norm: bool = False) -> Tensor:
    code = torch.zeros(vals.shape[0], W.shape[0], dtype=W.dtype, device=W.device).scatter_add(1, idx, vals.to(W.dtype))
    return code @ (W / W.norm(dim=1, keepdim=True) if unit_norm else W)
