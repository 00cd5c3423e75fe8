"""Feature tiles: a training step that never forms the [batch, local features] pre-activations.

A shard's encoder is computed `feature_tile` features at a time (SAEConfig.feature_tile).

- topk, batchtopk need only the selected entries: `RunningTopK` keeps, per row, the k largest
  entries seen so far and their column ids, so peak memory is one tile plus O(batch * k). The
  selected values then enter autograd through sparse.gather_linear, which needs no dense matrix.
- relu_l1, jumprelu need every entry, in backward too: `tiled_sum` runs a tile function tile by
  tile and keeps only its inputs (x and the parameters, no copies); backward recomputes each tile
  (one more encoder matmul per step) and writes the tile's gradients into full-size ones.

With one tile (feature_tile = 0) topk/batchtopk run the same code; relu_l1/jumprelu then keep
plain autograd, which saves the code for backward instead of recomputing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def tiles(n: int, tile: int) -> Iterator[slice]:
    """Consecutive blocks of `tile` features covering range(n) (the last may be shorter)."""
    for start in range(0, n, tile):
        yield slice(start, min(start + tile, n))


class RunningTopK:
    """Per row, the k largest entries of a matrix whose column blocks arrive one at a time."""

    def __init__(self, k: int, rows: int, device=None, dtype=torch.float32):
        self.k = k
        self.vals = torch.empty(rows, 0, device=device, dtype=dtype)
        self.idx = torch.empty(rows, 0, device=device, dtype=torch.long)

    def add(self, scores: Tensor, ids: Callable[[Tensor], Tensor]) -> None:
        """Offer the entries of `scores` [rows, c]; `ids` maps their column positions (0..c-1) to
        the ids to report (e.g. + the tile's first feature)."""
        if scores.shape[1] == 0 or self.k == 0:
            return
        top, i = scores.topk(min(self.k, scores.shape[1]), dim=1, sorted=False)
        vals, idx = torch.cat([self.vals, top], 1), torch.cat([self.idx, ids(i)], 1)
        if vals.shape[1] > self.k:  # merge: the k largest of the old k and the tile's k
            vals, j = vals.topk(self.k, dim=1, sorted=False)
            idx = idx.gather(1, j)
        self.vals, self.idx = vals, idx


class _TiledSum(torch.autograd.Function):
    """sum over feature tiles t of fn(x, p1[t], p2[t], ...)[0]; saves no activation."""

    @staticmethod
    def forward(ctx, fn, tile: int, x: Tensor, *params: Tensor):
        ctx.fn, ctx.tile = fn, tile
        ctx.save_for_backward(x, *params)
        n = params[0].shape[0]
        total, fired = None, torch.zeros(n, dtype=torch.long, device=x.device)
        for t in tiles(n, tile):
            out, f = fn(x, *(p[t] for p in params))
            total = out if total is None else total.add_(out)
            fired[t] = torch.sign(f).sum(0).long()  # as SparseAutoencoder.count_fired
        ctx.mark_non_differentiable(fired)
        return total, fired

    @staticmethod
    def backward(ctx, g: Tensor, _):
        x, *params = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        grads = [torch.zeros_like(t) if n else None for t, n in zip([x, *params], need)]
        for t in tiles(params[0].shape[0], ctx.tile):
            with torch.enable_grad():  # recompute this tile's forward, then its gradients
                xt = x.detach().requires_grad_(need[0])
                pt = [p[t].detach().requires_grad_(n) for p, n in zip(params, need[1:])]
                out, _ = ctx.fn(xt, *pt)
                inputs = [v for v, n in zip([xt, *pt], need) if n]
                tile_grads = iter(torch.autograd.grad(out, inputs, g, allow_unused=True))
            for i, n in enumerate(need):
                gt = next(tile_grads) if n else None
                if gt is None:
                    continue
                if i == 0:
                    grads[0] += gt
                else:
                    grads[i][t] = gt
        return None, None, *grads


def tiled_sum(fn: Callable[..., tuple[Tensor, Tensor]], tile: int, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over tiles of fn's first output, [features] tokens on which fn's second output, a
    [batch, tile] code, is non-zero). fn(x, *tile_params) must act on each feature independently
    (every param has features along dim 0): then the sum is fn over the whole shard."""
    return _TiledSum.apply(fn, tile, x, *params)
