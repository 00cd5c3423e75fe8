"""Features as computational intermediates (Scaling Monosemanticity): which features carry a prompt's
prediction of its next token.

The SAE is spliced in at its hook as reconstruction + error (x - x_hat, a constant), so the model's
output is its own, and every non-zero latent (feature, position) is a leaf of the graph:

    attribution = activation x d log p(target | prompt) / d activation     (last position's logits)

Features are ranked by their attribution summed over positions: zeroing a feature at every position
changes log p by -sum_t a_t g_t to first order, so the sum is the linear prediction of the ablation
that confirms it (a max over positions would ignore contributions that add up or cancel). Each kept
feature is then ablated at every position, beside random features of similar density ablated the same
way: a feature that matters should lower log p(target) more than they do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pipeline.analysis.batches import token_texts
from pipeline.analysis.collect import FEATURES_FILE, SparseCodes, feature_density
from pipeline.analysis.config import InputConfig
from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.prompts import prompt_activations
from pipeline.errors import ConfigError
from pipeline.models import LoadedModel, replace_output

POOL = 4
"""Random features are drawn from the POOL x n_random features nearest in log density."""


def target_token(loaded: LoadedModel, target: str) -> int:
    ids = loaded.tokenizer(target, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = token_texts(loaded.tokenizer, ids)
        hint = f"e.g. target={pieces[0]!r}, " if pieces else ""
        raise ConfigError(f"target={target!r} is {len(ids)} tokens {pieces} for the tokenizer of {loaded.model_id!r}; "
                          f"attribution needs exactly one. Fix: a single token, {hint}with its leading space where "
                          "the word follows one (quoted for Hydra: 'target=\" Paris\"')")
    return ids[0]


def _splice(d: Dictionary, skip: int, zero: Tensor | None = None, leaves: list | None = None):
    """Hook fn: positions >= skip become SAE(x) + (x - SAE(x)).detach(), with the features `zero`
    removed from the reconstruction only (the error term stays that of the full reconstruction)."""
    W, b = d.decoder(), d.sae.b_dec

    def fn(x: Tensor) -> Tensor:
        h = x[0, skip:].float()
        rows, feats, vals = d.encode_sparse(h)
        vals = vals.float().requires_grad_(leaves is not None)

        def recon(v):
            return b + torch.zeros_like(h).index_add(0, rows, v[:, None] * W[feats])
        full = recon(vals)
        kept = full if zero is None else recon(torch.where(torch.isin(feats, zero), 0.0, vals))
        if leaves is not None:
            leaves.extend([rows, feats, vals])
        return torch.cat([x[:, :skip], (kept + (h - full).detach())[None].to(x.dtype)], 1)
    return fn


def _log_prob(loaded: LoadedModel, ids: Tensor, target: int, hook: str | None = None, fn=None) -> Tensor:
    """log p(target | ids) at the last position, with `fn` replacing the output of `hook` if given."""
    if fn is None:
        return loaded.model(input_ids=ids, use_cache=False).logits[0, -1].float().log_softmax(-1)[target]
    with replace_output(loaded.model, hook, fn):
        return _log_prob(loaded, ids, target)


def attribute(d: Dictionary, loaded: LoadedModel, prompt: str, target: str, density: Tensor,
              n_attributed: int = 10, n_random: int = 10, skip: int = 1, seed: int = 0) -> dict:
    """The n_attributed features with the largest attribution to log p(target | prompt), each with its
    ablation drop and those of n_random features of similar `density` [n_features]; the first `skip`
    positions (BOS) are left as they are."""
    tid = target_token(loaded, target)
    ids, _ = prompt_activations(d, loaded, prompt)  # the tokens task=search shows, BOS first
    if len(ids) <= skip:
        raise ConfigError(f"prompt={prompt!r} has no token after the first {skip} positions. Fix: a longer prompt")
    ids = torch.tensor([ids], device=loaded.device)
    T = ids.shape[1] - skip
    with torch.no_grad():
        model_lp = float(_log_prob(loaded, ids, tid))
    leaves = []
    base = _log_prob(loaded, ids, tid, d.hook, _splice(d, skip, leaves=leaves))
    rows, feats, vals = leaves
    (grad,) = torch.autograd.grad(base, vals)  # only the latents' gradients: the model's weights are frozen
    base, vals = float(base.detach()), vals.detach()
    attr = vals * grad
    total = torch.zeros(d.n_features, device=vals.device).index_add_(0, feats, attr)
    active = torch.unique(feats)
    top = active[total[active].topk(min(n_attributed, len(active))).indices]

    def drop(f: int) -> float:
        with torch.no_grad():
            zero = torch.tensor([f], device=feats.device)
            return base - float(_log_prob(loaded, ids, tid, d.hook, _splice(d, skip, zero)))

    # random baseline: features nearest in log density, preferring those active on the prompt (an inactive
    # feature's ablation changes nothing, a baseline any feature beats); never one of the kept features
    logd = density.to(vals.device).float().clamp(min=1e-9).log10()
    on_prompt = torch.zeros(d.n_features, dtype=torch.bool, device=vals.device)
    on_prompt[active] = True
    gen = torch.Generator().manual_seed(seed)
    out = []
    for f in top.tolist():
        key = (logd - logd[f]).abs() + 100.0 * ~on_prompt
        key[top] = float("inf")
        pool = key.topk(min(POOL * n_random, d.n_features - len(top)), largest=False).indices.cpu()
        picks = pool[torch.randperm(len(pool), generator=gen)[:n_random]].tolist()
        rand = [drop(r) for r in picks]
        m = feats == f
        acts = torch.zeros(T, device=vals.device).index_put_((rows[m],), vals[m])
        per_pos = torch.zeros(T, device=vals.device).index_put_((rows[m],), attr[m])
        r = torch.tensor(rand)
        out.append({"feature": f, "attribution": float(total[f]), "activation": float(acts.max()),
                    "density": float(density[f]), "ablation_drop": drop(f),
                    "acts": [round(float(a), 4) for a in acts], "attributions": [round(float(a), 5) for a in per_pos],
                    "random": {"features": picks, "densities": [float(density[p]) for p in picks], "drops": rand,
                               "mean": float(r.mean()) if rand else 0.0,
                               "std": float(r.std(correction=0)) if rand else 0.0}})
        out[-1]["beats_random"] = out[-1]["ablation_drop"] > max(rand, default=float("-inf"))
    rand_drops = [x for f in out for x in f["random"]["drops"]]
    mean_top = sum(f["ablation_drop"] for f in out) / max(len(out), 1)
    mean_rand = sum(rand_drops) / max(len(rand_drops), 1)
    return {"sae": d.path, "hook": d.hook, "prompt": prompt, "target": target, "target_id": tid,
            "tokens": token_texts(loaded.tokenizer, ids[0, skip:].tolist()), "model_logprob": model_lp,
            "base_logprob": base, "ranking": "attribution summed over positions", "features": out,
            "summary": {"mean_drop": mean_top, "mean_random_drop": mean_rand,
                        "beats_random": sum(f["beats_random"] for f in out), "n_features": len(out),
                        "confirmed": mean_top > mean_rand}}


def densities(d: Dictionary, loaded: LoadedModel, inp: InputConfig, features: str | None, out_dir: str,
              progress: bool = True) -> tuple[Tensor, str]:
    """Per-feature density (fraction of corpus tokens it fires on) and where it came from: the given
    features.json, else out_dir's if it describes this SAE, else one pass over the corpus sample `inp`
    (the prompt's own few tokens say little about how often a feature fires)."""
    path = Path(features or Path(out_dir) / FEATURES_FILE)
    if path.exists():
        doc = json.loads(path.read_text(encoding="utf-8"))
        if (doc.get("n_features") == d.n_features and doc.get("hook") == d.hook
                and Path(str(doc.get("sae"))).resolve() == Path(d.path).resolve()):
            return torch.tensor([f["density"] for f in doc["features"]]), str(path)
    if features:
        raise ConfigError(f"features={features!r} is missing or describes another SAE (its n_features, hook and sae "
                          f"must be {d.n_features}, {d.hook!r}, {d.path!r}). Fix: the dashboard's features.json of "
                          "this SAE, or features=null to measure densities on the corpus sample")
    density = feature_density(SparseCodes(d, loaded, inp, keep=False), progress).float().cpu()
    return density, f"corpus sample ({inp.data.source}, {inp.n_tokens} positions)"
