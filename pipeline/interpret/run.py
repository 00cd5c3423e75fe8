"""The interpretation stage: corpus -> model (to the hook) -> SAE -> per-feature examples and
statistics -> features.json + static HTML dashboard; feature search; cross-lingual check; attribution."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.analysis import html as H
from pipeline.analysis.collect import (EXAMPLES_FILE, FEATURES_FILE, FEATURES_FORMAT, FeatureCollector, SparseCodes,
                                       TokenText, examples_of, feature_density, feature_passes, hist_edges)
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.logits import logit_directions
from pipeline.interpret import dashboard as D
from pipeline.interpret.attribute import attribute, densities, target_token
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.crosslingual import crosslingual, default_parallel_file, format_report, read_parallel
from pipeline.interpret.search import format_search, search_prompt
from pipeline.models import LoadedModel

CROSSLINGUAL_JSON = "crosslingual.json"
ATTRIBUTE_JSON = "attribute.json"


def run(cfg: InterpretConfig) -> dict:
    loaded, d = Dictionary.from_input(cfg.input)
    out = Path(cfg.out_dir)
    if cfg.task == "search":
        return run_search(d, loaded, cfg)
    if cfg.task == "crosslingual":
        return run_crosslingual(d, loaded, cfg)
    if cfg.task == "attribute":
        return run_attribute(d, loaded, cfg)
    result = build_dashboard(d, loaded, cfg)
    if cfg.crosslingual_in_dashboard:
        run_crosslingual(d, loaded, cfg)
        _write_index(out, result["_index"])
    print(f"dashboard: {(out / H.INDEX_FILE).resolve().as_uri()}", flush=True)
    return {k: v for k, v in result.items() if not k.startswith("_")}


@torch.no_grad()
def logit_effects(d: Dictionary, loaded: LoadedModel, lo: int, hi: int, n: int, texts: TokenText,
                  block: int = 256) -> list[tuple[list, list]]:
    """(promoted, suppressed) [[token text, logit effect], ...] for features [lo, hi)."""
    out = []
    W = d.decoder()
    for s in range(lo, hi, block):
        eff = logit_directions(loaded.model, W[s:min(s + block, hi)]).float()
        pv, pi = eff.topk(n, dim=1)
        sv, si = eff.topk(n, dim=1, largest=False)
        for p, pv_, s_, sv_ in zip(pi.tolist(), pv.tolist(), si.tolist(), sv.tolist()):
            out.append(([[t, round(v, 4)] for t, v in zip(texts(p), pv_)],
                        [[t, round(v, 4)] for t, v in zip(texts(s_), sv_)]))
    return out


def build_dashboard(d: Dictionary, loaded: LoadedModel, cfg: InterpretConfig) -> dict:
    out = Path(cfg.out_dir)
    texts = TokenText(loaded.tokenizer)
    header = {"sae": d.path, "hook": d.hook, "n_features": d.n_features, "n_tokens": 0,
              "data": f"{cfg.input.data.source} ({cfg.input.data.split})"}
    features, index_rows, pages = [], [], 0
    edges = hist_edges()
    start, streamed = time.perf_counter(), 0
    phase = dict.fromkeys(("collect", "logit effects", "writing"), 0.0)  # seconds, printed at the end
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (EXAMPLES_FILE + ".tmp")  # streamed pass by pass, renamed when complete
    several = d.n_features > cfg.features_per_pass
    codes = SparseCodes(d, loaded, cfg.input, keep=several)
    t0 = time.perf_counter()
    # pages for the densest of the whole dictionary: with several passes, measured before them
    budget = cfg.max_pages is not None and cfg.max_pages < d.n_features
    paged = _densest(codes, cfg.max_pages, cfg.progress) if several and budget else None
    passes = feature_passes(codes, cfg.features_per_pass,
                            lambda lo, hi: FeatureCollector(lo, hi, cfg.top_k, cfg.n_samples, cfg.context_before,
                                                            cfg.context_after, device=loaded.device, seed=cfg.seed),
                            progress=cfg.progress)
    with open(partial, "w", encoding="utf-8") as examples:
        for c in passes:
            lo, hi = c.lo, c.hi
            header["n_tokens"] = c.n_tokens
            streamed += c.n_tokens
            s = {name: v.tolist() for name, v in c.summary().items()}
            t1 = time.perf_counter()
            effects = logit_effects(d, loaded, lo, hi, cfg.n_logits, texts)
            t2 = time.perf_counter()
            if paged is not None:  # chosen over all passes
                with_page = {f - lo for f in paged if lo <= f < hi}
            else:
                order = sorted((i for i in range(hi - lo) if s["count"][i] > 0), key=lambda i: -s["density"][i])
                with_page = set(order if cfg.max_pages is None else order[:cfg.max_pages])
            for i in range(hi - lo):
                f = {"index": lo + i, "density": s["density"][i], "count": s["count"][i],
                     "max_act": s["max_act"][i], "mean_act": s["mean_act"][i],
                     "promoted": effects[i][0], "suppressed": effects[i][1]}
                features.append(f)
                top = examples_of(c.top, i, cfg.context_before) if f["count"] else []
                if top:
                    line = {"index": f["index"], "top": [{**e, "tokens": texts(e["tokens"]), "token_ids": e["tokens"]}
                                                         for e in top]}
                    examples.write(json.dumps(line, ensure_ascii=False) + "\n")
                index_rows.append({"index": f["index"], "density": f["density"], "max_act": f["max_act"],
                                   "mean_act": f["mean_act"], "tokens": " ".join(H.show(t) for t, _ in f["promoted"][:6]),
                                   "snippet": _snippet(top[0], texts) if top else "", "page": i in with_page})
                if i in with_page:
                    labels, groups = H.quantile_groups(examples_of(c.samples, i, cfg.context_before), cfg.n_quantiles)
                    H.write(out / H.FEATURES_DIR / f"{lo + i}.html",
                            D.feature_page(f, texts, top, groups, labels, edges, c.hist[i].tolist(), d.n_features, header))
                    pages += 1
            del c
            for name, dt in zip(phase, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                phase[name] += dt
            t0 = time.perf_counter()
    partial.replace(out / EXAMPLES_FILE)
    seconds = time.perf_counter() - start
    doc = {"format": FEATURES_FORMAT, "version": 1, "sae": d.path, "hook": d.hook, "n_features": d.n_features,
           "n_tokens": header["n_tokens"], "data": asdict(cfg.input.data),
           "context_size": cfg.input.context_size, "features": features}
    H.write(out / FEATURES_FILE, json.dumps(doc, ensure_ascii=False) + "\n")
    index = (header, index_rows)
    _write_index(out, index)
    live = sum(f["count"] > 0 for f in features)
    print(f"interpreted {d.n_features} features ({live} live) on {header['n_tokens']} tokens in {seconds:.1f}s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in phase.items())}); {pages} feature pages in {out}", flush=True)
    if pages < live:
        print(f"pages for the {pages} densest of {live} live features (max_pages={cfg.max_pages}; max_pages=null "
              "writes one for every live feature)", flush=True)
    return {"out_dir": str(out), "n_tokens": header["n_tokens"], "n_features": d.n_features, "live": live,
            "pages": pages, "seconds": seconds, "phase_seconds": phase,
            "tokens_per_second": streamed / seconds if seconds else 0.0,
            "_index": index}


def _densest(codes: SparseCodes, n: int, progress: bool) -> list[int]:
    """The n live features of highest density (ties: lower index first), over the whole dictionary."""
    density = feature_density(codes, progress).cpu()
    order = torch.sort(-density, stable=True).indices[:n]
    return order[density[order] > 0].tolist()


def _write_index(out: Path, index: tuple[dict, list]) -> None:
    links = {label: name for label, name in (("cross-lingual check", D.CROSSLINGUAL_FILE),
                                              ("feature search", D.SEARCH_FILE),
                                              ("feature attribution", D.ATTRIBUTE_FILE)) if (out / name).exists()}
    # keep the link pipeline.audit put there (it points at the audit report)
    H.write(out / H.INDEX_FILE, D.index_page(index[0], index[1], links, H.read_audit_link(out / H.INDEX_FILE)))


def _snippet(e: dict, texts: TokenText, before: int = 10, after: int = 3) -> str:
    t = [H.show(x) for x in texts(e["tokens"])]
    c = e["center"]
    return "".join(t[max(c - before, 0):c]) + "\u00ab" + t[c] + "\u00bb" + "".join(t[c + 1:c + 1 + after])


def _pages(out: Path) -> set[int]:
    folder = out / H.FEATURES_DIR
    return {int(p.stem) for p in folder.glob("*.html") if p.stem.isdigit()} if folder.exists() else set()


def _labels(out: Path) -> dict[int, str]:
    f = out / FEATURES_FILE
    if not f.exists():
        return {}
    return {x["index"]: " ".join(repr(t) for t, _ in x["promoted"][:4]) for x in json.loads(f.read_text())["features"]}


def run_search(d: Dictionary, loaded: LoadedModel, cfg: InterpretConfig) -> dict:
    out = Path(cfg.out_dir)
    result = search_prompt(d, loaded, cfg.prompt, cfg.search_top, cfg.input.exclude_positions_below)
    print(format_search(result, _labels(out)), flush=True)
    H.write(out / D.SEARCH_FILE, D.search_page(result, _pages(out)))
    print(f"search page: {(out / D.SEARCH_FILE).resolve().as_uri()}", flush=True)
    return result


def run_crosslingual(d: Dictionary, loaded: LoadedModel, cfg: InterpretConfig) -> dict:
    out = Path(cfg.out_dir)
    rows = read_parallel(cfg.parallel_file or default_parallel_file(), list(cfg.languages))
    report = crosslingual(d, loaded, rows, list(cfg.languages), cfg.crosslingual_top,
                          cfg.input.exclude_positions_below)
    print(format_report(report), flush=True)
    H.write(out / CROSSLINGUAL_JSON, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    H.write(out / D.CROSSLINGUAL_FILE, D.crosslingual_page(report, _pages(out)))
    return report


def run_attribute(d: Dictionary, loaded: LoadedModel, cfg: InterpretConfig) -> dict:
    out = Path(cfg.out_dir)
    target_token(loaded, cfg.target)  # a bad target fails before the density pass
    density, source = densities(d, loaded, cfg.input, cfg.features, cfg.out_dir, cfg.progress)
    r = attribute(d, loaded, cfg.prompt, cfg.target, density, cfg.n_attributed, cfg.n_random,
                  cfg.input.exclude_positions_below, cfg.seed)
    r["density_source"] = source
    s = r["summary"]
    print(f"log p({cfg.target!r} | {cfg.prompt!r}) = {r['base_logprob']:.4f} (SAE spliced in at {d.hook}; "
          f"model {r['model_logprob']:.4f}); densities: {source}", flush=True)
    for f in r["features"]:
        print(f"  feature {f['feature']:>7}: attribution {f['attribution']:+.4f}, ablation drop {f['ablation_drop']:+.4f}, "
              f"random {f['random']['mean']:+.4f} +- {f['random']['std']:.4f}", flush=True)
    print(f"mean drop: top {s['mean_drop']:+.4f}, random {s['mean_random_drop']:+.4f}; {s['beats_random']} of "
          f"{s['n_features']} top features beat all their random ones", flush=True)
    H.write(out / ATTRIBUTE_JSON, json.dumps(r, indent=1, ensure_ascii=False) + "\n")
    H.write(out / D.ATTRIBUTE_FILE, D.attribute_page(r, _pages(out)))
    print(f"attribution page: {(out / D.ATTRIBUTE_FILE).resolve().as_uri()}", flush=True)
    return r
