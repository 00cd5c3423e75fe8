"""The held-out score every trainer in benchmarks/recipe.py is measured by (torch only, so that the
SAELens worker, which runs in its own venv, imports the same function)."""

from __future__ import annotations

import torch


@torch.no_grad()
def score(encode_decode, x: torch.Tensor, n_features: int) -> dict:
    """Held-out FVU, L0 and dead fraction of a dictionary given as x -> (x_hat, indices of active
    latents): FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2; dead = fires on none of the rows."""
    sse, fired, l0 = 0.0, torch.zeros(n_features, dtype=torch.bool), 0
    for part in x.split(4096):
        x_hat, active = encode_decode(part)
        sse += float((part.double() - x_hat.double()).pow(2).sum())
        fired[active.flatten()] = True
        l0 += active.numel()
    var = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"fvu": sse / var, "l0": l0 / len(x), "dead": 1 - float(fired.float().mean())}
