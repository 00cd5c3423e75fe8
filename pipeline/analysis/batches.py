"""Held-out text as batches of contexts, the massive-activation rule every metric and example list
applies, and token text for display."""

from __future__ import annotations

from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from pipeline.data import DataConfig, iter_documents, pack_contexts
from pipeline.errors import EmptyDataError


def context_batches(data: DataConfig, tokenizer, context_size: int, n_tokens: int,
                    batch_size: int) -> Iterator[Tensor]:
    """[batch, context_size] token ids (each context starts with BOS) until n_tokens positions."""
    n_contexts = max(1, -(-n_tokens // context_size))
    contexts = islice(pack_contexts(iter_documents(data), tokenizer, context_size), n_contexts)
    empty = True
    while batch := list(islice(contexts, batch_size)):
        empty = False
        yield torch.from_numpy(np.stack(batch))
    if empty:
        raise EmptyDataError(f"data source {data.source!r} (path={data.path}, split={data.split!r}) yields no "
                             f"context of {context_size} tokens. Fix: point data at more text or lower context_size")


def typical_rows(rows: Tensor, norm_factor: float | None) -> Tensor:
    """[n] mask of the rows [n, d] whose norm is at most norm_factor x the median norm (all where
    None). Some positions (often the first tokens) carry massive activations of 10-100x the
    typical norm; they would dominate reconstruction metrics and every top-activation list."""
    if norm_factor is None:
        return torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    norms = rows.float().norm(dim=1)
    return norms <= norm_factor * norms.median()


def token_texts(tokenizer, ids) -> list[str]:
    """Display text of each token id (decoded one by one; byte pieces of a character may show as �)."""
    return [tokenizer.decode([int(i)]) for i in ids]
