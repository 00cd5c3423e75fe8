"""The cross-lingual check (Scaling Monosemanticity's multilingual features): which features fire on
the same sentence in several languages, and how much the languages' top features overlap compared
with mismatched sentences."""

from __future__ import annotations

import json
from importlib.resources import files
from itertools import combinations
from pathlib import Path

import torch

from pipeline.errors import ConfigError, EmptyDataError
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.prompts import prompt_activations
from pipeline.models import LoadedModel


def default_parallel_file() -> Path:
    return Path(str(files("pipeline.interpret") / "parallel.jsonl"))


def read_parallel(path: str | Path, languages: list[str]) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise EmptyDataError(f"parallel_file={str(path)!r} does not exist. Fix: point it at a JSONL file of "
                             '{"topic": ..., "en": ..., "de": ...} lines, or leave it unset for the shipped one')
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = sorted({lang for r in rows for lang in languages if not r.get(lang)})
    if missing:
        raise ConfigError(f"{path} lacks sentences in {missing} for some lines; languages={languages}. Fix: "
                          "choose languages every line has, or complete the file")
    if len(rows) < 2:
        raise EmptyDataError(f"{path} has {len(rows)} sentence(s); the check needs at least two")
    return rows


def _top_set(v: torch.Tensor, k: int) -> set[int]:
    vals, idx = v.topk(min(k, v.numel()))
    return {int(i) for i, x in zip(idx, vals) if x > 0}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _bootstrap_mean(x: torch.Tensor, n_resamples: int, seed: int = 0) -> dict:
    """Mean of x with a 95% percentile-bootstrap interval over its items (here: sentences, the unit
    that was sampled; the language pairs of one sentence are not independent)."""
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (n_resamples, len(x)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    return {"mean": float(x.mean()), "ci95": [lo, hi], "n_resamples": n_resamples}


def crosslingual(d: Dictionary, loaded: LoadedModel, rows: list[dict], languages: list[str], top: int = 10,
                 skip: int = 1, per_topic: int = 5, bootstrap: int = 2000) -> dict:
    # max activation of each feature over each sentence's tokens: [languages][sentences, features]
    acts = {lang: torch.stack([prompt_activations(d, loaded, r[lang])[1][skip:].amax(0).float().cpu() for r in rows])
            for lang in languages}
    tops = {lang: [_top_set(a, top) for a in m] for lang, m in acts.items()}
    n = len(rows)
    pairs, per_sentence = {}, torch.zeros(n)
    for a, b in combinations(languages, 2):
        par = torch.tensor([_jaccard(tops[a][s], tops[b][s]) for s in range(n)])
        mis = torch.tensor([sum(_jaccard(tops[a][s], tops[b][t]) for t in range(n) if t != s) / (n - 1)
                            for s in range(n)])
        pairs[f"{a}-{b}"] = {"parallel": float(par.mean()), "mismatched": float(mis.mean())}
        per_sentence += par - mis
    per_sentence /= len(pairs)
    shared = [sorted(set.intersection(*(tops[lang][s] for lang in languages))) for s in range(n)]
    topics = []
    names = list(dict.fromkeys(r.get("topic", f"sentence {i}") for i, r in enumerate(rows)))
    for name in names:
        inside = torch.tensor([r.get("topic", f"sentence {i}") == name for i, r in enumerate(rows)])
        if inside.all():
            continue
        mean_in = {lang: acts[lang][inside].mean(0) for lang in languages}
        margin = torch.stack([mean_in[lang] - acts[lang][~inside].mean(0) for lang in languages]).amin(0)
        v, i = margin.topk(min(per_topic, margin.numel()))
        topics.append({"topic": name, "sentences": int(inside.sum()),
                       "features": [{"feature": int(f), "score": float(s),
                                     "acts": {lang: float(mean_in[lang][f]) for lang in languages}}
                                    for s, f in zip(v, i) if s > 0]})
    return {"sae": d.path, "hook": d.hook, "languages": list(languages), "n_sentences": n, "top": top,
            "pairs": pairs, "mean_parallel": sum(p["parallel"] for p in pairs.values()) / len(pairs),
            "mean_mismatched": sum(p["mismatched"] for p in pairs.values()) / len(pairs),
            "parallel_minus_mismatched": _bootstrap_mean(per_sentence, bootstrap),
            "shared_in_all_languages": [{"sentence": rows[s][languages[0]], "features": shared[s]} for s in range(n)],
            "topics": topics}


def format_report(r: dict) -> str:
    lines = [f"cross-lingual check: {r['n_sentences']} sentences in {', '.join(r['languages'])}, "
             f"top {r['top']} features per sentence",
             f"  Jaccard overlap of top features, same sentence: {r['mean_parallel']:.3f}; "
             f"different sentences: {r['mean_mismatched']:.3f}"]
    if "parallel_minus_mismatched" in r:  # absent from files written before it was measured
        d = r["parallel_minus_mismatched"]
        lines.append(f"  same minus different: {d['mean']:.3f} (95% bootstrap interval over sentences "
                     f"{d['ci95'][0]:.3f} to {d['ci95'][1]:.3f})")
    n_shared = sum(bool(s["features"]) for s in r["shared_in_all_languages"])
    lines.append(f"  sentences with a feature in the top {r['top']} of every language: {n_shared} of {r['n_sentences']}")
    for t in r["topics"]:
        feats = ", ".join(f"{f['feature']} ({f['score']:.3g})" for f in t["features"]) or "none"
        lines.append(f"  {t['topic']}: {feats}")
    return "\n".join(lines)
