"""The static HTML dashboard: self-contained pages (inline CSS, JS and SVG, data embedded as
JSON) that work from a file:// URL with no server and no network.

    <out>/index.html          every feature: sortable by density / max activation, searchable
    <out>/features/<i>.html   one live feature: highlighted contexts, histogram, logit effects
    <out>/search.html         the features of a prompt (task=search)
    <out>/crosslingual.html   features shared across languages (task=crosslingual)
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

INDEX_FILE = "index.html"
FEATURES_DIR = "features"
SEARCH_FILE = "search.html"
CROSSLINGUAL_FILE = "crosslingual.html"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
  padding:16px 24px;color:#1d2125;background:#fff}
h1{font-size:22px;margin:4px 0 8px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #e3e6ea}
a{color:#1a5fb4;text-decoration:none}a:hover{text-decoration:underline}
.meta{color:#5b6570;font-size:13px}.nav{margin-bottom:8px;font-size:13px}.nav a{margin-right:14px}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #eceef1;text-align:left;
  vertical-align:top}th{background:#f5f6f8;position:sticky;top:0}th.sort{cursor:pointer;user-select:none}
th.sort:hover{background:#e8ebef}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;
  word-break:break-word}
.tok{border-radius:2px;padding:0 1px}.tok.max{outline:1.5px solid #b3261e}
.ctx{padding:3px 0;border-bottom:1px dotted #e3e6ea;display:flex;gap:10px}
.ctx .v{min-width:56px;text-align:right;color:#5b6570;font-family:ui-monospace,monospace;font-size:12px}
.cols{display:flex;gap:28px;flex-wrap:wrap}.cols>div{flex:1;min-width:260px}
.pos{color:#1b7a3a}.neg{color:#b3261e}.pill{display:inline-block;background:#eef2f7;border-radius:9px;
  padding:0 7px;margin:1px 2px;font-family:ui-monospace,monospace;font-size:12px;white-space:pre}
#q{width:340px;padding:5px 8px;font-size:14px;border:1px solid #c5cbd3;border-radius:4px}
.dead{color:#9aa3ad}.bar{fill:#3b7dd8}.bar:hover{fill:#1a5fb4}.axis{font-size:10px;fill:#5b6570}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _json_for_script(obj) -> str:
    """JSON safe inside <script>: no `</script>` or `<!--` can end the element early."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def show(text: str) -> str:
    """A token's text for display: whitespace made visible where it would vanish."""
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def highlight(texts: list[str], acts: list[float], scale: float, center: int | None = None) -> str:
    """Tokens as spans shaded by activation / scale, each with its activation as a tooltip."""
    out = []
    for i, (t, a) in enumerate(zip(texts, acts)):
        alpha = min(max(a / scale, 0.0), 1.0) if scale > 0 else 0.0
        style = f' style="background:rgba(255,130,0,{alpha:.2f})"' if alpha > 0.005 else ""
        cls = "tok max" if i == center else "tok"
        out.append(f'<span class="{cls}"{style} title="{a:.4g}">{html.escape(show(t))}</span>')
    return "".join(out)


