"""The static HTML dashboard: self-contained pages (inline CSS, JS and SVG, data embedded as
JSON) that work from a file:// URL with no server and no network.

    <out>/index.html          every feature: sortable by density / max activation, searchable
    <out>/features/<i>.html   one live feature: highlighted contexts, histogram, logit effects
    <out>/search.html         the features of a prompt (task=search)
    <out>/crosslingual.html   features shared across languages (task=crosslingual)
    <out>/attribute.html      the features that carry a prompt's next token (task=attribute)
"""

from __future__ import annotations

import html

from pipeline.analysis import html as H
from pipeline.analysis.html import AUDIT_MARK, FEATURES_DIR, INDEX_FILE

SEARCH_FILE = "search.html"
CROSSLINGUAL_FILE = "crosslingual.html"
ATTRIBUTE_FILE = "attribute.html"


def _logit_table(pairs: list[list], cls: str) -> str:
    rows = "".join(f'<tr><td><span class="pill">{html.escape(H.show(t))}</span></td>'
                   f'<td class="num {cls}">{v:+.3f}</td></tr>' for t, v in pairs)
    return f"<table>{rows}</table>"


def feature_page(f: dict, texts, top: list[dict], samples: list[list[dict]], quantile_labels: list[str],
                 edges: list[float], counts: list[int], n_features: int, header: dict) -> str:
    """One feature's page. `texts(ids)` gives token texts; examples are collect.examples_of dicts."""
    i, max_act = f["index"], f["max_act"]

    def ctx(e):
        return (f'<div class="ctx"><span class="v">{e["value"]:.3g}</span><span class="toks">'
                f'{H.highlight(texts(e["tokens"]), e["acts"], max_act, e["center"])}</span></div>')

    nav = (f'<div class="nav"><a href="../{INDEX_FILE}">&larr; all features</a>'
           + (f'<a href="{i - 1}.html">&lsaquo; {i - 1}</a>' if i > 0 else "")
           + (f'<a href="{i + 1}.html">{i + 1} &rsaquo;</a>' if i + 1 < n_features else "") + "</div>")
    quant = "".join(f"<h3 class=meta>{html.escape(label)}</h3>" + "".join(ctx(e) for e in group)
                    for label, group in zip(quantile_labels, samples) if group)
    body = f"""{nav}
<h1>Feature {i}</h1>
<p class="meta">SAE {html.escape(header['sae'])} &middot; hook {html.escape(header['hook'])} &middot;
density {f['density']:.3g} ({f['count']} of {header['n_tokens']} tokens) &middot; max activation {max_act:.4g}
&middot; mean non-zero activation {f['mean_act']:.4g}</p>
<div class="cols"><div><h2>Activation histogram</h2>{H.histogram_svg(edges, counts)}
<p class="meta">non-zero activations, log-spaced bins</p></div>
<div><h2>Logit effects</h2><div class="cols"><div><b class="pos">promoted</b>{_logit_table(f['promoted'], 'pos')}</div>
<div><b class="neg">suppressed</b>{_logit_table(f['suppressed'], 'neg')}</div></div>
<p class="meta">decoder direction through the final norm's gain and the unembedding</p></div></div>
<h2 id="top">Top activations</h2>
<div id="top-examples">{''.join(ctx(e) for e in top)}</div>
<h2 id="quantiles">Samples by activation quantile</h2>
<div id="samples">{quant or '<p class=meta>none</p>'}</div>"""
    return H.page(f"Feature {i}", body)


