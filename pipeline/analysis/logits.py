"""The direct effect of residual-stream directions on the logits (through the final norm's gain and
the unembedding): what a feature's decoder row promotes and suppresses."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def final_norm(model: nn.Module) -> nn.Module | None:
    """The normalisation applied to the residual stream before the unembedding (Llama's model.norm,
    GPT-2's transformer.ln_f, NeoX's gpt_neox.final_layer_norm), if the model has one."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_norm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


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
