"""The family's report: results.md and its PNG figures, every number read from the stages' outputs
(heldout.json, metrics.jsonl, evaluate's metrics.json, crosslingual.json, audit.json, generations.json,
attribute.json), every command from commands.sh. A section whose step did not run says so."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def power_law(sizes: list[int], values: list[float]) -> tuple[float, float] | None:
    """Least-squares fit of values = A * sizes^-alpha in log-log space: (alpha, A); None under 2 points."""
    pts = [(n, v) for n, v in zip(sizes, values) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    slope, icpt = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)
    return float(-slope), float(math.exp(icpt))


def _plot(path: Path, draw) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    draw(ax)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _runs(f) -> list[dict]:
    rows = []
    for n in f.cfg.sizes:
        log = _jsonl(f.out / "train" / str(n) / "metrics.jsonl")
        rows.append({"n": n, "heldout": _json(f.out / "train" / str(n) / "heldout.json"),
                     "eval": _json(f.dir("evaluate", n) / "metrics.json"), "log": log,
                     "cfg": _json(f.sae(n) / "cfg.json")})
    return rows


def section_reconstruction(f, figs: Path) -> list[str]:
    runs = _runs(f)
    out = ["## 1. Reconstruction against dictionary size and tokens", "",
           "Held-out FVU is measured by the trainer on the held-out store (rows never trained on); CE loss "
           "recovered and KL by `pipeline.evaluate` on held-out text with the dictionary spliced in. Two dead "
           "fractions, because a short window calls rare features dead, more so the wider the dictionary: *dead "
           "(train)* is the trainer's, at the end of the run (no firing over the last `dead_tokens` training "
           "tokens, the recipe's window, in brackets; Gao et al. use 10M); *silent (held-out)* counts the features "
           "that fired on none of the held-out rows.",
           "", "| features | tokens | held-out FVU | eval FVU | L0 | CE recovered | KL (spliced) | dead (train) | "
           "silent (held-out) | train tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        h, e, log = r["heldout"] or {}, r["eval"] or {}, r["log"]
        tps = np.median([x["tokens_per_s"] for x in log[len(log) // 2:]]) if log else None
        window = ((r["cfg"] or {}).get("config") or {}).get("dead_tokens")
        dead = f"{_pct(log[-1]['dead_fraction'])} ({window:,})" if log and window else "-"
        silent = f"{_pct(h['dead_fraction'])} of {h['n_rows']:,}" if "dead_fraction" in h else "-"
        out.append(f"| {r['n']:,} | {_fmt(h.get('tokens'))} | {_fmt(h.get('fvu'))} | {_fmt(e.get('fvu'))} | "
                   f"{_fmt(e.get('l0'), 1)} | {_fmt(e.get('ce_loss_recovered'))} | "
                   f"{_fmt((e.get('kl_to_clean') or {}).get('spliced'))} | {dead} | {silent} | "
                   f"{_fmt(float(tps), 0) if tps is not None else '-'} |")
    hists = [(r["n"], f.dir("evaluate", r["n"]) / "density_histogram.png") for r in runs]
    hists = [(n, p) for n, p in hists if p.exists()]
    for n, p in hists:
        shutil.copyfile(p, figs / f"density_{n}.png")
    if hists:
        out += ["", "Feature density (log10 of the fraction of held-out tokens a feature fires on), per size: "
                + ", ".join(f"[{n:,}]({figs.name}/density_{n}.png)" for n, _ in hists) + "."]
    sizes = [r["n"] for r in runs]
    fvu = [(r["heldout"] or {}).get("fvu") for r in runs]
    fit = power_law(sizes, fvu)
    if fit:
        out += ["", f"Power law over sizes: held-out FVU ≈ {fit[1]:.3g} · N^-{fit[0]:.3f} "
                f"(least squares in log-log over {sum(v is not None for v in fvu)} sizes, all at the same tokens; "
                "with this few points it is a description, not an extrapolation)."]
    if any(fvu):
        def draw(ax):
            ax.plot(sizes, fvu, "o-", label="held-out FVU")
            ce = [(r["eval"] or {}).get("ce_loss_recovered") for r in runs]
            if all(c is not None for c in ce):
                ax.plot(sizes, [1 - c for c in ce], "s-", label="1 - CE loss recovered")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("features")
        _plot(figs / "size.png", draw)
        out += ["", f"![reconstruction against size]({figs.name}/size.png)"]
    if any(r["log"] for r in runs):
        def draw(ax):
            for r in runs:
                if r["log"]:
                    ax.plot([x["tokens"] for x in r["log"]], [x["fvu"] for x in r["log"]], label=f"{r['n']:,}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("training tokens")
            ax.set_ylabel("training-batch FVU")
        _plot(figs / "tokens.png", draw)
        out += ["", f"![training FVU against tokens]({figs.name}/tokens.png)",
                "", "Training-batch FVU per logged step (metrics.jsonl); each batch is measured before the step "
                "trains on it, so it is a held-out figure for that batch."]
    return out


def _ci(x: list | None) -> str:
    return f" [{x[0]:.3g}, {x[1]:.3g}]" if x else ""


def section_sweep(f, figs: Path) -> list[str]:
    """The sweep's fits against Gao et al. (2024), who fit L(C) = 0.09 + 0.056 C^-0.084 (normalised MSE)."""
    sweep = f.out / "sweep"
    r = _json(sweep / "scaling.json")
    out = ["## 1b. Scaling-law sweep", "", f"Gao et al.'s sweep (topk, k = {(r or {}).get('k', '-')}, sizes × token "
           "budgets, conf/sweep/gao.yaml) on the family's tokens with the default recipe, fitted by "
           "`pipeline.scaling` (95% bootstrap intervals over runs)."]
    if not r:
        return out + ["", "Not run."]
    fr, j = r["frontier"], r["joint"]
    out += ["", f"- {r['n_points']} runs. Compute frontier L(C) = E + A·C^-a: a = {fr['fit']['a']:.3f}"
            f"{_ci(fr.get('ci95', {}).get('a'))}, E = {fr['fit']['E']:.3g}; Gao et al. (2024) fit a = 0.084, "
            "E = 0.09 on GPT-4 activations over far larger compute.",
            f"- Joint L(N, D) = E + A/N^alpha + B/D^beta: alpha = {j['fit']['alpha']:.3f}"
            f"{_ci(j.get('ci95', {}).get('alpha'))}, beta = {j['fit']['beta']:.3f}{_ci(j.get('ci95', {}).get('beta'))}.",
            f"- Compute-optimal size N_opt ∝ C^{fr['n_opt']['b']:.2f}, tokens D_opt ∝ C^{fr['d_opt']['c']:.2f}."]
    png = sweep / "loss_vs_compute.png"
    if png.exists():
        shutil.copyfile(png, figs / "sweep_loss_vs_compute.png")
        out += ["", f"![sweep: loss against compute]({figs.name}/sweep_loss_vs_compute.png)"]
    return out