INDEX_JS = r"""
const C = DATA.columns, LIMIT = 1000;
const F = C.index.map((index, i) => ({index, density: C.density[i], max_act: C.max_act[i], mean_act: C.mean_act[i],
                                      tokens: C.tokens[i], snippet: C.snippet[i], page: C.page[i]}));
let key = "density", dir = -1;
const q = document.getElementById("q"), hide = document.getElementById("hide-dead");
const tbody = document.querySelector("#features tbody"), status = document.getElementById("status");
function esc(s) { return s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function fmt(x) { return x === 0 ? "0" : x.toPrecision(3); }
let order = [];  // F sorted by the chosen column: sorted on a click, not on every keystroke (a million rows)
function sortRows() { order = F.slice().sort((a, b) => dir * ((a[key] > b[key]) - (a[key] < b[key])) || a.index - b.index); }
function render() {
  const s = q.value.trim().toLowerCase();
  const rows = order.filter(f => (!hide.checked || f.density > 0) &&
    (!s || String(f.index) === s || f.tokens.toLowerCase().includes(s) || f.snippet.toLowerCase().includes(s)));
  tbody.innerHTML = rows.slice(0, LIMIT).map(f =>
    `<tr class="${f.density > 0 ? "" : "dead"}"><td>${f.page ? `<a href="features/${f.index}.html">${f.index}</a>` : f.index}</td>` +
    `<td class="num">${fmt(f.density)}</td><td class="num">${fmt(f.max_act)}</td><td class="num">${fmt(f.mean_act)}</td>` +
    `<td class="toks">${esc(f.tokens)}</td><td class="toks">${esc(f.snippet)}</td></tr>`).join("");
  status.textContent = `showing ${Math.min(LIMIT, rows.length)} of ${rows.length} matching features (${F.length} in all)`;
  document.querySelectorAll("th.sort").forEach(th =>
    th.dataset.arrow = th.dataset.key === key ? (dir < 0 ? " \u25bc" : " \u25b2") : "");
  document.querySelectorAll("th.sort").forEach(th => th.textContent = th.dataset.label + th.dataset.arrow);
}
document.querySelectorAll("th.sort").forEach(th => th.addEventListener("click", () => {
  dir = th.dataset.key === key ? -dir : (th.dataset.key === "index" ? 1 : -1); key = th.dataset.key; sortRows(); render();
}));
q.addEventListener("input", render); hide.addEventListener("change", render);
const h = decodeURIComponent(location.hash.slice(1)); if (h) q.value = h;
sortRows(); render();
"""


def index_page(header: dict, rows: list[dict], links: dict[str, str], audit: str = "") -> str:
    """rows: {index, density, max_act, mean_act, tokens (promoted, as text), snippet, page (bool)};
    audit: the marked link to the audit report (read_audit_link), kept when the index is rewritten."""
    live = sum(r["density"] > 0 for r in rows)
    extra = " &middot; ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in links.items())
    cols = [("index", "feature"), ("density", "density"), ("max_act", "max act"), ("mean_act", "mean act")]
    ths = "".join(f'<th class="sort" data-key="{k}" data-label="{lab}">{lab}</th>' for k, lab in cols)
    body = f"""<h1>SAE features</h1>
<p class="meta">SAE {html.escape(header['sae'])} &middot; hook {html.escape(header['hook'])} &middot;
{header['n_features']} features, {live} live on {header['n_tokens']} tokens of {html.escape(header['data'])}
{('&middot; ' + extra) if extra else ''}{AUDIT_MARK[0]}{audit}{AUDIT_MARK[1]}</p>
<p><input id="q" type="search" placeholder="feature number, promoted token or context text">
<label class="meta"><input type="checkbox" id="hide-dead" checked> hide dead features</label>
&nbsp; <span id="status" class="meta"></span></p>
<table id="features"><thead><tr>{ths}<th>top promoted tokens</th><th>top activating context</th></tr></thead>
<tbody></tbody></table>
<script>const DATA = {H.json_for_script({'columns': _columns(rows)})};</script>
<script>{INDEX_JS}</script>"""
    return H.page("SAE features", body)


def _columns(rows: list[dict]) -> dict[str, list]:
    """The index rows as one list per field, statistics to 4 significant digits (the page shows 3),
    pages as 0/1: half the bytes of a list of objects, which at a million features is ~120 MB saved."""
    def short(x: float) -> float:
        return float(f"{x:.4g}")
    return {"index": [r["index"] for r in rows], "page": [int(r["page"]) for r in rows],
            **{k: [short(r[k]) for r in rows] for k in ("density", "max_act", "mean_act")},
            **{k: [r[k] for r in rows] for k in ("tokens", "snippet")}}


def search_page(result: dict, pages: set[int]) -> str:
    """result: from search.search_prompt."""
    def link(i):
        return f'<a href="{FEATURES_DIR}/{i}.html">{i}</a>' if i in pages else str(i)

    rows = "".join(
        f'<tr><td class="toks"><span class="pill">{html.escape(H.show(t["text"]))}</span></td><td>'
        + " ".join(f'{link(f["feature"])} <span class="meta">({f["act"]:.3g})</span>' for f in t["features"])
        + "</td></tr>" for t in result["tokens"])
    texts = [t["text"] for t in result["tokens"]]
    overall = "".join(
        f'<div class="ctx"><span class="v">{link(f["feature"])}</span><span class="toks">'
        f'{H.highlight(texts, f["acts"], max(f["max"], 1e-9))}</span>'
        f'<span class="meta">max {f["max"]:.3g}, sum {f["sum"]:.3g}</span></div>' for f in result["overall"])
    body = f"""<div class="nav"><a href="{INDEX_FILE}">&larr; all features</a></div>
<h1>Feature search</h1><p class="meta">SAE {html.escape(result['sae'])} &middot; hook {html.escape(result['hook'])}</p>
<p class="toks">{html.escape(result['prompt'])}</p>
<h2>Most active over the whole prompt</h2><div id="overall">{overall}</div>
<h2>Top features at each token</h2><table id="per-token">{rows}</table>"""
    return H.page("Feature search", body)


