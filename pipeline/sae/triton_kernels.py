"""Triton kernels for the sparse code's gathers and scatters (sparse.py), used on CUDA.

A code is `vals [B, m]` at local feature indices `idx [B, m]` (int64, each in [0, n_rows); the
same index may occur more than once, in one token's row or across tokens). `W [n_rows, d]` is a
dictionary shard's decoder (or encoder) matrix, fp32 or bf16. Every kernel accumulates in fp32
and rounds once at the end; each wrapper makes its inputs contiguous and returns a new tensor.

    gather_sum(idx, W, v)        -> [B, d], W.dtype:  out[b] = sum_j v[b, j] * W[idx[b, j]]
        the decoder's forward (and the encoder's input gradient, with v = the code's gradient):
        F.embedding_bag(idx, W, per_sample_weights=v, mode="sum"). One program per (token,
        BLOCK_D columns); it loads BLOCK_M (index, value) pairs at a time and their rows'
        [BLOCK_M, BLOCK_D] slab, masked at the ends (m and d need not be multiples of the blocks).
    gather_dot(idx, W, g)        -> [B, m], W.dtype:  out[b, j] = g[b] . W[idx[b, j]]
        the decoder's gradient in the code values. One program per (token, BLOCK_M entries),
        looping over d in BLOCK_D columns.
    rows_grad(idx, g, x, n_rows) -> [n_rows, d], fp32: out[r] = sum over (b, j) with
        idx[b, j] = r of g[b, j] * x[b]
        the weight gradient of a row gather: the decoder's (g = the code values, x = the
        output's gradient) and the encoder's (g = the code's gradient, x = x - b_dec), as
        sparse.rows_grad. One program per (token, BLOCK_D columns) adds g[b, j] * x[b, cols]
        into row idx[b, j] with fp32 atomic adds.

Why atomics: the rows a batch touches are scattered over the shard and repeat (across tokens,
and in tests within a token); the alternative, sorting (b, j) by index and reducing segments (what
embedding_bag's own backward does), costs a sort and a second pass. An atomic add is per element,
so duplicate indices, in one vector or in concurrent programs, all land; fp32 atomics are native
on every CUDA GPU (bf16 ones are not), and the sums run over many tokens, hence the fp32 result.
The price is the order of the additions: on a GPU it varies between runs, so rows_grad is
reproducible to fp32 rounding (a few ulp of the row's sum of |terms|), not bit for bit.

Dispatch is sparse.triton_for(*tensors): these kernels when the tensors are on CUDA and triton
imports, else the torch code in sparse.py, which stays the CPU path and the reference. With
TRITON_INTERPRET=1 set before this module is imported, triton decorates the kernels for its
interpreter, and they run on CPU tensors too (the tests: tests/test_triton_kernels.py).
Importing this module without triton installed succeeds, with AVAILABLE = False.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: sparse.py keeps to torch
    triton = tl = None

AVAILABLE = triton is not None
# whether the kernels below are decorated for the interpreter: triton.jit reads this when it
# decorates, i.e. once, on import (triton.knobs from 3.4; before it, the variable itself)
INTERPRETED = AVAILABLE and (bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")
                             else os.environ.get("TRITON_INTERPRET", "0") == "1")

BLOCK_M = 16   # code entries per load: one masked block for k <= 16, a loop over blocks above
BLOCK_D = 128  # columns per program


if AVAILABLE:
    @triton.jit
    def _entries(idx_ptr, val_ptr, b, m, js):
        """Row b's entries js of the sparse code: (feature rows, fp32 values, mask of js < m)."""
        jmask = js < m
        rows = tl.load(idx_ptr + b * m + js, mask=jmask, other=0)
        return rows, tl.load(val_ptr + b * m + js, mask=jmask, other=0.0).to(tl.float32), jmask

    @triton.jit
    def _rows_tile(w_ptr, rows, cols, d, jmask, cmask):
        """The [rows, cols] tile of the row-major [n, d] matrix at w_ptr, in fp32 (0 where masked)."""
        return tl.load(w_ptr + rows[:, None] * d + cols[None, :], mask=jmask[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _gather_sum_kernel(idx_ptr, w_ptr, v_ptr, out_ptr, m, d,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < d
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j0 in range(0, m, BLOCK_M):
            rows, v, jmask = _entries(idx_ptr, v_ptr, b, m, j0 + tl.arange(0, BLOCK_M))
            w = _rows_tile(w_ptr, rows, cols, d, jmask, cmask)
            acc += tl.sum(v[:, None] * w, axis=0)
        tl.store(out_ptr + b * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _gather_dot_kernel(idx_ptr, w_ptr, g_ptr, out_ptr, m, d,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        js = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        jmask = js < m
        rows = tl.load(idx_ptr + b * m + js, mask=jmask, other=0)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            g = tl.load(g_ptr + b * d + cols, mask=cmask, other=0.0).to(tl.float32)
            w = _rows_tile(w_ptr, rows, cols, d, jmask, cmask)
            acc += tl.sum(w * g[None, :], axis=1)
        tl.store(out_ptr + b * m + js, acc.to(out_ptr.dtype.element_ty), mask=jmask)

    @triton.jit
    def _rows_grad_kernel(idx_ptr, g_ptr, x_ptr, out_ptr, m, d,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < d
        x = tl.load(x_ptr + b * d + cols, mask=cmask, other=0.0).to(tl.float32)
        for j0 in range(0, m, BLOCK_M):
            rows, g, jmask = _entries(idx_ptr, g_ptr, b, m, j0 + tl.arange(0, BLOCK_M))
            tl.atomic_add(out_ptr + rows[:, None] * d + cols[None, :], g[:, None] * x[None, :],
                          mask=jmask[:, None] & cmask[None, :], sem="relaxed")


def _inputs(idx: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The kernels' operands: int64 indices (row offsets idx * d overflow int32 on big shards),
    everything contiguous (the kernels assume row-major [rows, d] and [B, m])."""
    if not AVAILABLE:
        raise RuntimeError("pipeline.sae.triton_kernels needs the triton package (pip install triton)")
    assert idx.dim() == 2 and all(t.dim() == 2 for t in tensors), (idx.shape, [t.shape for t in tensors])
    return (idx.long().contiguous(), *(t.contiguous() for t in tensors))


def gather_sum(idx: Tensor, W: Tensor, v: Tensor, block_m: int = BLOCK_M, block_d: int = BLOCK_D) -> Tensor:
    """out[b] = sum_j v[b, j] * W[idx[b, j]]  ->  [B, d] in W.dtype (fp32 accumulation)."""
    (B, m), d = idx.shape, W.shape[1]
    assert v.shape == (B, m), (v.shape, idx.shape)
    out = (torch.zeros if m == 0 else torch.empty)(B, d, device=W.device, dtype=W.dtype)  # no entries: zeros
    if B and m:
        _gather_sum_kernel[(B, triton.cdiv(d, block_d))](*_inputs(idx, W, v), out, m, d,
                                                         BLOCK_M=block_m, BLOCK_D=block_d)
    return out


def gather_dot(idx: Tensor, W: Tensor, g: Tensor, block_m: int = BLOCK_M, block_d: int = BLOCK_D) -> Tensor:
    """out[b, j] = g[b] . W[idx[b, j]]  ->  [B, m] in W.dtype (fp32 accumulation)."""
    (B, m), d = idx.shape, W.shape[1]
    assert g.shape == (B, d), (g.shape, idx.shape, W.shape)
    out = torch.empty(B, m, device=W.device, dtype=W.dtype)
    if B and m:
        _gather_dot_kernel[(B, triton.cdiv(m, block_m))](*_inputs(idx, W, g), out, m, d,
                                                         BLOCK_M=block_m, BLOCK_D=block_d)
    return out


def rows_grad(idx: Tensor, g: Tensor, x: Tensor, n_rows: int, block_m: int = BLOCK_M,
              block_d: int = BLOCK_D) -> Tensor:
    """out[r] = sum over (b, j) with idx[b, j] = r of g[b, j] * x[b]  ->  [n_rows, d] fp32, as
    sparse.rows_grad (atomic adds: duplicate indices all count; order, so last bits, may vary)."""
    (B, m), d = idx.shape, x.shape[1]
    assert g.shape == (B, m) and x.shape[0] == B, (idx.shape, g.shape, x.shape)
    out = torch.zeros(n_rows, d, device=x.device, dtype=torch.float32)
    if B and m:
        _rows_grad_kernel[(B, triton.cdiv(d, block_d))](*_inputs(idx, g, x), out, m, d,
                                                        BLOCK_M=block_m, BLOCK_D=block_d)
    return out
