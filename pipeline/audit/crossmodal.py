"""Cross-modal features (Scaling Monosemanticity, "zero-shot generalization to images"): a dictionary
trained on a language model's residual stream, read inside a vision-language model built on that
language model (SmolVLM-256M on SmolLM2-135M: hidden 576, 30 layers).

1. Text-only fit: FVU and CE loss recovered of the dictionary on the VLM's own text-only
   activations (pipeline.analysis.metrics.evaluate, the SAE spliced into the VLM's text model), beside the
   same figures on the language model it was trained on (the backbone was trained further in the VLM).
2. For each concept set with `images:`: every image (alone, after BOS) goes through the VLM's
   processor and model to the hook; a feature's per-image max and mean are taken over the image
   rows only (the positions holding image embeddings). Features are ranked on the positive against
   the negative images, and separately on the concept's positive against negative text prompts
   (pipeline.audit.search.rank_features), and each top feature is scored in the other modality.
   Features that separate both ways are ranked by the smaller of their two AUROCs.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from pipeline.analysis import release
from pipeline.analysis.config import InputConfig
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.metrics import evaluate
from pipeline.audit.concepts import ConceptSet
from pipeline.audit.common import auroc, effect_size
from pipeline.audit.search import prompt_summaries, rank_features
from pipeline.errors import ConfigError
from pipeline.models import ActivationCapture, LoadedModel, resolve_hook, text_config
from pipeline.vision import VisionContext, batch_inputs, encode_pair, image_token_id

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|resid_post)\.(\d+)$")
METRIC_KEYS = ("fvu", "explained_variance", "mse", "cosine_similarity", "l0", "dead_fraction", "ce_loss",
               "ce_loss_recovered", "kl_to_clean", "delta_loss", "n_tokens_evaluated", "n_tokens_reconstruction",
               "n_outlier_rows_excluded", "n_predictions", "rules")


def vlm_hook(sae_hook: str | None, override: str | None, loaded: LoadedModel) -> str:
    """The VLM module the dictionary reads: `override`, else the dictionary's block index in the
    VLM's text model (model.layers.15 -> model.text_model.layers.15)."""
    if override:
        return resolve_hook(loaded.model, override)
    m = _BLOCK.search(sae_hook or "")
    if not m:
        raise ConfigError(f"cannot map the dictionary's hook {sae_hook!r} to a layer of {loaded.model_id!r}. Fix: "
                          "set task.vlm_hook=..., e.g. task.vlm_hook=model.text_model.layers.15")
    return resolve_hook(loaded.model, f"layers.{m.group(1)}")


def attach(path: str, loaded: LoadedModel, hook_override: str | None = None) -> Dictionary:
    """The exported SAE at `path` on the VLM's text model, after checking widths."""
    sae = release.load(path, device=loaded.device)
    meta = getattr(sae, "meta", {}) or {}
    width = text_config(loaded.model.config).hidden_size
    if width != sae.cfg.d_model:
        trained = meta.get("model", {}).get("id") if isinstance(meta.get("model"), dict) else meta.get("model")
        raise ConfigError(
            f"the vision-language model {loaded.model_id!r} has a text model of hidden size {width}, but the dictionary "
            f"at {path!r} has d_model={sae.cfg.d_model} (trained on {trained or 'an unnamed model'}): its features "
            f"cannot read this residual stream. Fix: use a VLM whose language model is the one the dictionary was "
            f"trained on (SmolLM2-135M, hidden 576: task.vlm.name=HuggingFaceTB/SmolVLM-256M-Instruct; "
            f"SmolLM2-360M, hidden 960: SmolVLM-500M-Instruct), or a dictionary of width {width}")
    hook = vlm_hook(meta.get("hook"), hook_override, loaded)
    return Dictionary(sae.to(loaded.device), hook, hook, str(path))


def text_metrics(d: Dictionary, loaded: LoadedModel, inp: InputConfig) -> dict:
    m = evaluate(d, loaded, inp, progress=False)
    return {k: m[k] for k in METRIC_KEYS}


