"""HTML shared by the analysis stages' static pages (inline CSS and SVG, data as JSON, no server,
no network), and the dashboard folder's contract that other stages link into:

    <dashboard>/index.html          every feature; an audit link between AUDIT_MARK markers
    <dashboard>/features/<i>.html   one page per live feature (up to interpret's max_pages)
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

INDEX_FILE = "index.html"
FEATURES_DIR = "features"
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


def page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def json_for_script(obj) -> str:
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


AUDIT_FILE = "audit.json"
"""The audit stage's results in its out_dir, one section per task (the publishing stage's Neuronpedia
export reads the autointerp section's explanations)."""
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


def feature_links(dashboard: str | None, out_dir: Path) -> tuple[str | None, set[int]]:
    """(href prefix of the dashboard's feature pages relative to out_dir, features with a page)."""
    if not dashboard:
        return None, set()
    pages = Path(dashboard) / FEATURES_DIR
    if not pages.is_dir():
        return None, set()
    have = {int(p.stem) for p in pages.glob("*.html") if p.stem.isdigit()}
    rel = os.path.relpath(pages.resolve(), out_dir.resolve()).replace(os.sep, "/")
    return rel, have


def feature_link(i: int, links: tuple[str | None, set[int]]) -> str:
    """Feature i as a link to its dashboard page when it has one (links: feature_links(...)), else plain."""
    prefix, have = links
    if prefix is not None and i in have:
        return f'<a class="feature" href="{html.escape(prefix)}/{i}.html">{i}</a>'
    return str(i)
