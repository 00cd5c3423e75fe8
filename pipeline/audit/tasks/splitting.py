"""audit/task=splitting: match the features of two dictionaries of different sizes on the same hook
by decoder cosine (pipeline/audit/splitting.py)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from pipeline.analysis.html import feature_link, feature_links
from pipeline.audit.common import TaskConfig, cosine_bars
from pipeline.audit.splitting import split_dictionaries
from pipeline.errors import ConfigError

LABEL = "feature splitting"
ORDER = 20


@dataclass
class Config(TaskConfig):
    small: str | None = None
    """The smaller exported SAE (`dashboard` is its dashboard folder, for links)."""
    large: str | None = None
    """The larger exported SAE on the same hook."""
    large_dashboard: str | None = None
    """The large dictionary's dashboard folder, for links."""
    threshold: float = 0.7
    """A large-dictionary feature is a child of the small-dictionary feature whose decoder row is
    closest in cosine if that cosine is at least this; otherwise it is novel."""

    def __post_init__(self):
        if not (self.small and self.large):
            raise ConfigError(f"audit/task=splitting needs two exported SAEs on the same hook; got task.small="
                              f"{self.small!r}, task.large={self.large!r}. Fix: task.small=runs/sae-1k "
                              "task.large=runs/sae-4k")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"task.threshold={self.threshold} is a cosine similarity and must lie in [-1, 1]")


def run(cfg) -> dict:
    """The splitting section of audit.json (cfg: the AuditConfig; cfg.task: this module's Config)."""
    task: Config = cfg.task
    r = split_dictionaries(task.small, task.large, task.threshold)
    return {**r, "dashboard": cfg.dashboard, "large_dashboard": task.large_dashboard}


def summary(sec: dict) -> str:
    c = sec["counts"]
    return (f"splitting {sec['small']} ({sec['n_small']}) -> {sec['large']} ({sec['n_large']}) at cosine >= "
            f"{sec['threshold']:g}: {c['small_split']} split, {c['small_with_one_child']} one child, "
            f"{c['small_with_no_child']} no child; {c['large_children']} children, {c['large_novel']} novel")


def render(sec: dict, out_dir: Path, max_rows: int = 300) -> str:
    links_small = feature_links(sec.get("dashboard"), out_dir)
    links_large = feature_links(sec.get("large_dashboard"), out_dir)
    c = sec["counts"]
    split = [x for x in sec["children"] if len(x["children"]) >= 2]
    split.sort(key=lambda x: -len(x["children"]))
    rest = [x for x in sec["children"] if len(x["children"]) < 2]
    rows = []
    for x in (split + rest)[:max_rows]:
        kids = ", ".join(f'{feature_link(k["feature"], links_large)} <span class="meta">({k["cosine"]:.2f})</span>'
                         for k in x["children"]) or '<span class="meta">none</span>'
        rows.append(f'<tr data-small="{x["feature"]}"><td>{feature_link(x["feature"], links_small)}</td>'
                    f'<td class="num">{len(x["children"])}</td><td>{kids}</td></tr>')
    more = len(split) + len(rest) - max_rows
    novel = ", ".join(f'{feature_link(n["feature"], links_large)} <span class="meta">({n["best_cosine"]:.2f})</span>'
                      for n in sec["novel"][:max_rows])
    h = sec["best_cosine_histogram"]
    hist = cosine_bars(h["edges"], h["counts"])
    return f"""<h2 id="splitting">Feature splitting</h2>
<p class="meta">small {html.escape(sec['small'])} ({sec['n_small']} features) &middot; large {html.escape(sec['large'])}
({sec['n_large']} features) &middot; hook {html.escape(str(sec['hook']))} &middot; threshold {sec['threshold']:g}</p>
<p>Each large-dictionary feature is matched to the small-dictionary feature with the most similar decoder row (cosine);
at or above the threshold it is that feature's <b>child</b>, below it it is <b>novel</b>.</p>
<table id="split-counts"><tr><th>small features split (&ge; 2 children)</th><td class="num">{c['small_split']}</td></tr>
<tr><th>small features with one child</th><td class="num">{c['small_with_one_child']}</td></tr>
<tr><th>small features with no child</th><td class="num">{c['small_with_no_child']}</td></tr>
<tr><th>large features that are children</th><td class="num">{c['large_children']}</td></tr>
<tr><th>large features that are novel</th><td class="num" id="n-novel">{c['large_novel']}</td></tr></table>
<h3>Best-match cosine of the large features</h3>{hist}
<h3>Children of each small feature</h3><table id="children"><thead><tr><th>small feature</th><th>children</th>
<th>large features (cosine)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
{f'<p class=meta>{more} more in audit.json</p>' if more > 0 else ''}
<h3>Novel features of the large dictionary</h3><p class="toks" id="novel">{novel or 'none'}</p>"""