def crosslingual_page(report: dict, pages: set[int]) -> str:
    def link(i):
        return f'<a href="{FEATURES_DIR}/{i}.html">{i}</a>' if i in pages else str(i)

    langs = report["languages"]
    pair_rows = "".join(f'<tr><td>{html.escape(p)}</td><td class="num">{v["parallel"]:.3f}</td>'
                        f'<td class="num">{v["mismatched"]:.3f}</td></tr>' for p, v in report["pairs"].items())
    topics = []
    for t in report["topics"]:
        feats = "".join(
            f'<tr><td>{link(f["feature"])}</td><td class="num">{f["score"]:.3g}</td>'
            + "".join(f'<td class="num">{f["acts"][lang]:.3g}</td>' for lang in langs) + "</tr>"
            for f in t["features"])
        head = "".join(f"<th>{html.escape(lang)}</th>" for lang in langs)
        topics.append(f'<h3>{html.escape(t["topic"])} <span class="meta">({t["sentences"]} sentences)</span></h3>'
                      f'<table><tr><th>feature</th><th>score</th>{head}</tr>{feats or "<tr><td>none</td></tr>"}</table>')
    body = f"""<div class="nav"><a href="{INDEX_FILE}">&larr; all features</a></div>
<h1>Cross-lingual features</h1>
<p class="meta">SAE {html.escape(report['sae'])} &middot; {report['n_sentences']} parallel sentences in
{', '.join(langs)} &middot; top {report['top']} features per sentence</p>
<h2>Overlap of the top features (Jaccard)</h2>
<p>Parallel: the same sentence in two languages; mismatched: different sentences in the same two languages.
Overlap well above the mismatched baseline means features fire on the meaning, not the language.</p>
<table id="pairs"><tr><th>languages</th><th>parallel</th><th>mismatched</th></tr>{pair_rows}
<tr><th>mean</th><th class="num">{report['mean_parallel']:.3f}</th><th class="num">{report['mean_mismatched']:.3f}</th></tr></table>
<h2>Features of each topic in every language</h2>
<p class="meta">score: the smallest, over languages, of (mean max-activation on the topic's sentences minus that on
other topics); columns: mean max-activation on the topic per language</p>
{''.join(topics)}"""
    return H.page("Cross-lingual features", body)




def attribute_page(r: dict, pages: set[int]) -> str:
    """r: from attribute.attribute; each feature's tokens shaded by its attribution at each position."""
    def link(i):
        return f'<a href="{FEATURES_DIR}/{i}.html">{i}</a>' if i in pages else str(i)

    scale = max([max(f["attributions"]) for f in r["features"]] + [1e-9])
    rows = "".join(
        f'<tr><td>{link(f["feature"])}</td><td class="num">{f["attribution"]:.3g}</td>'
        f'<td class="num">{f["activation"]:.3g}</td><td class="num">{f["density"]:.3g}</td>'
        f'<td class="num">{f["ablation_drop"]:.3g}</td>'
        f'<td class="num">{f["random"]["mean"]:.3g} &plusmn; {f["random"]["std"]:.3g}</td>'
        f'<td class="toks">{H.highlight(r["tokens"], f["attributions"], scale)}</td></tr>' for f in r["features"])
    s = r["summary"]
    body = f"""<div class="nav"><a href="{INDEX_FILE}">&larr; all features</a></div>
<h1>Feature attribution</h1><p class="meta">SAE {html.escape(r['sae'])} &middot; hook {html.escape(r['hook'])}
&middot; ranked by {html.escape(r['ranking'])}; densities: {html.escape(r.get('density_source', ''))}</p>
<p class="toks">{html.escape(r['prompt'])}<span class="pill">{html.escape(H.show(r['target']))}</span></p>
<p>log p(target) = {r['base_logprob']:.4g} with the SAE spliced in (model: {r['model_logprob']:.4g}).
Ablating a top feature lowers it by {s['mean_drop']:.3g} on average, a density-matched random feature by
{s['mean_random_drop']:.3g}; {s['beats_random']} of {s['n_features']} top features beat all their random ones.</p>
<table id="attribution"><tr><th>feature</th><th>attribution</th><th>max act</th><th>density</th><th>ablation drop</th>
<th>random drop (mean &plusmn; std)</th><th>attribution by position</th></tr>{rows}</table>"""
    return H.page("Feature attribution", body)
