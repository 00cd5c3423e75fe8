"""The steering hook: clamp features at every position while keeping the SAE's error term, so that
only the clamped features' contributions change (the steering stage and the audit's steering
check share it)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.analysis.dictionary import Dictionary


def clamp_fn(d: Dictionary, values: dict[int, float]):
    """The hook function that clamps features: x -> x + sum_i (v_i - f_i(x)) W_dec[i].

    This is SAE(x) with f_i replaced by v_i, plus the error x - SAE(x): only the clamped features'
    contributions change, and a clamp equal to the feature's own value changes nothing."""
    idx = torch.tensor([d.check_feature(i) for i in values], dtype=torch.long, device=d.sae.W_dec.device)
    target = torch.tensor(list(values.values()), dtype=torch.float32, device=idx.device)
    rows = d.decoder()[idx]  # [c, d_model]

    def fn(x: Tensor) -> Tensor:
        if not len(idx):
            return x
        f = d.encode(x)[..., idx]  # [..., c] the features' own values at each position
        return x + ((target - f) @ rows).to(x.dtype)
    return fn
