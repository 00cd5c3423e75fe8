"""Feature splitting between two dictionaries of different sizes on the same hook (Scaling
Monosemanticity, "Feature Splitting"): match features by the cosine of their decoder rows.

Each large-dictionary feature j is matched to the small-dictionary feature i whose decoder row is
closest in cosine. If that cosine is at least `threshold`, j is a child of i; otherwise j is
novel (a direction the small dictionary has no feature near). A small feature with two or more
children has split; one with none has no counterpart in the large dictionary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis import release


def best_match(small: Tensor, large: Tensor, block: int | None = None) -> tuple[Tensor, Tensor]:
    """For each row of large [L, d]: the index of the row of small [S, d] with the highest cosine,
    and that cosine ([L], [L]). Computed in blocks of large rows: memory block x S (default: about
    32M cosines, 128 MB, at a time)."""
    s = small.float() / small.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    block = block or max(1, min(8192, 2 ** 25 // max(small.shape[0], 1)))
    idx, cos = [], []
    for lo in range(0, large.shape[0], block):
        part = large[lo:lo + block].float()
        c = (part / part.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ s.t()
        v, i = c.max(1)
        idx.append(i)
        cos.append(v)
    return torch.cat(idx), torch.cat(cos)


def match_features(small: Tensor, large: Tensor, threshold: float = 0.7) -> dict:
    """Children of every small feature and the novel large features, from decoder rows
    small [S, d] and large [L, d] (the rows as used: Dictionary.decoder())."""
    if small.shape[1] != large.shape[1]:
        raise ConfigError(f"the dictionaries have decoder rows of width {small.shape[1]} and {large.shape[1]}; "
                          "splitting compares dictionaries trained on the same hook of the same model")
    parent, cos = best_match(small, large)
    is_child = cos >= threshold
    children: list[list[dict]] = [[] for _ in range(small.shape[0])]
    for j in is_child.nonzero().flatten().tolist():
        children[int(parent[j])].append({"feature": j, "cosine": round(float(cos[j]), 4)})
    for c in children:
        c.sort(key=lambda x: -x["cosine"])
    novel = sorted(((j, float(cos[j]), int(parent[j])) for j in (~is_child).nonzero().flatten().tolist()),
                   key=lambda x: x[1])
    n_children = torch.tensor([len(c) for c in children])
    hist = torch.histc(cos.float(), bins=20, min=-1.0, max=1.0)
    return {
        "threshold": threshold,
        "n_small": small.shape[0], "n_large": large.shape[0],
        "counts": {
            "small_with_no_child": int((n_children == 0).sum()),
            "small_with_one_child": int((n_children == 1).sum()),
            "small_split": int((n_children >= 2).sum()),
            "large_children": int(is_child.sum()),
            "large_novel": len(novel),
        },
        "mean_best_cosine": float(cos.mean()) if len(cos) else None,
        "best_cosine_histogram": {"edges": [round(-1 + 0.1 * i, 2) for i in range(21)],
                                  "counts": [int(x) for x in hist]},
        "children": [{"feature": i, "children": c} for i, c in enumerate(children)],
        "novel": [{"feature": j, "best_cosine": round(c, 4), "nearest_small": p} for j, c, p in novel],
    }


def load_decoder(path: str | Path) -> tuple[Tensor, dict]:
    """An exported SAE's decoder rows as used (Dictionary.decoder) and its cfg.json metadata."""
    sae = release.load(path)
    meta = dict(getattr(sae, "meta", {}) or {})
    d = Dictionary(sae, meta.get("hook") or "?", meta.get("hook") or "?", str(path))
    return d.decoder(), meta


def split_dictionaries(small_path: str, large_path: str, threshold: float) -> dict:
    """match_features on two exported SAEs, after checking they read the same hook of the same model."""
    small, ms = load_decoder(small_path)
    large, ml = load_decoder(large_path)
    hs, hl = ms.get("hook"), ml.get("hook")
    if hs and hl and hs != hl:
        raise ConfigError(f"task.small={small_path!r} reads hook {hs!r} but task.large={large_path!r} reads {hl!r}; "
                          "splitting compares dictionaries of the same hook. Fix: pass two SAEs trained on the same "
                          "layer")
    model_s, model_l = (m.get("model", {}).get("id") if isinstance(m.get("model"), dict) else m.get("model")
                        for m in (ms, ml))
    if model_s and model_l and model_s != model_l:
        raise ConfigError(f"task.small={small_path!r} was trained on {model_s!r} but task.large={large_path!r} on "
                          f"{model_l!r}. Fix: pass two SAEs trained on the same model")
    if small.shape[0] > large.shape[0]:
        print(f"warning: task.small={small_path!r} has more features ({small.shape[0]}) than task.large={large_path!r} "
              f"({large.shape[0]}); did you swap them?", flush=True)
    out = match_features(small, large, threshold)
    return {"small": str(small_path), "large": str(large_path), "hook": hs or hl, **out}
