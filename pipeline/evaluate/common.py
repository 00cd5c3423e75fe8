"""Pieces the evaluation, interpretation and steering stages share: context batches, the
massive-activation rule, the unembedding (for logit effects) and token text for display."""

from __future__ import annotations

from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

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


def final_norm(model: nn.Module) -> nn.Module | None:
    """The normalisation applied to the residual stream before the unembedding (Llama's model.norm,
    GPT-2's transformer.ln_f, NeoX's gpt_neox.final_layer_norm), if the model has one."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_norm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def typical_rows(rows: Tensor, norm_factor: float | None) -> Tensor:
    """[n] mask of the rows [n, d] whose norm is at most norm_factor x the median norm (all where
    None). Some positions (often the first tokens) carry massive activations of 10-100x the
    typical norm; they would dominate reconstruction metrics and every top-activation list."""
    if norm_factor is None:
        return torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    norms = rows.float().norm(dim=1)
    return norms <= norm_factor * norms.median()


@torch.no_grad()
def logit_directions(model: nn.Module, directions: Tensor) -> Tensor:
    """[n, vocab] direct effect of residual-stream directions [n, d] on the logits: through the
    final norm's elementwise weight (when it has one) and the unembedding."""
    w_u = model.get_output_embeddings().weight  # [vocab, d]
    norm = final_norm(model)
    gain = getattr(norm, "weight", None) if norm is not None else None
    d = directions.to(w_u.dtype)
    if isinstance(gain, Tensor) and gain.shape == (d.shape[-1],):
        # Gemma stores the gain as (weight - 1); its RMSNorm multiplies by (1 + weight)
        d = d * (1 + gain if type(norm).__name__.startswith("Gemma") else gain)
    return d @ w_u.t()


def token_texts(tokenizer, ids) -> list[str]:
    """Display text of each token id (decoded one by one; byte pieces of a character may show as �)."""
    return [tokenizer.decode([int(i)]) for i in ids]