def histogram_svg(edges: list[float], counts: list[int], width: int = 520, height: int = 150) -> str:
    """Bars of a log10-binned activation histogram (only the occupied range), as inline SVG."""
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return "<p class=meta>no activations</p>"
    lo, hi = max(nz[0] - 1, 0), min(nz[-1] + 2, len(counts))
    cs = counts[lo:hi]
    top = max(cs)
    pad_l, pad_r, pad_b = 36, 24, 22
    bw = (width - pad_l - pad_r) / len(cs)
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">']
    for i, c in enumerate(cs):
        h = (height - pad_b - 6) * c / top
        x = pad_l + i * bw
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{height - pad_b - h:.1f}" width="{max(bw - 1, 1):.1f}" '
                     f'height="{h:.1f}"><title>{10 ** edges[lo + i]:.3g}..{10 ** edges[lo + i + 1]:.3g}: {c}</title>'
                     "</rect>")
    step = max(1, round(len(cs) / 6))
    for i in range(0, len(cs) + 1, step):
        x = pad_l + i * bw
        parts.append(f'<text class="axis" x="{x:.1f}" y="{height - 6}" text-anchor="middle">'
                     f'{10 ** edges[lo + i]:.2g}</text>')
    parts.append(f'<text class="axis" x="2" y="12">{top}</text>'
                 f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#c5cbd3"/></svg>')
    return "".join(parts)


def _logit_table(pairs: list[list], cls: str) -> str:
    rows = "".join(f'<tr><td><span class="pill">{html.escape(show(t))}</span></td>'
                   f'<td class="num {cls}">{v:+.3f}</td></tr>' for t, v in pairs)
    return f"<table>{rows}</table>"


def feature_page(f: dict, texts, top: list[dict], samples: list[list[dict]], quantile_labels: list[str],
                 edges: list[float], counts: list[int], n_features: int, header: dict) -> str:
    """One feature's page. `texts(ids)` gives token texts; examples are collect.examples_of dicts."""
    i, max_act = f["index"], f["max_act"]

    def ctx(e):
        return (f'<div class="ctx"><span class="v">{e["value"]:.3g}</span><span class="toks">'
                f'{highlight(texts(e["tokens"]), e["acts"], max_act, e["center"])}</span></div>')

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
<div class="cols"><div><h2>Activation histogram</h2>{histogram_svg(edges, counts)}
<p class="meta">non-zero activations, log-spaced bins</p></div>
<div><h2>Logit effects</h2><div class="cols"><div><b class="pos">promoted</b>{_logit_table(f['promoted'], 'pos')}</div>
<div><b class="neg">suppressed</b>{_logit_table(f['suppressed'], 'neg')}</div></div>
<p class="meta">decoder direction through the final norm's gain and the unembedding</p></div></div>
<h2 id="top">Top activations</h2>
<div id="top-examples">{''.join(ctx(e) for e in top)}</div>
<h2 id="quantiles">Samples by activation quantile</h2>
<div id="samples">{quant or '<p class=meta>none</p>'}</div>"""
    return _page(f"Feature {i}", body)


INDEX_JS = r"""
const F = DATA.features, LIMIT = 1000;
let key = "density", dir = -1;
const q = document.getElementById("q"), hide = document.getElementById("hide-dead");
const tbody = document.querySelector("#features tbody"), status = document.getElementById("status");
function esc(s) { return s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function fmt(x) { return x === 0 ? "0" : x.toPrecision(3); }
function render() {
  const s = q.value.trim().toLowerCase();
  let rows = F.filter(f => (!hide.checked || f.density > 0) &&
    (!s || String(f.index) === s || f.tokens.toLowerCase().includes(s) || f.snippet.toLowerCase().includes(s)));
  rows.sort((a, b) => dir * ((a[key] > b[key]) - (a[key] < b[key])) || a.index - b.index);
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
  dir = th.dataset.key === key ? -dir : (th.dataset.key === "index" ? 1 : -1); key = th.dataset.key; render();
}));
q.addEventListener("input", render); hide.addEventListener("change", render);
const h = decodeURIComponent(location.hash.slice(1)); if (h) q.value = h;
render();
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
<script>const DATA = {_json_for_script({'features': rows})};</script>
<script>{INDEX_JS}</script>"""
    return _page("SAE features", body)


def search_page(result: dict, pages: set[int]) -> str:
    """result: from search.search_prompt."""
    def link(i):
        return f'<a href="{FEATURES_DIR}/{i}.html">{i}</a>' if i in pages else str(i)

    rows = "".join(
        f'<tr><td class="toks"><span class="pill">{html.escape(show(t["text"]))}</span></td><td>'
        + " ".join(f'{link(f["feature"])} <span class="meta">({f["act"]:.3g})</span>' for f in t["features"])
        + "</td></tr>" for t in result["tokens"])
    texts = [t["text"] for t in result["tokens"]]
    overall = "".join(
        f'<div class="ctx"><span class="v">{link(f["feature"])}</span><span class="toks">'
        f'{highlight(texts, f["acts"], max(f["max"], 1e-9))}</span>'
        f'<span class="meta">max {f["max"]:.3g}, sum {f["sum"]:.3g}</span></div>' for f in result["overall"])
    body = f"""<div class="nav"><a href="{INDEX_FILE}">&larr; all features</a></div>
<h1>Feature search</h1><p class="meta">SAE {html.escape(result['sae'])} &middot; hook {html.escape(result['hook'])}</p>
<p class="toks">{html.escape(result['prompt'])}</p>
<h2>Most active over the whole prompt</h2><div id="overall">{overall}</div>
<h2>Top features at each token</h2><table id="per-token">{rows}</table>"""
    return _page("Feature search", body)


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
    return _page("Cross-lingual features", body)


# The index's link to the audit report (pipeline.audit writes it after each run, as a path relative
# to the index) sits between these markers, so rewriting it is idempotent.
AUDIT_MARK = ("<!--audit-->", "<!--/audit-->")


def read_audit_link(index: Path) -> str:
    """The marked audit link of an existing index.html ("" if none)."""
    if not index.exists():
        return ""
    text = index.read_text(encoding="utf-8")
    a, b = text.find(AUDIT_MARK[0]), text.find(AUDIT_MARK[1])
    return text[a + len(AUDIT_MARK[0]):b] if 0 <= a < b else ""


def set_audit_link(index: Path, report: Path) -> bool:
    """Point index.html's marked audit link at report (relative path); False if it has no markers."""
    text = index.read_text(encoding="utf-8")
    a, b = text.find(AUDIT_MARK[0]), text.find(AUDIT_MARK[1])
    if not 0 <= a < b:
        return False
    href = os.path.relpath(Path(report).resolve(), index.resolve().parent).replace(os.sep, "/")
    link = f' &middot; <a id="audit-link" href="{html.escape(href)}">dictionary audit</a>'
    new = text[:a + len(AUDIT_MARK[0])] + link + text[b:]
    if new != text:
        write(index, new)
    return True


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def quantile_groups(samples: list[dict], n: int) -> tuple[list[str], list[list[dict]]]:
    """The uniform samples sorted by activation and cut into n groups by rank: group g holds the
    samples between quantiles g/n and (g+1)/n of the feature's non-zero activations."""
    s = sorted(samples, key=lambda e: -e["value"])
    groups, labels = [], []
    for g in range(n):
        lo, hi = math.floor(g * len(s) / n), math.floor((g + 1) * len(s) / n)
        part = s[lo:hi]
        groups.append(part)
        q_hi, q_lo = 100 - round(100 * g / n), 100 - round(100 * (g + 1) / n)
        rng = f"{part[-1]['value']:.3g} .. {part[0]['value']:.3g}" if part else "-"
        labels.append(f"quantile {q_lo}-{q_hi}% of non-zero activations (sampled: {rng})")
    return labels, groups
