"""audit/task=crossmodal: a dictionary trained on a language model, read inside a vision-language model
built on it: its text-only fit there, and its features on images of a concept against text about it
(pipeline/audit/crossmodal.py)."""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.analysis.config import InputConfig
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.html import feature_link, feature_links
from pipeline.audit.common import TaskConfig, auroc_class
from pipeline.audit.concepts import resolve_concept_sets
from pipeline.audit.crossmodal import attach, format_concept, format_metrics, image_vs_text, text_metrics
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig, load_model

LABEL = "cross-modal"
ORDER = 30


@dataclass
class Config(TaskConfig):
    concepts: list[str] = field(default_factory=list)
    """Concept sets (as for audit/task=concepts); those with an `images:` field are checked on images.
    Empty: every shipped set (none ships images)."""
    top: int = 5
    """Features per concept set and list (by image, by text, both) reported."""
    vlm: ModelConfig = field(default_factory=lambda: ModelConfig(name="HuggingFaceTB/SmolVLM-256M-Instruct"))
    """The vision-language model whose language model the dictionary was trained on (SmolVLM-256M:
    SmolLM2-135M's shape). Its text hidden size must equal the dictionary's d_model."""
    vlm_hook: str | None = None
    """The VLM module the dictionary reads; default: the checkpoint hook's block in the VLM's text
    model (model.layers.15 -> model.text_model.layers.15)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(split="test"))
    """Held-out text for the text-only FVU and CE loss recovered (on the VLM and on input.model)."""
    n_tokens: int = 16_384
    """Text-only evaluation positions (contexts x context_size)."""
    context_size: int = 128
    batch_size: int = 8
    image_splitting: bool = False
    """false: one tile per image (SmolVLM-256M: 64 image rows); true: the processor's tiling of large
    images."""
    baseline: bool = True
    """Also evaluate on input.model (the language model the dictionary was trained on) with the same
    text, for comparison."""

    def __post_init__(self):
        if self.top < 1:
            raise ConfigError(f"task.top={self.top} must be at least 1 (features reported per concept set)")

    def check(self, audit) -> None:
        skip = audit.input.exclude_positions_below
        if self.n_tokens < 1 or self.batch_size < 1 or not 0 <= skip < self.context_size:
            raise ConfigError(f"audit/task=crossmodal needs task.n_tokens={self.n_tokens} >= 1, task.batch_size="
                              f"{self.batch_size} >= 1 and input.exclude_positions_below={skip} < task.context_size="
                              f"{self.context_size}")


def text_input(cfg, model: ModelConfig) -> InputConfig:
    """The held-out text the cross-modal check measures both models on (the evaluation stage's rules)."""
    task: Config = cfg.task
    return replace(cfg.input, model=model, data=task.data, context_size=task.context_size, n_tokens=task.n_tokens,
                   batch_size=task.batch_size)


def run(cfg) -> dict:
    """The crossmodal section of audit.json (cfg: the AuditConfig; cfg.task: this module's Config)."""
    task: Config = cfg.task
    sets = resolve_concept_sets(list(task.concepts))  # validate every file (and image path) before loading
    with_images = [cs for cs in sets if cs.images]
    loaded = load_model(task.vlm)
    if not loaded.is_vision_language:
        raise ConfigError(f"task.vlm.name={task.vlm.name!r} is not a vision-language model "
                          f"({type(loaded.model).__name__}). Fix: e.g. "
                          "task.vlm.name=HuggingFaceTB/SmolVLM-256M-Instruct")
    d = attach(cfg.input.checkpoint, loaded, task.vlm_hook)
    t = time.time()
    section = {"sae": d.path, "vlm": loaded.model_id, "hook": d.hook, "n_features": d.n_features,
               "d_model": d.d_model, "top": task.top, "skip": cfg.input.exclude_positions_below,
               "image_splitting": task.image_splitting, "dashboard": cfg.dashboard, "config": asdict(cfg)}
    section["text_only"] = {"vlm": text_metrics(d, loaded, text_input(cfg, task.vlm))}
    print(format_metrics("VLM", loaded.model_id, section["text_only"]["vlm"]) + f"  ({time.time() - t:.1f}s)",
          flush=True)
    section["concepts"] = []
    for cs in with_images:
        r = image_vs_text(d, loaded, cs, task.top, cfg.input.exclude_positions_below, task.image_splitting)
        section["concepts"].append(r)
        print(format_concept(r), flush=True)
    if not with_images:
        print(f"no concept set among {[c.name for c in sets]} has images: (the `images:` field); only the "
              "text-only figures are reported", flush=True)
    if task.baseline:  # last: the VLM is no longer needed
        del loaded
        lm = load_model(cfg.input.model)
        base = Dictionary.load(cfg.input.checkpoint, lm, cfg.input.hook)
        section["text_only"]["model"] = text_metrics(base, lm, text_input(cfg, cfg.input.model))
        section["text_only"]["model_id"] = lm.model_id
        print(format_metrics("LM ", lm.model_id, section["text_only"]["model"]), flush=True)
    return section


def summary(sec: dict) -> str:
    t = sec["text_only"]
    lm = f", LM {t['model']['fvu']:.4f}" if "model" in t else ""
    return (f"crossmodal: text-only FVU VLM {t['vlm']['fvu']:.4f}{lm}; {len(sec['concepts'])} concept sets with "
            "images")


def render(sec: dict, out_dir: Path) -> str:
    links = feature_links(sec.get("dashboard"), out_dir)

    def link(i: int) -> str:
        return feature_link(i, links)

    t = sec["text_only"]
    cols = [("VLM " + sec["vlm"], t["vlm"])] + ([("LM " + t.get("model_id", ""), t["model"])] if "model" in t else [])
    metric_rows = "".join(
        f'<tr data-model="{html.escape(name)}"><td>{html.escape(name)}</td><td class="num fvu">{m["fvu"]:.4f}</td>'
        f'<td class="num">{m["explained_variance"]:.4f}</td><td class="num cer">{m["ce_loss_recovered"]:.4f}</td>'
        f'<td class="num">{m["ce_loss"]["clean"]:.4f}</td><td class="num">{m["ce_loss"]["spliced"]:.4f}</td>'
        f'<td class="num">{m["l0"]:.2f}</td><td class="num">{m["n_tokens_reconstruction"]}</td></tr>'
        for name, m in cols)
    parts = [f"""<h2 id="crossmodal">Cross-modal features</h2>
<p class="meta">SAE {html.escape(sec['sae'])} &middot; VLM {html.escape(sec['vlm'])} &middot; hook
{html.escape(sec['hook'])} &middot; {sec['n_features']} features, d_model {sec['d_model']}</p>
<p><b>Text-only fit</b>: the dictionary spliced into the VLM's text model on text alone (held-out text, positions
&ge; {sec['skip']}), beside the language model it was trained on. A large gap means the backbone moved while the VLM
was trained, and the image results below read a dictionary that fits the VLM poorly.</p>
<table id="crossmodal-text"><thead><tr><th>model</th><th>FVU</th><th>explained variance</th><th>CE loss recovered</th>
<th>CE clean</th><th>CE spliced</th><th>L0</th><th>rows</th></tr></thead><tbody>{metric_rows}</tbody></table>
<p>Per image, each feature's max over the image rows (positions holding image embeddings); per prompt, its max over
positions &ge; {sec['skip']}. <b>by image</b>: ranked on positive against negative images; <b>by text</b>: on the
concept's positive against negative prompts; <b>both</b>: features firing in both, ranked by the smaller AUROC.
A handful of images gives a coarse AUROC.</p>"""]
    if not sec["concepts"]:
        parts.append("<p class=weak>No concept set with images: (add an <code>images:</code> field).</p>")
    for c in sec["concepts"]:
        rows = c["image_rows"]
        parts.append(f'<h3 id="crossmodal-{html.escape(c["name"])}">{html.escape(c["name"])}</h3>'
                     f'<p>{html.escape(c["description"])}</p><p class="meta">{len(rows["positive"])} positive and '
                     f'{len(rows["negative"])} negative images ({sum(rows["positive"]) + sum(rows["negative"])} image '
                     f'rows), {c["n_prompts"]["positive"]} + {c["n_prompts"]["negative"]} prompts</p>')
        for key, label in (("by_image", "by image"), ("by_text", "by text"), ("both", "both")):
            body = "".join(
                f'<tr class="feature-row" data-list="{key}" data-feature="{f["feature"]}"><td>{link(f["feature"])}</td>'
                f'<td class="num {auroc_class(f["image_auroc"])}">{f["image_auroc"]:.3f}</td>'
                f'<td class="num {auroc_class(f["text_auroc"])}">{f["text_auroc"]:.3f}</td>'
                f'<td class="num">{f["image_effect_size"]:.2f}</td><td class="num">{f["text_effect_size"]:.2f}</td>'
                f'<td class="num">{f["image_pos_max"]:.3g}</td><td class="num">{f["text_pos_max"]:.3g}</td></tr>'
                for f in c[key]) or '<tr><td colspan="7">no feature</td></tr>'
            parts.append(f'<h4>{label}</h4><table class="features"><thead><tr><th>feature</th><th>image AUROC</th>'
                         f'<th>text AUROC</th><th>d (image)</th><th>d (text)</th><th>max on positive images</th>'
                         f'<th>max on positive prompts</th></tr></thead><tbody>{body}</tbody></table>')
    return "\n".join(parts)