def _context(example: dict, width: int = 90) -> str:
    toks, c = example["tokens"], example["center"]
    text = "".join(toks[:c]) + "**" + toks[c] + "**" + "".join(toks[c + 1:])
    return text.replace("\n", "⏎").replace("|", "\\|")[-width:]


def _top_contexts(interpret_dir: Path) -> dict[int, list[dict]]:
    return {x["index"]: x["top"] for x in _jsonl(interpret_dir / "examples.jsonl")}


def section_splitting(f) -> list[str]:
    out = ["## 2. Feature splitting", "", "A feature of the smaller dictionary splits when two or more features of the "
           "larger one have decoder cosine ≥ the threshold with it (`pipeline.audit audit/task=splitting`)."]
    sizes = f.cfg.sizes
    for small, large in zip(sizes, sizes[1:]):
        a = _json(f.dir("audit", f"{small}-{large}") / "audit.json")
        if not a or "splitting" not in a:
            out += ["", f"{small:,} → {large:,}: not run."]
            continue
        s, c = a["splitting"], a["splitting"]["counts"]
        out += ["", f"### {small:,} → {large:,} (cosine ≥ {s['threshold']:g})", "",
                f"{c['small_split']:,} of {s['n_small']:,} features split ({c['small_with_one_child']:,} have one "
                f"child, {c['small_with_no_child']:,} none); {c['large_children']:,} of {s['n_large']:,} larger "
                f"features are children, {c['large_novel']:,} are novel. Mean best cosine {s['mean_best_cosine']:.3f}."]
        split = sorted((x for x in s["children"] if len(x["children"]) >= 2), key=lambda x: -len(x["children"]))
        ctx_s, ctx_l = _top_contexts(f.dir("interpret", small)), _top_contexts(f.dir("interpret", large))
        shown = [x for x in split if x["feature"] in ctx_s][:3]
        for x in shown:
            out += ["", f"Feature {x['feature']} ({small:,}) splits into "
                    + ", ".join(f"{k['feature']} (cos {k['cosine']:.2f})" for k in x["children"][:4]) + ":", "",
                    f"- parent: {_context(ctx_s[x['feature']][0])}"]
            out += [f"- child {k['feature']}: {_context(ctx_l[k['feature']][0])}"
                    for k in x["children"][:4] if k["feature"] in ctx_l]
    return out


