"""The autointerp section of audit.html: the judge (with the plumbing-check note next to the
scores when it is SmolLM2), mean scores, and per feature its explanation, scores and contexts."""

from __future__ import annotations

import html

from pipeline.analysis import html as H

COLUMNS = [("detection", "balanced_accuracy", "detection bal. acc."), ("detection", "auroc", "detection AUROC"),
           ("fuzzing", "balanced_accuracy", "fuzzing bal. acc."), ("fuzzing", "auroc", "fuzzing AUROC"),
           ("simulation", "score", "simulation r"), ("surprisal", "auroc", "surprisal AUROC"),
           ("embedding", "auroc", "embedding AUROC")]


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _contexts(items: list[dict], label: str) -> str:
    scale = max([max(c["acts"] or [0]) for c in items] + [1e-9])
    lines = "".join(f'<div class="ctx"><span class="v">{max(c["acts"] or [0]):.3g}</span><span class="toks">'
                    f'{H.highlight(c["tokens"], c["acts"], scale)}</span></div>' for c in items)
    return f"<details><summary>{html.escape(label)} ({len(items)})</summary>{lines or '<p>none</p>'}</details>"


def autointerp_section(sec: dict, link) -> str:
    """link(feature index) -> HTML (a link to the feature's dashboard page where there is one)."""
    j = sec["judge"]
    note = f'<p class="bad" id="plumbing-note"><b>Note:</b> {html.escape(sec["note"])}</p>' if sec.get("note") else ""
    summary = "".join(f'<tr><th>{html.escape(label)}</th><td class="num">'
                      f'{_num(sec["summary"][f"{s}.{k}"]["mean"])}</td><td class="num">{sec["summary"][f"{s}.{k}"]["n"]}'
                      f'</td></tr>' for s, k, label in COLUMNS)
    rows, blocks = [], []
    for r in sec["features"]:
        cells = "".join(f'<td class="num">{_num((r.get(s) or {}).get(k))}</td>' for s, k, _ in COLUMNS)
        rows.append(f'<tr data-feature="{r["feature"]}"><td>{link(r["feature"])}</td><td class="num">'
                    f'{r["density"]:.2e}</td><td>{html.escape(r["explanation"])}</td>{cells}</tr>')
        ex = r.get("examples", {})
        blocks.append(f'<h4 id="autointerp-{r["feature"]}">feature {link(r["feature"])}: '
                      f'{html.escape(r["explanation"])}</h4>'
                      + (f'<p class="weak">{html.escape(r["skipped"])}</p>' if r.get("skipped") else "")
                      + _contexts(ex.get("explain", []), "shown to the explainer (top, then quantile samples)")
                      + _contexts(ex.get("test", []), "held-out activating contexts")
                      + _contexts(ex.get("nonactivating", []), "non-activating contexts"))
    heads = "".join(f"<th>{html.escape(label)}</th>" for *_, label in COLUMNS)
    sim = (f'<p class="meta">simulation not scored: {html.escape(sec["simulation_unavailable"])}</p>'
           if sec.get("simulation_unavailable") else "")
    emb = sec.get("embedding_model") or "not run"
    req = sec["requests"]
    return f"""<h2 id="autointerp">Automated interpretability</h2>
<p class="meta">SAE {html.escape(sec['sae'])} &middot; hook {html.escape(sec['hook'])} &middot; judge
{html.escape(j['model'])} at {html.escape(j['base_url'])} &middot; {len(sec['features'])} features,
{html.escape(sec['selection'])}, density from {html.escape(sec['density_source'])} &middot; embedding model
{html.escape(emb)} &middot; {req['made']} requests made, {req['from_cache']} answered from the cache</p>
{note}
<p>Each feature is explained by the judge from top-activating and quantile-sampled contexts (active tokens marked
&lt;&lt;like this&gt;&gt;), then scored on contexts it never saw: <b>detection</b> (is the feature active in this
text?) and <b>fuzzing</b> (are the marked tokens the ones described?) by balanced accuracy and F1, AUROC of
P(yes) when the endpoint gives log-probabilities; <b>simulation</b>: Pearson r of the judge's expected 0-10
activation per token against the true ones; <b>surprisal</b>: AUROC of how much the explanation lowers the base
model's loss on activating against non-activating contexts; <b>embedding</b>: AUROC of the cosine between
explanation and context. 0.5 is chance for the balanced accuracies and AUROCs, 0 for simulation.</p>
{sim}
<table id="autointerp-summary"><thead><tr><th>score (mean over features)</th><th>value</th><th>features</th></tr>
</thead><tbody>{summary}</tbody></table>
<h3>Features</h3>
<table id="autointerp-features"><thead><tr><th>feature</th><th>density</th><th>explanation</th>{heads}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{''.join(blocks)}"""
