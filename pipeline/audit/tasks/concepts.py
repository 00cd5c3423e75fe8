"""audit/task=concepts (the default): rank features by how well they separate each concept set's
prompts, check the top ones on held-out prompts and by steering (pipeline/audit/search.py)."""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.analysis import html as H
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.html import feature_link, feature_links
from pipeline.audit.common import TaskConfig, auroc_class
from pipeline.audit.concepts import resolve_concept_sets
from pipeline.audit.search import search_concept
from pipeline.errors import ConfigError

LABEL = "concept search"
ORDER = 10

NEUTRAL_PROMPTS = [
    "I would like to tell you about",
    "The next thing we talked about was",
    "Here is a short story about",
    "My favourite topic is",
]


@dataclass
class Config(TaskConfig):
    concepts: list[str] = field(default_factory=list)
    """Concept sets: names of sets shipped in pipeline/audit/concepts/ (water, deception, ...) or
    paths to YAML files of the same form. Empty: every shipped set."""
    top: int = 5
    """Features per concept set reported, checked on the held-out prompts and by steering."""
    clamp_multiple: float = 2.0
    """The steering check clamps each top feature to this multiple of its largest activation on
    the concept's positive prompts (error term kept, as in pipeline.steer). What a multiple adds
    depends on the dictionary's scale: read added_norm_ratio in the report and aim at ~0.1-0.2 of
    the residual norm. The topk demo dictionary (unit-norm decoder rows): 2x adds 14-20% (KL to the
    clean next token 0.04-0.12); 10x adds 70-100% and breaks the distribution (KL 1.3-4.3). A
    relu_l1 dictionary with small decoder rows needs more (an earlier relu_l1 demo: 20x for 10-20%)."""
    neutral_prompts: list[str] = field(default_factory=lambda: list(NEUTRAL_PROMPTS))
    """Prompts after which the steering check measures the change in log-probability of the
    concept words (each word with a leading space, all its tokens) and the next-token KL."""

    def __post_init__(self):
        if self.top < 1:
            raise ConfigError(f"task.top={self.top} must be at least 1 (features reported per concept set)")
        if self.clamp_multiple == 0:
            raise ConfigError("task.clamp_multiple=0 would clamp every feature to 0 (ablation, not steering toward "
                              "the concept). Fix: e.g. task.clamp_multiple=5")
        if not self.neutral_prompts:
            raise ConfigError("task.neutral_prompts is empty; the steering check needs at least one prompt. Fix: e.g. "
                              "task.neutral_prompts=[\"I would like to tell you about\"]")
        if any(not str(p).strip() for p in self.neutral_prompts):
            raise ConfigError(f"task.neutral_prompts={list(self.neutral_prompts)} holds an empty prompt; the "
                              "steering check reads the next token after each. Fix: remove it")


def run(cfg) -> dict:
    """The concepts section of audit.json (cfg: the AuditConfig; cfg.task: this module's Config)."""
    task: Config = cfg.task
    sets = resolve_concept_sets(list(task.concepts))  # validate every file before loading the model
    loaded, d = Dictionary.from_input(cfg.input)
    results = []
    for cs in sets:
        t = time.time()
        r = search_concept(d, loaded, cs, task.top, task.clamp_multiple, list(task.neutral_prompts),
                           cfg.input.exclude_positions_below)
        results.append(r)
        print(format_concept(r) + f"  ({time.time() - t:.1f}s)", flush=True)
    return {"sae": d.path, "hook": d.hook, "model": loaded.model_id, "n_features": d.n_features, "top": task.top,
            "clamp_multiple": task.clamp_multiple, "skip": cfg.input.exclude_positions_below,
            "neutral_prompts": list(task.neutral_prompts), "dashboard": cfg.dashboard, "concepts": results,
            "config": asdict(cfg)}


def format_concept(r: dict) -> str:
    if not r["features"]:
        return f"{r['name']}: no feature fires on a positive prompt"
    f = r["features"][0]
    s = f["steering"]
    return (f"{r['name']}: feature {f['feature']} AUROC {f['auroc']:.3f}, held-out {f['heldout_auroc']:.3f}, "
            f"d {f['effect_size']:.2f}; clamped to {s['clamp_value']:.3g}: d log P(words) {s['delta_logprob']:+.3f}, "
            f"KL {s['kl']:.3f}")


def summary(sec: dict) -> str:
    best = ", ".join(f"{c['name']} {_best_heldout(c)}" for c in sec["concepts"])
    return f"concepts: {len(sec['concepts'])} concept sets; best held-out AUROC in the top {sec['top']}: {best}"


# --- report -------------------------------------------------------------------------------------

def render(sec: dict, out_dir: Path) -> str:
    links = feature_links(sec.get("dashboard"), out_dir)
    rows = []
    for c in sec["concepts"]:
        f = c["features"][0] if c["features"] else None
        st = f["steering"] if f else {}
        rows.append(
            f'<tr data-concept="{html.escape(c["name"])}"><td><a href="#concept-{html.escape(c["name"])}">'
            f'{html.escape(c["name"])}</a></td><td>{feature_link(f["feature"], links) if f else "none fires"}</td>'
            + (f'<td class="num">{f["auroc"]:.3f}</td><td class="num {auroc_class(f["heldout_auroc"])}">'
               f'{f["heldout_auroc"]:.3f}</td><td class="num">{st["delta_logprob"]:+.3f}</td>'
               f'<td class="num">{st["kl"]:.3f}</td>' if f else '<td></td>' * 4)
            + f'<td class="num">{_best_heldout(c)}</td></tr>')
    table = (f'<table id="summary"><thead><tr><th>concept</th><th>top feature</th><th>AUROC</th>'
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
{table}"""]
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
            f'<td class="num">{f["auroc_mean"]:.3f}</td><td class="num heldout {auroc_class(f["heldout_auroc"])}">'
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
    return head + table + evidence_block(c)


def evidence_block(c: dict) -> str:
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
