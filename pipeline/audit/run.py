"""The audit stage: concept search (ranking, held-out check, steering check) and feature
splitting, written to <out_dir>/audit.json (one section per task) and audit.html."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.audit.autointerp.run import run_autointerp
from pipeline.audit.concepts import resolve_concept_sets
from pipeline.audit.config import AuditConfig
from pipeline.audit.crossmodal import run_crossmodal
from pipeline.audit.report import REPORT_FILE, write_report
from pipeline.audit.search import search_concept
from pipeline.audit.splitting import split_dictionaries
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis import html as H
from pipeline.models import load_model

AUDIT_FILE = "audit.json"
AUDIT_FORMAT = "pipeline.audit"
AUDIT_VERSION = 1


def run(cfg: AuditConfig) -> dict:
    out = Path(cfg.out_dir)
    section = TASKS[cfg.task](cfg)
    doc = _read(out)
    doc.update({"format": AUDIT_FORMAT, "version": AUDIT_VERSION, cfg.task: section})
    out.mkdir(parents=True, exist_ok=True)
    H.write(out / AUDIT_FILE, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    report = write_report(doc, out)
    link_dashboard(doc, report)
    print(f"wrote {out / AUDIT_FILE}\nreport: {report.resolve().as_uri()}", flush=True)
    return doc


def link_dashboard(doc: dict, report: Path) -> None:
    """Point the dashboard's index.html (of any section that names one) at the report, idempotently."""
    for dash in {sec["dashboard"] for sec in doc.values() if isinstance(sec, dict) and sec.get("dashboard")}:
        index = Path(dash) / H.INDEX_FILE
        if index.exists() and not H.set_audit_link(index, report):
            print(f"note: {index} predates the audit link; rerun python -m pipeline.interpret to get one", flush=True)


def _read(out: Path) -> dict:
    """The existing audit.json (the other task's section is kept), or an empty document."""
    f = out / AUDIT_FILE
    if not f.exists():
        return {}
    doc = json.loads(f.read_text(encoding="utf-8"))
    return doc if doc.get("format") == AUDIT_FORMAT and doc.get("version") == AUDIT_VERSION else {}


def run_concepts(cfg: AuditConfig) -> dict:
    sets = resolve_concept_sets(list(cfg.concepts))  # validate every file before loading the model
    loaded = load_model(cfg.input.model)
    d = Dictionary.load(cfg.input.checkpoint, loaded, cfg.input.hook)
    results = []
    for cs in sets:
        t = time.time()
        r = search_concept(d, loaded, cs, cfg.top, cfg.clamp_multiple, list(cfg.neutral_prompts),
                           cfg.input.exclude_positions_below)
        results.append(r)
        print(format_concept(r) + f"  ({time.time() - t:.1f}s)", flush=True)
    return {"sae": d.path, "hook": d.hook, "model": loaded.model_id, "n_features": d.n_features, "top": cfg.top,
            "clamp_multiple": cfg.clamp_multiple, "skip": cfg.input.exclude_positions_below,
            "neutral_prompts": list(cfg.neutral_prompts), "dashboard": cfg.dashboard, "concepts": results,
            "config": asdict(cfg)}


def run_splitting(cfg: AuditConfig) -> dict:
    r = split_dictionaries(cfg.small, cfg.large, cfg.threshold)
    c = r["counts"]
    print(f"splitting {r['small']} ({r['n_small']}) -> {r['large']} ({r['n_large']}) at cosine >= {r['threshold']:g}: "
          f"{c['small_split']} split, {c['small_with_one_child']} one child, {c['small_with_no_child']} no child; "
          f"{c['large_children']} children, {c['large_novel']} novel", flush=True)
    return {**r, "dashboard": cfg.dashboard, "large_dashboard": cfg.large_dashboard}


def run_neighbours(cfg: AuditConfig) -> dict:
    from pipeline.audit.neighbours import neighbourhoods, write_data
    from pipeline.audit.splitting import load_decoder
    t = time.time()
    decoder, meta = load_decoder(cfg.input.checkpoint)
    summary, data = neighbourhoods(decoder, cfg.n_neighbours, cfg.map_method, cfg.map_neighbours, cfg.seed)
    write_data(Path(cfg.out_dir), data)
    print(f"neighbours: {summary['n_features']} features, median nearest cosine {summary['median_first_cosine']:.3f}, "
          f"{summary['map_method']} map ({time.time() - t:.1f}s)", flush=True)
    return {"sae": cfg.input.checkpoint, "hook": meta.get("hook"), **summary, "dashboard": cfg.dashboard}


def run_completeness(cfg: AuditConfig) -> dict:
    from pipeline.audit.completeness import completeness, format_completeness, resolve_concept_lists
    lists = resolve_concept_lists(list(cfg.categories))  # validate every file before loading the model
    loaded = load_model(cfg.input.model)
    d = Dictionary.load(cfg.input.checkpoint, loaded, cfg.input.hook)
    r = completeness(d, loaded, lists, cfg.corpus, cfg.max_documents, cfg.alive_tokens, cfg.dedicated_auroc,
                     cfg.min_fire_fraction, cfg.max_density, cfg.uniqueness)
    print(format_completeness(r), flush=True)
    return {"sae": d.path, "hook": d.hook, "model": loaded.model_id, **r, "corpus_config": asdict(cfg.corpus),
            "dashboard": cfg.dashboard}


def run_absorption(cfg: AuditConfig) -> dict:
    from pipeline.audit.absorption import absorption, format_absorption, sklearn_logistic
    sklearn_logistic()  # fail before loading the model
    loaded = load_model(cfg.input.model)
    d = Dictionary.load(cfg.input.checkpoint, loaded, cfg.input.hook)
    r = absorption(d, loaded, cfg.absorption_words, cfg.absorption_max_k, cfg.absorption_f1_jump, cfg.seed)
    print(format_absorption(r), flush=True)
    return {"sae": d.path, "hook": d.hook, "model": loaded.model_id, "n_features": d.n_features, **r,
            "dashboard": cfg.dashboard}


# task -> its runner(cfg) -> the audit.json section it writes (under the task's name).
TASKS = {"concepts": run_concepts, "splitting": run_splitting, "crossmodal": run_crossmodal,
         "neighbours": run_neighbours, "completeness": run_completeness, "absorption": run_absorption,
         "autointerp": run_autointerp}


def format_concept(r: dict) -> str:
    if not r["features"]:
        return f"{r['name']}: no feature fires on a positive prompt"
    f = r["features"][0]
    s = f["steering"]
    return (f"{r['name']}: feature {f['feature']} AUROC {f['auroc']:.3f}, held-out {f['heldout_auroc']:.3f}, "
            f"d {f['effect_size']:.2f}; clamped to {s['clamp_value']:.3g}: d log P(words) {s['delta_logprob']:+.3f}, "
            f"KL {s['kl']:.3f}")


__all__ = ["AUDIT_FILE", "REPORT_FILE", "run"]
