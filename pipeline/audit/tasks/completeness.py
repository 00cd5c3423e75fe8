"""audit/task=completeness: for lists of concrete concepts (elements, cities, animals), how often each
occurs in the corpus and whether the dictionary has a feature dedicated to it
(pipeline/audit/completeness.py)."""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.html import feature_link, feature_links
from pipeline.audit.common import TaskConfig
from pipeline.audit.completeness import completeness, resolve_concept_lists
from pipeline.data import DataConfig
from pipeline.errors import ConfigError

LABEL = "completeness"
ORDER = 50


@dataclass
class Config(TaskConfig):
    categories: list[str] = field(default_factory=list)
    """Concept lists: names shipped in pipeline/audit/concept_lists/ (elements, cities, animals) or
    paths to YAML files of the same form. Empty: every shipped list."""
    corpus: DataConfig = field(default_factory=DataConfig)
    """The text the activation store was cached from (default: the embedded corpus's train split,
    the cache stage's default): concept frequencies and alive features."""
    max_documents: int = 100_000
    """Concept hits are counted in at most this many documents of corpus."""
    alive_tokens: int = 32_768
    """A feature is alive if it fires on one of this many tokens of corpus."""
    dedicated_auroc: float = 0.99
    """A concept has a dedicated feature when one fires on its name in at least min_fire_fraction
    of the template sentences, on at most max_density of corpus tokens, and separates its name from
    every other name and every other token of the sentences with at least this AUROC
    (docs/audit.md)."""
    min_fire_fraction: float = 0.5
    """See dedicated_auroc."""
    max_density: float = 1e-3
    """See dedicated_auroc (density over the alive_tokens pass)."""
    uniqueness: float = 2.0
    """... and its mean activation on the name is at least this multiple of its mean on any other
    name of any list."""

    def __post_init__(self):
        if (not 0.5 <= self.dedicated_auroc <= 1.0 or not 0.0 < self.min_fire_fraction <= 1.0
                or not 0.0 < self.max_density <= 1.0 or self.uniqueness < 1.0):
            raise ConfigError(f"task.dedicated_auroc={self.dedicated_auroc} must lie in [0.5, 1], "
                              f"task.min_fire_fraction={self.min_fire_fraction} and task.max_density="
                              f"{self.max_density} in (0, 1], task.uniqueness={self.uniqueness} >= 1. Fix: "
                              "task.dedicated_auroc=0.99 task.min_fire_fraction=0.5 task.max_density=0.001 "
                              "task.uniqueness=2")
        if self.max_documents < 1 or self.alive_tokens < 1:
            raise ConfigError(f"task.max_documents={self.max_documents} and task.alive_tokens={self.alive_tokens} "
                              "must be >= 1")


def run(cfg) -> dict:
    """The completeness section of audit.json (cfg: the AuditConfig; cfg.task: this module's Config)."""
    task: Config = cfg.task
    lists = resolve_concept_lists(list(task.categories))  # validate every file before loading the model
    loaded, d = Dictionary.from_input(cfg.input)
    r = completeness(d, loaded, lists, task.corpus, task.max_documents, task.alive_tokens, task.dedicated_auroc,
                     task.min_fire_fraction, task.max_density, task.uniqueness)
    return {"sae": d.path, "hook": d.hook, "model": loaded.model_id, **r, "corpus_config": asdict(task.corpus),
            "dashboard": cfg.dashboard}


def summary(sec: dict) -> str:
    per = ", ".join(f"{c['name']} {c['n_found']}/{c['n_concepts']}" for c in sec["categories"])
    return (f"completeness: {sec['n_found']}/{sec['n_concepts']} concepts with a dedicated feature ({per}); "
            f"{sec['n_alive']} of {sec['n_features']} features alive on {sec['alive_tokens']} tokens; frequencies over "
            f"{sec['corpus']['n_documents']} documents ({sec['corpus']['n_tokens']} tokens)")


# --- report -------------------------------------------------------------------------------------