def section_completeness(f, figs: Path) -> list[str]:
    out = ["## 3. Completeness", "", "A concept of the shipped lists has a dedicated feature when one feature separates "
           "its name from the others and stays rare in the corpus (`pipeline.audit audit/task=completeness`, "
           "docs/audit.md). P(dedicated) by corpus frequency × alive features, per size:", ""]
    curves = {}
    for n in f.cfg.sizes:
        a = _json(f.dir("audit", n) / "audit.json") or {}
        sec = a.get("completeness")
        if not sec:
            out.append(f"- {n:,}: not run.")
            continue
        bins = [b for b in sec["bins"] if b["lo"] is not None and b["n"]]
        curves[n] = bins
        out.append(f"- {n:,} features ({sec['n_alive']:,} alive): {sec['n_found']} of {sec['n_concepts']} concepts "
                   "found; " + ("by log10(frequency × alive): " + ", ".join(
                       f"[{b['lo']:g}, {b['hi']:g}) {b['found']}/{b['n']}" for b in bins) if bins
                       else "no concept name occurs in the corpus sample."))
    if curves:
        def draw(ax):
            for n, bins in curves.items():
                ax.plot([(b["lo"] + b["hi"]) / 2 for b in bins], [b["p_found"] for b in bins], "o-", label=f"{n:,}")
            ax.set_xlabel("log10(corpus frequency × alive features)")
            ax.set_ylabel("P(dedicated feature)")
        _plot(figs / "completeness.png", draw)
        out += ["", f"![completeness]({figs.name}/completeness.png)"]
    return out


def section_multilingual(f) -> list[str]:
    out = ["## 4. Multilingual features", "", "On the corpus's held-out parallel paragraphs (the same passage of the "
           "Debian Administrator's Handbook or Debian Reference in each language): Jaccard overlap of each "
           "paragraph's top features between two languages, same paragraph vs different paragraphs, and "
           "their difference with a 95% bootstrap interval over paragraphs (`pipeline.interpret "
           "task=crosslingual`). Multilingual features: distinct features in the top features of every language "
           "of at least one paragraph.", "", "| features | paragraphs | same | different | same − different [95% CI] | "
           "paragraphs with a feature shared by every language | multilingual features | topic features |",
           "|---|---|---|---|---|---|---|---|"]
    for n in f.cfg.sizes:
        r = _json(f.dir("interpret", n) / "crosslingual.json")
        if not r:
            out.append(f"| {n:,} | not run | | | | | | |")
            continue
        d = r.get("parallel_minus_mismatched", {})
        ci = f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]" if d else "-"
        shared = sum(bool(s["features"]) for s in r["shared_in_all_languages"])
        multilingual = len({x for s in r["shared_in_all_languages"] for x in s["features"]})
        topic_feats = len({x["feature"] for t in r["topics"] for x in t["features"]})
        out.append(f"| {n:,} | {r['n_sentences']} | {r['mean_parallel']:.3f} | {r['mean_mismatched']:.3f} | {ci} | "
                   f"{shared} | {multilingual} | {topic_feats} |")
    return out


