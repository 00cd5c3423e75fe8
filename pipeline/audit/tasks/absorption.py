"""audit/task=absorption: SAEBench's feature absorption on the first-letter task
(pipeline/audit/absorption.py)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.html import feature_link, feature_links
from pipeline.audit.absorption import N_ICL, absorption, sklearn_logistic
from pipeline.audit.common import TaskConfig, num
from pipeline.errors import ConfigError

LABEL = "absorption"
ORDER = 60


@dataclass
class Config(TaskConfig):
    words: int = 3000
    """Words (single vocabulary tokens, a space plus letters) sampled for the first-letter task, 80%
    train, 20% test."""
    max_k: int = 10
    """The largest k of the k-sparse probes that pick each letter's main latents."""
    f1_jump: float = 0.03
    """A letter's main latents grow from k to k+1 while the test F1 rises by more."""
    seed: int = 0
    """Seed of the word sample."""

    def __post_init__(self):
        if self.words < 100 or self.max_k < 1:
            raise ConfigError(f"task.words={self.words} must be >= 100 (26 letters, 80/20 split) and "
                              f"task.max_k={self.max_k} >= 1. Fix: task.words=3000")


def run(cfg) -> dict:
    """The absorption section of audit.json (cfg: the AuditConfig; cfg.task: this module's Config)."""
    task: Config = cfg.task
    sklearn_logistic()  # fail before loading the model
    loaded, d = Dictionary.from_input(cfg.input)
    r = absorption(d, loaded, task.words, task.max_k, task.f1_jump, task.seed)
    return {"sae": d.path, "hook": d.hook, "model": loaded.model_id, "n_features": d.n_features, **r,
            "dashboard": cfg.dashboard}


def summary(sec: dict) -> str:
    if sec["mean_absorption_fraction"] is None:
        return f"absorption: no letter's probe reached F1 > 0.6 on {sec['n_words']} words"
    return (f"absorption: mean fraction {sec['mean_absorption_fraction']:.3f}, full-absorption rate "
            f"{sec['mean_full_absorption_rate']:.3f}, {sec['mean_num_main_latents']:.2f} main latents per letter, over "
            f"{sec['n_letters_scored']} letters with probe F1 > 0.6 ({sec['n_words']} words)"
            + (" [fewer than 20 letters: not comparable to SAEBench]" if sec["too_few_letters"] else ""))


# --- report -------------------------------------------------------------------------------------

def render(sec: dict, out_dir: Path) -> str:
    links = feature_links(sec.get("dashboard"), out_dir)
    rows = []
    for r in sec["letters"]:
        if r["skipped"]:
            rows.append(f'<tr data-letter="{r["letter"]}"><td>{r["letter"]}</td><td colspan="7" class="meta">too few '
                        f'words ({r["n_train"]} train, {r["n_test"]} test)</td></tr>')
            continue
        mains = ", ".join(f'{feature_link(i, links)} <span class="meta">({c:.2f})</span>'
                          for i, c in zip(r["main_latents"], r["main_cosines"])) or "-"
        ex = " ".join(f'<span class="pill">{html.escape(e["word"])} {e["absorption_fraction"]:.2f}'
                      f'{" full" if e["full"] else ""}</span>' for e in r["examples"])
        cls = "" if r["probe_f1"] > 0.6 else ' class="meta"'
        k_f1 = r["k_sparse_f1"][len(r["main_latents"]) - 1] if r["main_latents"] else None
        rows.append(f'<tr data-letter="{r["letter"]}"{cls}><td>{r["letter"]}</td>'
                    f'<td class="num">{r["probe_f1"]:.2f}</td>'
                    f'<td class="num">{r["n_probe_true_positives"]}</td><td>{mains}</td>'
                    f'<td class="num">{num(k_f1, ".2f")}</td>'
                    f'<td class="num">{num(r["mean_absorption_fraction"])}</td>'
                    f'<td class="num">{num(r["full_absorption_rate"])}</td><td>{ex}</td></tr>')
    few = " (fewer than 20)" if sec["too_few_letters"] else ""
    return f"""<h2 id="absorption">Feature absorption (first letter)</h2>
<p class="weak"><b>Caveat.</b> {html.escape(sec['caveat'])}</p>
<p class="meta">SAE {html.escape(str(sec.get('sae')))} &middot; {sec['n_words']} words ({sec['n_train']} train,
{sec['n_test']} test) &middot; prompt: {N_ICL} in-context examples, then &ldquo;{html.escape(sec['template'])}&rdquo;,
read at the word's token &middot; max k {sec['max_k']}, F1 jump {sec['f1_jump']}</p>
<table id="absorption-summary"><tr><th>mean absorption fraction</th>
<td class="num">{num(sec['mean_absorption_fraction'])}</td></tr>
<tr><th>mean full-absorption rate</th><td class="num">{num(sec['mean_full_absorption_rate'])}</td></tr>
<tr><th>main latents per letter</th><td class="num">{num(sec['mean_num_main_latents'], '.2f')}</td></tr>
<tr><th>letters scored (probe F1 &gt; 0.6)</th><td class="num">{sec['n_letters_scored']}{few}</td></tr></table>
<p>Per letter: the residual probe's test F1; its true positives on the test words (the words scored); the main
latents (cosine of the decoder row with the probe) and the k-sparse probe's F1 with them; the mean absorption
fraction and the full-absorption rate over the scored words; words with absorption &gt; 0. Greyed letters (probe F1
&le; 0.6) are left out of the means. Definitions: docs/audit.md.</p>
<table id="absorption-letters"><thead><tr><th>letter</th><th>probe F1</th><th>scored words</th><th>main latents</th>
<th>k-sparse F1</th><th>absorption</th><th>full absorption</th><th>absorbed words</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>"""
