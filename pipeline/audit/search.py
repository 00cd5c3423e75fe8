"""Concept search: the features that separate a concept set's positive prompts from its negative
ones, checked on held-out prompts and by steering.

Per prompt, each feature is summarised by its max and its mean activation over positions >=
`skip` (position 0 is BOS). Features are ranked by the mean of two AUROCs (positives against
negatives), of the per-prompt max and of the per-prompt mean, ties broken by the effect size
(Cohen's d) of the max. Each top feature is
then scored on the held-out prompts (held-out AUROC) and clamped to a multiple of its largest
activation on the positives (pipeline.steer's clamp, SAE error term kept): the report gives the
change in log-probability of the concept words after neutral prompts and the KL divergence of the
next-token distribution from the clean one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.audit.common import auroc, effect_size
from pipeline.audit.concepts import ConceptSet, ConceptSetError
from pipeline.analysis.batches import token_texts
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.prompts import prompt_activations
from pipeline.models import LoadedModel, replace_output
from pipeline.analysis.prompts import prompt_ids
from pipeline.analysis.steering import clamp_fn


def prompt_summaries(d: Dictionary, loaded: LoadedModel, prompts: list[str], skip: int = 1
                     ) -> tuple[Tensor, Tensor, list[tuple[list[int], Tensor]]]:
    """Per prompt, every feature's max and mean activation over positions >= skip: ([n, F], [n, F]),
    plus each prompt's (token ids, activations [T, F]) for later display."""
    mx, mean, raw = [], [], []
    for text in prompts:
        ids, acts = prompt_activations(d, loaded, text)
        acts = acts.float().cpu()
        kept = acts[skip:]
        if kept.shape[0] == 0:
            raise ConceptSetError(f"prompt {text!r} has no tokens at positions >= {skip} "
                                  "(input.exclude_positions_below). Fix: use a longer prompt")
        mx.append(kept.amax(0))
        mean.append(kept.mean(0))
        raw.append((ids, acts))
    return torch.stack(mx), torch.stack(mean), raw


def rank_features(pos_max: Tensor, neg_max: Tensor, pos_mean: Tensor, neg_mean: Tensor, top: int) -> list[dict]:
    """The `top` features that best separate positives from negatives: highest mean of the AUROCs
    of the per-prompt max and of the per-prompt mean (a feature must separate by both, which a
    random feature rarely does by chance on a dozen prompts), ties broken by the effect size of
    the max. Only features that fire on some positive prompt are candidates (a feature silent on
    the concept says nothing about it)."""
    au_max, d_max = auroc(pos_max, neg_max), effect_size(pos_max, neg_max)
    au_mean, d_mean = auroc(pos_mean, neg_mean), effect_size(pos_mean, neg_mean)
    fires = pos_max.amax(0) > 0
    # lexicographic: the mean of the two AUROCs first (rounded so float noise cannot reorder equal
    # scores), then d of the max. Two stable sorts, least significant key first.
    score = (au_max.double() + au_mean.double()) / 2
    cand = fires.nonzero().flatten()
    by_d = cand[torch.argsort(d_max[cand].double(), descending=True, stable=True)]
    by_au = by_d[torch.argsort(torch.round(score[by_d] * 1e6), descending=True, stable=True)]
    order = by_au[:top].tolist()
    return [{"feature": int(i), "auroc": float(au_max[i]), "effect_size": float(d_max[i]),
             "auroc_mean": float(au_mean[i]), "effect_size_mean": float(d_mean[i]),
             "pos_max": float(pos_max[:, i].max()), "pos_mean_of_max": float(pos_max[:, i].mean()),
             "neg_mean_of_max": float(neg_max[:, i].mean())} for i in order]