def _best_per_concept(sec: dict | None) -> list[tuple[dict, dict]]:
    """(concept set, its feature with the best held-out AUROC) of an audit's concepts section."""
    return [(c, max(c["features"], key=lambda x: x["heldout_auroc"])) for c in (sec or {}).get("concepts", [])
            if c["features"]]


def section_concepts(f) -> list[str]:
    out = ["## 5. Concept search and steering", "", "Per concept set, the feature with the best held-out AUROC among "
           "the top candidates, and its steering check: clamped to a multiple of its max activation on neutral "
           "prompts, the concept words' log-probability change and the KL to the clean model, beside a control "
           "feature's (`pipeline.audit audit/task=concepts`).", "",
           "| features | concept | feature | held-out AUROC | Δ log p (concept) | KL | control Δ log p | control KL |",
           "|---|---|---|---|---|---|---|---|"]
    for n in f.cfg.sizes:
        sec = (_json(f.dir("audit", n) / "audit.json") or {}).get("concepts")
        if not sec:
            out.append(f"| {n:,} | not run | | | | | | |")
            continue
        for c, b in _best_per_concept(sec):
            st = b.get("steering") or {}
            out.append(f"| {n:,} | {c['name']} | {b['feature']} | {b['heldout_auroc']:.3f} | "
                       f"{_fmt(st.get('delta_logprob'))} | {_fmt(st.get('kl'))} | "
                       f"{_fmt(st.get('control_delta_logprob'))} | {_fmt(st.get('control_kl'))} |")
    for n in f.cfg.sizes:
        g = _json(f.dir("steer", n) / "generations.json")
        if g:
            clamp = ", ".join(f"{c['feature']} at {c['given']}" for c in g["clamps"])
            out += ["", f"{n:,} features, feature {clamp}, prompt “{g['prompt']}”:", "",
                    f"- clean: {g['clean'].strip()!r}", f"- steered: {g['steered'].strip()!r}"]
    return out


def section_neighbours(f, base: Path) -> list[str]:
    out = ["## 6. Neighbourhood maps", ""]
    for n in f.cfg.sizes:
        sec = (_json(f.dir("audit", n) / "audit.json") or {}).get("neighbours")
        if not sec:
            out.append(f"- {n:,}: not run.")
            continue
        out.append(f"- {n:,} features: median nearest-decoder cosine {sec['median_first_cosine']:.3f}; map and "
                   f"neighbours in [{_rel(f.dir('audit', n) / 'audit.html', base)}]"
                   f"({_rel(f.dir('audit', n) / 'audit.html', base)}), dashboard "
                   f"[{_rel(f.dir('interpret', n) / 'index.html', base)}]({_rel(f.dir('interpret', n) / 'index.html', base)}).")
    return out


def section_attribution(f) -> list[str]:
    out = ["## 7. Features as computational intermediates", "", "For a prompt and its next token, features ranked "
           "by attribution (activation × gradient of the target's log-probability, SAE error kept), then "
           "ablated one at a time against random features of matched density (`pipeline.interpret task=attribute`).", ""]
    for n in f.cfg.sizes:
        for i, _ in enumerate(f.cfg.attribution_prompts):
            r = _json(f.dir("attribute", n) / str(i) / "attribute.json")
            if not r:
                continue
            feats = "; ".join(f"{x['feature']}: attribution {x['attribution']:.3g}, ablation drop "
                              f"{x['ablation_drop']:.3g} (matched random {x['random']['mean']:.3g} ± {x['random']['std']:.2g})"
                              for x in r["features"][:3])
            s = r["summary"]
            out.append(f"- {n:,}, “{r['prompt']}” → “{r['target']}” (log p {r['base_logprob']:.2f}): {feats}. "
                       f"Top {len(r['features'])}: mean drop {s['mean_drop']:.3g} vs random {s['mean_random_drop']:.3g}, "
                       f"{s['beats_random']} beat all their random matches.")
    return out if len(out) > 4 else out + ["Not run."]