@torch.no_grad()
def image_summaries(d: Dictionary, loaded: LoadedModel, paths: list[str], splitting: bool
                    ) -> tuple[Tensor, Tensor, list[int]]:
    """Per image, every feature's max and mean over the image rows: ([n, F], [n, F]), and the
    number of image rows of each."""
    image_id = image_token_id(loaded)
    tok = loaded.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    capture = ActivationCapture(loaded, [d.hook])
    mx, mean, rows = [], [], []
    for p in paths:
        ids, pv, pm = encode_pair(loaded, p, "", splitting)
        ids_t, extra = batch_inputs([VisionContext(torch.tensor([bos] + ids).numpy(), pv, pm)])
        x = capture(ids_t, **extra)[d.hook][0]
        f = d.encode(x[ids_t[0].to(x.device) == image_id]).float().cpu()
        mx.append(f.amax(0))
        mean.append(f.mean(0))
        rows.append(f.shape[0])
    return torch.stack(mx), torch.stack(mean), rows


def _scores(pos_max: Tensor, neg_max: Tensor) -> tuple[Tensor, Tensor]:
    return auroc(pos_max, neg_max), effect_size(pos_max, neg_max)


def image_vs_text(d: Dictionary, loaded: LoadedModel, cs: ConceptSet, top: int, skip: int, splitting: bool) -> dict:
    ip_max, ip_mean, ip_rows = image_summaries(d, loaded, cs.images["positive"], splitting)
    in_max, in_mean, in_rows = image_summaries(d, loaded, cs.images["negative"], splitting)
    tp_max, tp_mean, _ = prompt_summaries(d, loaded, cs.positive, skip)
    tn_max, tn_mean, _ = prompt_summaries(d, loaded, cs.negative, skip)
    au_img, d_img = _scores(ip_max, in_max)
    au_txt, d_txt = _scores(tp_max, tn_max)

    def entry(f: int) -> dict:
        return {"feature": f, "image_auroc": float(au_img[f]), "text_auroc": float(au_txt[f]),
                "image_effect_size": float(d_img[f]), "text_effect_size": float(d_txt[f]),
                "image_pos_max": float(ip_max[:, f].max()), "image_neg_max": float(in_max[:, f].max()),
                "text_pos_max": float(tp_max[:, f].max()), "text_neg_max": float(tn_max[:, f].max())}

    by_image = [entry(r["feature"]) for r in rank_features(ip_max, in_max, ip_mean, in_mean, top)]
    by_text = [entry(r["feature"]) for r in rank_features(tp_max, tn_max, tp_mean, tn_mean, top)]
    fires_both = (ip_max.amax(0) > 0) & (tp_max.amax(0) > 0)
    both_score = torch.minimum(au_img, au_txt).masked_fill(~fires_both, -1.0)
    order = torch.argsort(both_score, descending=True, stable=True)[:top]
    both = [entry(int(f)) for f in order if both_score[f] >= 0]
    return {"name": cs.name, "description": cs.description, "path": cs.path, "images": cs.images,
            "image_rows": {"positive": ip_rows, "negative": in_rows},
            "n_prompts": {"positive": len(cs.positive), "negative": len(cs.negative)},
            "by_image": by_image, "by_text": by_text, "both": both}


def format_metrics(label: str, model_id: str, m: dict) -> str:
    return (f"{label} {model_id}: text-only FVU {m['fvu']:.4f}, CE loss recovered {m['ce_loss_recovered']:.4f} "
            f"on {m['n_tokens_reconstruction']} rows")


def format_concept(r: dict) -> str:
    def first(key):
        return r[key][0] if r[key] else None
    img, txt, both = first("by_image"), first("by_text"), first("both")
    parts = [f"{r['name']}:"]
    if img:
        parts.append(f"image feature {img['feature']} (image AUROC {img['image_auroc']:.3f}, text {img['text_auroc']:.3f})")
    if txt:
        parts.append(f"text feature {txt['feature']} (text AUROC {txt['text_auroc']:.3f}, image {txt['image_auroc']:.3f})")
    if both:
        parts.append(f"both: {both['feature']} (min AUROC {min(both['image_auroc'], both['text_auroc']):.3f})")
    return " ".join(parts)