def p_found_svg(sec: dict, width: int = 620, height: int = 260) -> str:
    """P(found) per bin of log10(frequency x alive features) as inline SVG: one dot per concept
    (found at the top, not found at the bottom, jittered deterministically) and the binned fraction."""
    bins = sec["bins"]
    pad_l, pad_r, pad_t, pad_b = 44, 16, 14, 34
    lo = bins[1]["lo"] if len(bins) > 1 else -3.0
    hi = bins[-1]["hi"] if len(bins) > 1 else 0.0
    zero_w = 64  # the column for frequency 0
    plot_w = width - pad_l - pad_r - zero_w

    def X(v):
        return pad_l + zero_w + (v - lo) / ((hi - lo) or 1) * plot_w

    def Y(p):
        return pad_t + (1 - p) * (height - pad_t - pad_b)

    parts = [f'<svg id="completeness-plot" width="{width}" height="{height}" role="img" '
             f'aria-label="P(found) against frequency x alive features">',
             f'<line x1="{pad_l}" y1="{Y(0)}" x2="{width - pad_r}" y2="{Y(0)}" stroke="#c5cbd3"/>',
             f'<line x1="{pad_l}" y1="{Y(0)}" x2="{pad_l}" y2="{Y(1)}" stroke="#c5cbd3"/>']
    for p in (0, 0.5, 1):
        parts.append(f'<text class="axis" x="{pad_l - 6}" y="{Y(p) + 3:.1f}" text-anchor="end">{p:g}</text>')
    sep = pad_l + zero_w - 8
    parts.append(f'<text class="axis" x="{pad_l + zero_w / 2 - 6}" y="{height - pad_b + 14}" '
                 f'text-anchor="middle">no hit</text>'
                 f'<line x1="{sep}" y1="{Y(0)}" x2="{sep}" y2="{Y(1)}" stroke="#eceef1"/>')
    for v in range(int(lo), int(hi) + 1):
        parts.append(f'<text class="axis" x="{X(v):.1f}" y="{height - pad_b + 14}" text-anchor="middle">1e{v}</text>')
    parts.append(f'<text class="axis" x="{pad_l + (width - pad_l) / 2}" y="{height - 4}" text-anchor="middle">'
                 'concept frequency (per token) &times; alive features</text>')
    k = 0
    for c in sec["categories"]:
        for r in c["concepts"]:
            k += 1
            jx, jy = ((k * 37) % 17 - 8) / 8.0, ((k * 53) % 11 - 5) / 5.0  # deterministic jitter
            x = (pad_l + zero_w / 2 - 6 + jx * 16) if r["frequency_x_alive"] <= 0 else \
                X(math.log10(r["frequency_x_alive"])) + jx * 2
            y = Y(1) + 7 + jy * 5 if r["found"] else Y(0) - 7 + jy * 5
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{"#1b7a3a" if r["found"] else "#9aa3ad"}" '
                         f'fill-opacity="0.6"><title>{html.escape(r["concept"])}: {r["hits"]} hits'
                         f'{", found" if r["found"] else ""}</title></circle>')
    pts = []
    for b in bins:
        if not b["n"]:
            continue
        x = pad_l + zero_w / 2 - 6 if b["lo"] is None else X((b["lo"] + b["hi"]) / 2)
        pts.append((x, Y(b["p_found"]), b))
    for x, y, b in pts:
        parts.append(f'<circle class="bin" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#1a5fb4"><title>'
                     f'{b["found"]}/{b["n"]} found</title></circle>')
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y, b in pts if b["lo"] is not None)
    if line:
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1a5fb4" stroke-width="1.5"/>')
    parts.append("</svg>")
    return "".join(parts)


def render(sec: dict, out_dir: Path) -> str:
    links = feature_links(sec.get("dashboard"), out_dir)

    def span(b):
        return "0 (no hit)" if b["lo"] is None else f'1e{b["lo"]:g} .. 1e{b["hi"]:g}'

    bins = "".join(
        f'<tr><td>{span(b)}</td>'
        f'<td class="num">{b["n"]}</td><td class="num">{b["found"]}</td>'
        f'<td class="num">{"-" if b["p_found"] is None else format(b["p_found"], ".2f")}</td></tr>'
        for b in sec["bins"])
    cats = []
    for c in sec["categories"]:
        rows = "".join(
            f'<tr data-concept="{html.escape(r["concept"])}"><td>{html.escape(r["concept"])}</td>'
            f'<td class="num">{r["hits"]}</td><td class="num">{r["frequency_x_alive"]:.3g}</td>'
            f'<td>{"-" if r["feature"] is None else feature_link(r["feature"], links)}</td>'
            f'<td class="num">{"-" if r["auroc"] is None else format(r["auroc"], ".3f")}</td>'
            f'<td class="num">{r["fire_fraction"]:.2f}</td>'
            f'<td class="num">{"-" if r["density"] is None else format(r["density"], ".2g")}</td>'
            f'<td class="{"good" if r["found"] else "meta"}">{"yes" if r["found"] else "no"}</td></tr>'
            for r in sorted(c["concepts"], key=lambda r: (-r["hits"], r["concept"])))
        cats.append(f'<details><summary>{html.escape(c["name"])}: {c["n_found"]} of {c["n_concepts"]} found</summary>'
                    f'<p class="meta">templates: {" | ".join(html.escape(t) for t in c["templates"])}</p>'
                    f'<table class="completeness-concepts"><thead><tr><th>concept</th><th>hits</th>'
                    f'<th>freq &times; alive</th><th>best feature</th><th>AUROC</th><th>fires in</th>'
                    f'<th>density</th><th>dedicated</th>'
                    f'</tr></thead><tbody>{rows}</tbody></table></details>')
    cp = sec["corpus"]
    return f"""<h2 id="completeness">Feature completeness</h2>
<p class="meta">SAE {html.escape(str(sec.get('sae')))} &middot; {sec['n_alive']} of {sec['n_features']} features alive
on {sec['alive_tokens']} tokens &middot; frequencies over the first {cp['n_documents']} documents
({cp['n_tokens']} tokens) of the corpus &middot; {sec['n_found']} of {sec['n_concepts']} concepts found</p>
<p><b>Frequency</b>: hits of &ldquo;&nbsp;name&nbsp;&rdquo; (a space on each side) per token of the corpus. A concept
has a <b>dedicated feature</b> when some feature fires on its name in at least {sec['min_fire_fraction']:.0%} of
its list's template sentences, fires on at most {sec['max_density']:g} of corpus tokens, and separates its name from
every other name (all lists) and every other token of the {sec['n_context_tokens']} context positions with AUROC
&ge; {sec['dedicated_auroc']:g}, and its mean activation on the name is at least {sec['uniqueness']:g}&times; its
mean on any other name. The best feature shown is the candidate (fires in enough templates, rare enough)
with the highest AUROC. Scaling Monosemanticity found the chance of a feature rising with frequency,
reaching 50% slightly below frequency &times; alive features = 1.</p>
{p_found_svg(sec)}
<table id="completeness-bins"><thead><tr><th>frequency &times; alive</th><th>concepts</th><th>found</th>
<th>P(found)</th></tr></thead><tbody>{bins}</tbody></table>
{''.join(cats)}"""