def word_ids(loaded: LoadedModel, words: list[str], concept: str = "?") -> list[list[int]]:
    """Token ids of each concept word as it appears mid-sentence (a leading space)."""
    out = []
    for w in words:
        ids = loaded.tokenizer(" " + w.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise ConceptSetError(f"concept set {concept!r}: concept word {w!r} tokenizes to nothing. Fix: remove it")
        out.append(list(ids))
    return out


class SteeringCheck:
    """Log-probabilities of the concept words after each neutral prompt, clean and with one feature
    clamped. All (prompt, word) continuations run as one right-padded batch: causal attention means
    padding after a sequence never changes the positions that are read."""

    def __init__(self, loaded: LoadedModel, d: Dictionary, neutral_prompts: list[str], words: list[list[int]]):
        self.loaded, self.d, self.words = loaded, d, words
        self.prompts = [prompt_ids(loaded, p, chat=False)[0].tolist() for p in neutral_prompts]
        seqs = [p + w for p in self.prompts for w in words]
        width = max(map(len, seqs))
        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.batch = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=loaded.device)
        self.residual_norm = float("nan")
        self.clean = self._measure({})

    @torch.no_grad()
    def _measure(self, values: dict[int, float], add: Tensor | None = None) -> dict:
        model = self.loaded.model
        if values:
            with replace_output(model, self.d.hook, clamp_fn(self.d, values)):
                logits = model(input_ids=self.batch, use_cache=False).logits
        elif add is not None:
            with replace_output(model, self.d.hook, lambda x: x + add.to(x.dtype)):
                logits = model(input_ids=self.batch, use_cache=False).logits
        else:
            def record(x):  # the clean run also measures the typical norm at the hook (prompts, after BOS)
                rows = [x[pi * len(self.words), 1:len(p)] for pi, p in enumerate(self.prompts)]
                self.residual_norm = float(torch.cat(rows).float().norm(dim=-1).median())
                return x
            with replace_output(model, self.d.hook, record):
                logits = model(input_ids=self.batch, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1)
        nw = len(self.words)
        word_lp = torch.empty(len(self.prompts), nw)
        for pi, p in enumerate(self.prompts):
            for wi, w in enumerate(self.words):
                b = pi * nw + wi
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(w), device=logp.device)
                word_lp[pi, wi] = logp[b, pos, torch.tensor(w, device=logp.device)].sum().cpu()
        # the next-token distribution after each prompt (identical across that prompt's rows)
        nxt = torch.stack([logp[pi * nw, len(p) - 1] for pi, p in enumerate(self.prompts)]).cpu()
        return {"word": word_lp, "next": nxt}

    def _effect(self, s: dict) -> tuple[Tensor, Tensor]:
        """(change in log P(any concept word), KL(clean || steered)) per prompt."""
        c = self.clean
        kl = (c["next"].exp() * (c["next"] - s["next"])).sum(-1)
        return s["word"].logsumexp(1) - c["word"].logsumexp(1), kl

    def __call__(self, feature: int, value: float, control_seed: int = 0) -> dict:
        s, c = self._measure({feature: value}), self.clean
        concept_clean, concept_steered = c["word"].logsumexp(1), s["word"].logsumexp(1)  # log P(any word)
        kl = self._effect(s)[1]
        added = abs(value) * float(self.d.decoder()[feature].norm())
        # control: a random direction of the same added norm, added at every position
        g = torch.Generator().manual_seed(control_seed)
        r = torch.randn(self.d.d_model, generator=g)
        push = (added * r / r.norm()).to(self.batch.device)
        control_delta, control_kl = self._effect(self._measure({}, add=push))
        lift = (s["next"].exp().mean(0) + 1e-12).log() - (c["next"].exp().mean(0) + 1e-12).log()
        promoted = lift.topk(8).indices.tolist()
        return {"clamp_value": float(value),
                "added_norm": added,
                "added_norm_ratio": added / self.residual_norm,
                "concept_logprob_clean": float(concept_clean.mean()),
                "concept_logprob_steered": float(concept_steered.mean()),
                "delta_logprob": float((concept_steered - concept_clean).mean()),
                "delta_logprob_per_word": [float(x) for x in (s["word"] - c["word"]).mean(0)],
                "kl": float(kl.mean()),
                "control_delta_logprob": float(control_delta.mean()),
                "control_kl": float(control_kl.mean()),
                "promoted_tokens": token_texts(self.loaded.tokenizer, promoted)}


def search_concept(d: Dictionary, loaded: LoadedModel, cs: ConceptSet, top: int, clamp_multiple: float,
                   neutral_prompts: list[str], skip: int = 1) -> dict:
    """The audit of one concept set: ranked features, held-out AUROC, steering effect, evidence."""
    pos_max, pos_mean, _ = prompt_summaries(d, loaded, cs.positive, skip)
    neg_max, neg_mean, _ = prompt_summaries(d, loaded, cs.negative, skip)
    ranked = rank_features(pos_max, neg_max, pos_mean, neg_mean, top)
    hp_max, hp_mean, hp_raw = prompt_summaries(d, loaded, cs.heldout_positive, skip)
    hn_max, hn_mean, hn_raw = prompt_summaries(d, loaded, cs.heldout_negative, skip)
    feats = [r["feature"] for r in ranked]
    if feats:
        idx = torch.tensor(feats)
        h_au = auroc(hp_max[:, idx], hn_max[:, idx])
        h_au_mean = auroc(hp_mean[:, idx], hn_mean[:, idx])
        h_d = effect_size(hp_max[:, idx], hn_max[:, idx])
    words = word_ids(loaded, cs.concept_words, cs.name)
    check = SteeringCheck(loaded, d, neutral_prompts, words) if feats else None
    for j, r in enumerate(ranked):
        r["heldout_auroc"] = float(h_au[j])
        r["heldout_auroc_mean"] = float(h_au_mean[j])
        r["heldout_effect_size"] = float(h_d[j])
        r["steering"] = check(r["feature"], clamp_multiple * r["pos_max"])
    evidence = []
    for label, raw in (("positive", hp_raw), ("negative", hn_raw)):
        for text, (ids, acts) in zip(cs.heldout_positive if label == "positive" else cs.heldout_negative, raw):
            evidence.append({"label": label, "text": text, "tokens": token_texts(loaded.tokenizer, ids[skip:]),
                             "acts": {str(f): [round(float(a), 4) for a in acts[skip:, f]] for f in feats}})
    return {"name": cs.name, "description": cs.description, "languages": cs.languages, "path": cs.path,
            "n_prompts": {k: len(getattr(cs, k)) for k in ("positive", "negative", "heldout_positive",
                                                           "heldout_negative")},
            "concept_words": cs.concept_words,
            "clean_concept_logprob": check.clean["word"].logsumexp(1).mean().item() if check else None,
            "features": ranked, "heldout_evidence": evidence}
