"""audit.html: one static page (inline CSS, no script, no network) rendered from audit.json, with
the interpretation dashboard's styles and token highlighting; features link to their dashboard
pages when a dashboard folder was given."""

from __future__ import annotations

import html
import os
from pathlib import Path

from pipeline.analysis import html as H
from pipeline.analysis.html import feature_link, feature_links

REPORT_FILE = "audit.html"

EXTRA_CSS = """<style>
.good{color:#1b7a3a;font-weight:600}.weak{color:#9a6700}.bad{color:#b3261e}
details{margin:4px 0 10px}summary{cursor:pointer;color:#1a5fb4}
td.words{font-size:12px}
</style>"""


def _auroc_cls(a: float) -> str:
    return "good" if a >= 0.9 else ("weak" if a >= 0.7 else "bad")


def _num(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def concepts_section(sec: dict, links) -> str:
    rows = []
    for c in sec["concepts"]:
        f = c["features"][0] if c["features"] else None
        st = f["steering"] if f else {}
        rows.append(
            f'<tr data-concept="{html.escape(c["name"])}"><td><a href="#concept-{html.escape(c["name"])}">'
            f'{html.escape(c["name"])}</a></td><td>{feature_link(f["feature"], links) if f else "none fires"}</td>'
            + (f'<td class="num">{f["auroc"]:.3f}</td><td class="num {_auroc_cls(f["heldout_auroc"])}">'
               f'{f["heldout_auroc"]:.3f}</td><td class="num">{st["delta_logprob"]:+.3f}</td>'
               f'<td class="num">{st["kl"]:.3f}</td>' if f else '<td></td>' * 4)
            + f'<td class="num">{_best_heldout(c)}</td></tr>')
    summary = (f'<table id="summary"><thead><tr><th>concept</th><th>top feature</th><th>AUROC</th>'
               f'<th>held-out AUROC</th><th>&Delta; log P(words)</th><th>KL</th><th>best held-out AUROC '
               f'in top {sec["top"]}</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
    parts = [f"""<h2 id="concepts">Concept search</h2>
<p class="meta">SAE {html.escape(sec['sae'])} &middot; hook {html.escape(sec['hook'])} &middot; model
{html.escape(sec['model'])} &middot; {len(sec['concepts'])} concept sets &middot; clamp {sec['clamp_multiple']:g}&times;
the feature's max activation on the positives</p>
<p>Each prompt is summarised per feature by its max and its mean activation over positions &ge; {sec['skip']}.
Features are ranked by the mean of the two AUROCs (max, mean) of the positive against the negative prompts, ties
broken by the effect size (Cohen's d) of the max. <b>Held-out AUROC</b> is the AUROC of the max on prompts the
ranking never saw (shaded below: positions &ge; {sec['skip']}). <b>&Delta; log P(words)</b>: the change
in log-probability that the text after a neutral prompt is one of the concept words, when the feature is
clamped (SAE error term kept), averaged over {len(sec['neutral_prompts'])} neutral prompts; <b>KL</b>:
KL(clean &#8214; steered) of the next-token distribution; <b>control &Delta;</b>: the same change when a random
direction of the same norm is added instead (a shift well above it is specific to the feature);
<b>added / resid. norm</b>: the clamp times the feature's decoder norm over the median norm of the residual
stream at the hook (how hard the clamp pushes). Small prompt sets: treat AUROCs on 4+4
held-out prompts as coarse, and read the shaded prompts: a feature can separate a dozen prompts by style alone.</p>
{summary}"""]
    for c in sec["concepts"]:
        parts.append(concept_block(c, links))
    return "\n".join(parts)


def _best_heldout(c: dict) -> str:
    if not c["features"]:
        return "-"
    return f'{max(f["heldout_auroc"] for f in c["features"]):.3f}'


def concept_block(c: dict, links) -> str:
    langs = f' &middot; languages {", ".join(c["languages"])}' if c["languages"] else ""
    n = c["n_prompts"]
    head = (f'<h3 id="concept-{html.escape(c["name"])}">{html.escape(c["name"])}</h3>'
            f'<p>{html.escape(c["description"])}</p><p class="meta">{n["positive"]} positive, {n["negative"]} '
            f'negative, {n["heldout_positive"]}+{n["heldout_negative"]} held-out prompts{langs} &middot; concept '
            f'words: {" ".join(f"<span class=pill>{html.escape(w)}</span>" for w in c["concept_words"])}</p>')
    if not c["features"]:
        return head + "<p class=bad>No feature fires on any positive prompt.</p>"
    rows = []
    for r, f in enumerate(c["features"], 1):
        st = f["steering"]
        words = " ".join(f'{html.escape(w)} {d:+.2f}' for w, d in zip(c["concept_words"], st["delta_logprob_per_word"]))
        promoted = "".join(f"<span class=pill>{html.escape(H.show(t))}</span>" for t in st["promoted_tokens"][:6])
        rows.append(
            f'<tr class="feature-row" data-feature="{f["feature"]}"><td class="num">{r}</td>'
            f'<td>{feature_link(f["feature"], links)}'
            f'</td><td class="num">{f["auroc"]:.3f}</td><td class="num">{f["effect_size"]:.2f}</td>'
            f'<td class="num">{f["auroc_mean"]:.3f}</td><td class="num heldout {_auroc_cls(f["heldout_auroc"])}">'
            f'{f["heldout_auroc"]:.3f}</td><td class="num">{f["pos_max"]:.3g}</td><td class="num">'
            f'{st["clamp_value"]:.3g}</td><td class="num">{st["added_norm_ratio"]:.2g}</td>'
            f'<td class="num delta">{st["delta_logprob"]:+.3f}</td>'
            f'<td class="num control">{st["control_delta_logprob"]:+.3f}</td>'
            f'<td class="num">{st["kl"]:.3f}</td><td class="words">{words}</td><td>{promoted}</td></tr>')
    table = ('<table class="features"><thead><tr><th>#</th><th>feature</th><th>AUROC (max)</th><th>d (max)</th>'
             '<th>AUROC (mean)</th><th>held-out AUROC</th><th>max on positives</th><th>clamp</th>'
             '<th title="clamp x decoder norm / median residual norm at the hook">added / resid. norm</th>'
             '<th>&Delta; log P(words)</th><th title="a random direction of the same added norm">control &Delta;</th>'
             '<th>KL</th><th>&Delta; per word</th><th>most promoted next tokens</th>'
             f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return head + table + evidence_block(c, links)


def evidence_block(c: dict, links) -> str:
    """Held-out prompts shaded by each top feature's activation (the first feature open)."""
    blocks = []
    for r, f in enumerate(c["features"]):
        key = str(f["feature"])
        scale = max([max(e["acts"][key] or [0]) for e in c["heldout_evidence"]] + [f["pos_max"], 1e-9])
        lines = "".join(
            f'<div class="ctx {e["label"]}"><span class="v">{e["label"][:3]}</span><span class="toks">'
            f'{H.highlight(e["tokens"], e["acts"][key], scale)}</span></div>' for e in c["heldout_evidence"])
        blocks.append(f'<details{" open" if r == 0 else ""}><summary>held-out prompts, feature {f["feature"]}'
                      f'</summary>{lines}</details>')
    return "".join(blocks)


def splitting_section(sec: dict, links_small, links_large, max_rows: int = 300) -> str:
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


def cosine_bars(edges: list[float], counts: list[int], width: int = 520, height: int = 120) -> str:
    """Inline SVG bars of a histogram on linear bins (the dashboard's histogram_svg draws log bins)."""
    top = max(counts) or 1
    bw = (width - 20) / len(counts)
    bars = "".join(
        f'<rect class="bar" x="{10 + i * bw:.1f}" y="{height - 20 - (height - 30) * c / top:.1f}" '
        f'width="{max(bw - 1, 1):.1f}" height="{(height - 30) * c / top:.1f}"><title>{edges[i]:.1f}..'
        f'{edges[i + 1]:.1f}: {c}</title></rect>' for i, c in enumerate(counts))
    labels = "".join(f'<text class="axis" x="{10 + i * bw:.1f}" y="{height - 6}" text-anchor="middle">'
                     f'{edges[i]:g}</text>' for i in range(0, len(edges), 5))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="best-match cosine histogram">'
            f'{bars}{labels}</svg>')


def _concepts(sec: dict, out_dir: Path) -> str:
    return concepts_section(sec, feature_links(sec.get("dashboard"), out_dir))


def _splitting(sec: dict, out_dir: Path) -> str:
    return splitting_section(sec, feature_links(sec.get("dashboard"), out_dir),
                             feature_links(sec.get("large_dashboard"), out_dir))


def _crossmodal(sec: dict, out_dir: Path) -> str:
    from pipeline.audit.crossmodal import crossmodal_section
    links = feature_links(sec.get("dashboard"), out_dir)
    return crossmodal_section(sec, lambda i: feature_link(i, links))


def _neighbours(sec: dict, out_dir: Path) -> str:
    from pipeline.audit.neighbours import neighbours_section
    return neighbours_section(sec, out_dir)


def _completeness(sec: dict, out_dir: Path) -> str:
    from pipeline.audit.completeness import completeness_section
    return completeness_section(sec, out_dir)


def _absorption(sec: dict, out_dir: Path) -> str:
    from pipeline.audit.absorption import absorption_section
    return absorption_section(sec, out_dir)


def _autointerp(sec: dict, out_dir: Path) -> str:
    from pipeline.audit.autointerp.report import autointerp_section
    links = feature_links(sec.get("dashboard"), out_dir)
    return autointerp_section(sec, lambda i: feature_link(i, links))


# audit.json section -> (navigation label, renderer(section, out_dir) -> HTML); one entry per task,
# shown in this order. A section's renderer gives its <h2> the id of the section's key.
SECTIONS = {
    "concepts": ("concept search", _concepts),
    "splitting": ("feature splitting", _splitting),
    "crossmodal": ("cross-modal", _crossmodal),
    "neighbours": ("neighbourhoods", _neighbours),
    "completeness": ("completeness", _completeness),
    "absorption": ("absorption", _absorption),
    "autointerp": ("automated interpretability", _autointerp),
}


def render(doc: dict, out_dir: Path) -> str:
    sections, nav = [], []
    for key, (label, fn) in SECTIONS.items():
        if key in doc:
            sections.append(fn(doc[key], out_dir))
            nav.append(f'<a href="#{key}">{label}</a>')
    dash = next((doc[k]["dashboard"] for k in SECTIONS if isinstance(doc.get(k), dict) and doc[k].get("dashboard")),
                None)
    if dash and (Path(dash) / H.INDEX_FILE).exists():
        rel = os.path.relpath((Path(dash) / H.INDEX_FILE).resolve(), out_dir.resolve()).replace(os.sep, "/")
        nav.insert(0, f'<a href="{html.escape(rel)}">&larr; feature dashboard</a>')
    body = (f'<div class="nav">{"".join(nav)}</div><h1>Dictionary audit</h1>'
            f'<p class="meta">audit.json holds every number shown here.</p>{EXTRA_CSS}' + "\n".join(sections))
    return H.page("Dictionary audit", body)


def write_report(doc: dict, out_dir: Path) -> Path:
    path = out_dir / REPORT_FILE
    H.write(path, render(doc, out_dir))
    return path
