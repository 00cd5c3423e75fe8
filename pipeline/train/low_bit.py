"""Adam with block-quantised m and v (optim.state_dtype fp8 / int8), from torchao.

torchao keeps each state of at least 4096 values as a tensor subclass (1-byte codes and an fp32
scale per 256 values); smaller ones stay fp32. DeepSpeed's checkpoint loader reads the model-states
file with a callable map_location, which torch cannot apply to tensor subclasses, so the optimizer's
state_dict carries each quantised state as its plain inner tensors and load_state_dict rebuilds it."""

from __future__ import annotations

import torch

from pipeline.step import OptimConfig

_SUBCLASS = "__torchao_state__"


def low_bit_adam(o: OptimConfig, lr: float, groups: list[dict]) -> torch.optim.Optimizer | None:
    """torchao's Adam for o.state_dtype fp8/int8 (None for fp32: DeepSpeed builds torch's fused Adam).
    One parameter group per tensor: under ZeRO >= 1 or bf16 DeepSpeed hands the optimizer a flat fp32
    partition of each group, and a per-tensor partition stays a multiple of the 256-value block,
    where a flat one of all tensors would not (torchao would then silently keep fp32 state)."""
    if o.state_dtype == "fp32":
        return None
    from torchao.optim import Adam8bit, AdamFp8

    base = {"fp8": AdamFp8, "int8": Adam8bit}[o.state_dtype]
    adam = type(base.__name__, (_PlainStateDict, base), {})
    return adam([{"params": [p], "lr": g.get("lr", lr)} for g in groups for p in g["params"]], lr=lr,
                betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


class _PlainStateDict:
    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {i: {k: _plain(v) for k, v in s.items()} for i, s in sd["state"].items()}
        return sd

    def load_state_dict(self, sd):
        sd = dict(sd, state={i: {k: _rebuild(v) for k, v in s.items()} for i, s in sd["state"].items()})
        return super().load_state_dict(sd)


def _plain(v):
    if not hasattr(v, "__tensor_flatten__"):
        return v
    names, meta = v.__tensor_flatten__()
    return {_SUBCLASS: type(v).__name__, "inner": {n: getattr(v, n) for n in names}, "meta": meta}


def _rebuild(v):
    if not (isinstance(v, dict) and _SUBCLASS in v):
        return v
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    cls = {c.__name__: c for c in (OptimState8bit, OptimStateFp8)}[v[_SUBCLASS]]
    return cls.__tensor_unflatten__(v["inner"], v["meta"])