def _trend(values: list[float]) -> str:
    """How a per-size series moves, smallest size first."""
    d = [b - a for a, b in zip(values, values[1:])]
    return "rises" if all(x > 0 for x in d) else "falls" if all(x < 0 for x in d) else "is not monotone"


def _series(pairs: list[tuple[int, float]], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f} ({n:,})" for n, v in pairs)


def section_reading(f) -> list[str]:
    """What the numbers below say, each statement computed from them (so it follows a rerun), then what
    this setup cannot show."""
    out = ["## Reading", "", "Each statement is computed from the sections below (smallest size first):", ""]
    sizes = f.cfg.sizes
    trained = [r for r in _runs(f) if r["heldout"]]
    fvu = [(r["n"], r["heldout"]["fvu"]) for r in trained]
    if len(fvu) > 1:
        silent = trained[-1]["heldout"].get("dead_fraction")
        out.append(f"- Reconstruction: held-out FVU {_trend([v for _, v in fvu])} with size: {_series(fvu, 4)}; the "
                   f"largest leaves {_pct(silent)} of its features silent on the held-out rows." if silent is not None
                   else f"- Reconstruction: held-out FVU {_trend([v for _, v in fvu])} with size: {_series(fvu, 4)}.")
    ce = [(n, (_json(f.dir("evaluate", n) / "metrics.json") or {}).get("ce_loss_recovered")) for n in sizes]
    ce = [(n, v) for n, v in ce if v is not None]
    if len(ce) > 1:
        out.append(f"- CE loss recovered {_trend([v for _, v in ce])} with size: {_series(ce)}.")
    for small, large in zip(sizes, sizes[1:]):
        s = (_json(f.dir("audit", f"{small}-{large}") / "audit.json") or {}).get("splitting")
        if s:
            c = s["counts"]
            out.append(f"- Splitting {small:,} → {large:,}: {c['small_split']:,} features ({_pct(c['small_split'] / s['n_small'])}) "
                       f"have two or more children at cosine ≥ {s['threshold']:g}, {c['small_with_one_child']:,} one; "
                       f"{_pct(c['large_novel'] / s['n_large'])} of the larger dictionary's features match no smaller one.")
    comp = [(n, (_json(f.dir("audit", n) / "audit.json") or {}).get("completeness")) for n in sizes]
    comp = [(n, c) for n, c in comp if c]
    if len(comp) > 1:
        out.append(f"- Completeness: the number of concepts with a dedicated feature {_trend([c['n_found'] for _, c in comp])} with size: "
                   + ", ".join(f"{c['n_found']} of {c['n_concepts']} ({n:,})" for n, c in comp) + ".")
    cl = [(n, (_json(f.dir("interpret", n) / "crosslingual.json") or {}).get("parallel_minus_mismatched")) for n in sizes]
    cl = [(n, d) for n, d in cl if d]
    if len(cl) > 1:
        overlap = all(a["ci95"][1] >= b["ci95"][0] and b["ci95"][1] >= a["ci95"][0] for (_, a), (_, b) in zip(cl, cl[1:]))
        out.append(f"- Multilingual: parallel paragraphs share more top features than mismatched ones at "
                   f"{sum(d['ci95'][0] > 0 for _, d in cl)} of {len(cl)} sizes (interval above 0); the difference "
                   f"{_trend([d['mean'] for _, d in cl])} with size: {_series([(n, d['mean']) for n, d in cl])}"
                   + (" (neighbouring sizes' intervals overlap)." if overlap else "."))
    auroc, steer = [], []
    for n in sizes:
        best = [b for _, b in _best_per_concept((_json(f.dir("audit", n) / "audit.json") or {}).get("concepts"))]
        if best:
            auroc.append((n, float(np.mean([b["heldout_auroc"] for b in best]))))
            st = [b["steering"] for b in best if b.get("steering")]
            steer.append(f"{sum(s['delta_logprob'] > s['control_delta_logprob'] for s in st)} of {len(st)} ({n:,})")
    if len(auroc) > 1:
        out.append(f"- Concept search: the best feature's mean held-out AUROC over the concept sets "
                   f"{_trend([v for _, v in auroc])} with size: {_series(auroc)}. Steering raises the concept's "
                   f"words more than the control feature does in " + ", ".join(steer) + " concept sets.")
    att = []
    for n in sizes:
        rs = [_json(f.dir("attribute", n) / str(i) / "attribute.json") for i in range(len(f.cfg.attribution_prompts))]
        rs = [r["summary"] for r in rs if r]
        if rs:
            att.append(f"{sum(s['beats_random'] for s in rs)} of {sum(s['n_features'] for s in rs)} ({n:,})")
    if att:
        out.append("- Attribution: top-attributed features whose ablation lowers the target's log-probability more "
                   "than every density-matched random feature: " + ", ".join(att) + ".")
    out += ["", "What this setup cannot show: one seed per size (no interval on the size trends themselves); "
            f"{f.cfg.n_tokens:,} training tokens: "
            + ", ".join(f"{f.cfg.n_tokens // n:,} tokens per feature at {n:,}" for n in sizes) + "; a 135M-parameter model, whose features "
            "need not be as abstract as a production model's; concept sets of a few held-out prompts each, so "
            "an AUROC of 1.000 is a coarse pass, not a precise score."]
    return out


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(f) -> Path:
    base = f.report.parent
    figs = f.report.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    m = _json(f.corpus / "manifest.json") or {}
    tr = m.get("splits", {}).get("train", {})
    corpus = str(f.corpus).replace(str(Path.home()), "~", 1)  # usually outside the repository (the cache)
    head = ["# Scaling Monosemanticity in miniature: results", "",
            f"Generated by `python -m pipeline.family` (pipeline/family/) at commit {_git()} on "
            f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores. Dictionaries: {f.cfg.architecture}, "
            + ", ".join(f"{n:,}" for n in f.cfg.sizes) + f" features, each trained on the same {f.cfg.n_tokens:,} "
            f"tokens of {f.cfg.model_name}'s {f.cfg.hook} output (the residual stream) with the default recipe.", "",
            f"Corpus ({corpus}, pipeline/family/corpus.py): {tr.get('tokens', 0):,} training tokens, "
            f"{m.get('parallel_rows', 0)} held-out parallel paragraphs in {', '.join(m.get('parallel_languages', []))}; "
            "packages: " + ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items()) + "."]
    body = [*section_reading(f), "", *section_reconstruction(f, figs), "", *section_sweep(f, figs), "", *section_splitting(f), "", *section_completeness(f, figs), "",
            *section_multilingual(f), "", *section_concepts(f), "", *section_neighbours(f, base), "",
            *section_attribution(f)]
    # commands.sh gets a step's command at every (re)start: each step is listed where it first ran,
    # with the command it last ran (the one that made its output)
    lines = (f.out / "commands.sh").read_text().splitlines() if (f.out / "commands.sh").exists() else []
    last = dict.fromkeys(x for x in lines if x.startswith("# "))
    for step, cmd in zip(lines, lines[1:]):
        if step.startswith("# ") and not cmd.startswith("# "):
            last[step] = cmd
    tail = ["", "## Commands", "", "The command of every step, in the order the steps first ran (the last of each "
            "step's runs, from commands.sh, which logs every restart):", "", "```sh",
            *(x for step, cmd in last.items() for x in (step, cmd) if cmd), "```"]
    path = f.report
    path.write_text("\n".join(head + [""] + body + tail) + "\n", encoding="utf-8")
    return path
