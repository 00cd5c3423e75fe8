"""Feature search: the features active at each token of a prompt, and over the whole prompt."""

from __future__ import annotations


from pipeline.analysis.batches import token_texts
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.prompts import prompt_activations
from pipeline.models import LoadedModel


def search_prompt(d: Dictionary, loaded: LoadedModel, prompt: str, top: int = 5, skip: int = 1) -> dict:
    """{tokens: [{text, features: [{feature, act}]}], overall: [{feature, max, sum, acts}]}; the
    first `skip` positions (BOS) are left out."""
    ids, acts = prompt_activations(d, loaded, prompt)
    texts = token_texts(loaded.tokenizer, ids)[skip:]
    acts = acts[skip:].float().cpu()
    tokens = []
    for t, row in zip(texts, acts):
        v, i = row.topk(min(top, row.numel()))
        tokens.append({"text": t, "features": [{"feature": int(f), "act": float(a)} for a, f in zip(v, i) if a > 0]})
    overall = []
    if len(acts):
        mx = acts.max(0).values
        v, i = mx.topk(min(2 * top, mx.numel()))
        overall = [{"feature": int(f), "max": float(a), "sum": float(acts[:, f].sum()),
                    "acts": [round(float(x), 4) for x in acts[:, f]]} for a, f in zip(v, i) if a > 0]
    return {"sae": d.path, "hook": d.hook, "prompt": prompt, "tokens": tokens, "overall": overall}


def format_search(result: dict, labels: dict[int, str] | None = None) -> str:
    """The search result as a terminal table; labels: feature -> short description (top tokens)."""
    labels = labels or {}
    width = max([len(repr(t["text"])) for t in result["tokens"]] + [5])
    lines = [f"features of {result['prompt']!r} at {result['hook']}", "", f"{'token':<{width}}  top features (activation)"]
    for t in result["tokens"]:
        feats = ", ".join(f"{f['feature']} ({f['act']:.3g})" for f in t["features"]) or "-"
        lines.append(f"{repr(t['text']):<{width}}  {feats}")
    lines += ["", "most active over the whole prompt (feature: max, sum, promoted tokens):"]
    for f in result["overall"]:
        lines.append(f"  {f['feature']:>7}: {f['max']:.3g}, {f['sum']:.3g}  {labels.get(f['feature'], '')}")
    return "\n".join(lines)
