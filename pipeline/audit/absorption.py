"""Feature absorption on the first-letter task, as SAEBench defines it (evals/absorption, after
Chanin et al., arXiv 2409.14507). Weak below about 1B parameters and 16k latents (SAEBench's
README): the report says so next to the numbers.

1. Words: tokens of the vocabulary that are a space plus 2+ ASCII letters, a seeded sample of at
   most max_words, split 80/20 into train and test. Prompt: ten fixed in-context examples
   ("<word> has the first letter: W", one per line) then "<word> has the first letter:"; the
   residual stream at the hook is read at the word's token (computed on the prefix's key-value
   cache: the same numbers as the whole prompt).
2. Probe: per letter, a one-vs-rest logistic regression (scikit-learn, balanced classes) on the
   residual; p_L is its unit weight vector. Its F1 on the test words is reported.
3. Main latents: per letter, an L1 logistic regression on all latents (SAEBench's L1 decay 0.01
   on the mean loss, i.e. C = 1 / (0.01 n_train)) ranks latents by positive weight (ties: by the
   difference of mean activation on the letter's words and the others). For k = 1..max_k a
   balanced logistic regression on the top k latents is fitted; the main latents are the top k
   for the largest k reached while each step raises the test F1 by more than f1_jump (0.03).
4. On each test word of letter L that the probe gets right (score > 0): proj = x . p_L, and
   latent i contributes a_i (W_dec_i . p_L). SAEBench writes a_i cos(W_dec_i, p_L) for SAEs with
   unit decoder rows; ours need not have them, so activations are taken as a_i |W_dec_i| (the same
   SAE with unit decoder rows), which makes the two identical. Then, with main = the main latents'
   summed contribution and top3 = the summed contribution of the 3 largest positive contributions
   among the other latents with cos >= 0.1:
   - absorption fraction = 0 if main >= proj or top3 < 0.4 proj; 1 if main <= 0; otherwise
     a / (a + main) with a = min(top3, proj - main);
   - full absorption: every main latent is 0, the largest contributor has cos >= 0.025, proj >= 0
     and that contributor adds >= 0.4 proj.
5. Per letter: mean absorption fraction and full-absorption rate over its probe true positives.
   Overall: the means over letters whose probe F1 > 0.6 (flagged when fewer than 20 letters are).
"""

from __future__ import annotations

import inspect
import random
import string

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import ConfigError

LETTERS = string.ascii_lowercase
TEMPLATE = " has the first letter:"
N_ICL = 10
# SAEBench's constants (FeatureAbsorptionCalculator and AbsorptionEvalConfig)
ABSORBER_COS = 0.1
FULL_COS = 0.025
PROPORTION = 0.4
MAX_ABSORBERS = 3
EPS = 1e-8
CAVEAT = ("SAEBench's README: absorption on the first-letter task is not meaningful below about 1B parameters "
          "and 16k latents; on a smaller model or dictionary read these numbers as a plumbing check.")


def sklearn_logistic():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ConfigError("audit/task=absorption needs scikit-learn (>= 1.8). Fix: pip install scikit-learn") from None
    return LogisticRegression


def alpha_words(tokenizer) -> list[tuple[int, str]]:
    """(token id, word) of every vocabulary token that decodes to a space plus 2+ ASCII letters."""
    out = []
    for i in range(len(tokenizer)):
        t = tokenizer.decode([i])
        w = t[1:]
        if t[:1] == " " and len(w) >= 2 and w.isascii() and w.isalpha():
            out.append((i, w))
    return out


def absorption_scores(proj: Tensor, contrib: Tensor, acts: Tensor, cos: Tensor, main: list[int]
                      ) -> tuple[Tensor, Tensor]:
    """SAEBench's absorption fraction [N] and full absorption [N] (bool) of N words, from each
    word's probe projection proj [N], every latent's contribution to it contrib [N, F] (activation
    times decoder row . unit probe), the activations acts [N, F] and cos [F] (decoder rows' cosine
    with the probe)."""
    N, F = contrib.shape
    is_main = torch.zeros(F, dtype=torch.bool)
    is_main[main] = True
    main_proj = contrib[:, is_main].sum(1)
    absorbers = contrib.masked_fill(~(~is_main & (cos >= ABSORBER_COS))[None, :] | (contrib <= 0), 0.0)
    top3 = absorbers.topk(min(MAX_ABSORBERS, F), dim=1).values.clamp_min(0).sum(1)
    frac = torch.zeros(N)
    for n in range(N):
        p, m, t = float(proj[n]), float(main_proj[n]), float(top3[n])
        if m >= p or t < PROPORTION * p:  # (a negative proj lands here: top3 >= 0 > 0.4 proj only if m < p < 0)
            frac[n] = 0.0
        elif m <= 0:
            frac[n] = 1.0
        else:
            a = min(t, p - m)
            frac[n] = min(max(a / (a + m), 0.0), 1.0)
    top = contrib.argmax(1)
    main_silent = (acts[:, is_main].abs() < EPS).all(1) if main else torch.ones(N, dtype=torch.bool)
    full = (main_silent & (cos[top] >= FULL_COS) & (proj >= 0)
            & (contrib[torch.arange(N), top] >= PROPORTION * proj))
    return frac, full


def f1(pred: np.ndarray, true: np.ndarray) -> float:
    tp = float((pred & true).sum())
    return 0.0 if tp == 0 else 2 * tp / (float(pred.sum()) + float(true.sum()))


def main_latents(latents_train, y_train: np.ndarray, latents_test, y_test: np.ndarray, max_k: int,
                 f1_jump: float, l1_decay: float = 0.01) -> tuple[list[int], list[float]]:
    """One letter's main latents and the test F1 of the k-sparse probe for k = 1..max_k
    (latents: scipy sparse [n, F] matrices; y: bool)."""
    LogisticRegression = sklearn_logistic()
    n = latents_train.shape[0]
    l1 = LogisticRegression(l1_ratio=1.0, solver="liblinear", C=1.0 / (l1_decay * n), max_iter=1000)
    l1.fit(latents_train, y_train)
    w = l1.coef_[0]
    pos_mean = np.asarray(latents_train[y_train].mean(0)).ravel()
    neg_mean = np.asarray(latents_train[~y_train].mean(0)).ravel()
    order = np.lexsort((-(pos_mean - neg_mean), -np.maximum(w, 0)))[:max_k]
    scores, main = [], []
    for k in range(1, len(order) + 1):
        cols = order[:k]
        clf = LogisticRegression(class_weight="balanced", max_iter=1000)
        clf.fit(latents_train[:, cols].toarray(), y_train)
        scores.append(f1(clf.predict(latents_test[:, cols].toarray()).astype(bool), y_test))
        if k == 1 or scores[-1] - scores[-2] > f1_jump:
            if len(main) == k - 1:  # still growing
                main = [int(c) for c in cols]
    return main, scores


def prompt_prefix(tokenizer, icl: list[tuple[int, str]]) -> list[int]:
    """BOS and the in-context examples, one per line: the part every prompt shares."""
    prefix = "".join(f" {w}{TEMPLATE} {w[0].upper()}\n" for _, w in icl)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [bos, *tokenizer(prefix, add_special_tokens=False).input_ids]


class _Stop(Exception):
    """Raised by the hook: later layers are not needed."""


@torch.no_grad()
def word_activations(d, loaded, prefix: list[int], words: list[int], batch_size: int = 64) -> Tensor:
    """[N, d_model] residual at the hook at each word's token after the shared prefix. Causal
    attention: the template after the word never changes the word's residual, so only the word
    runs, on top of the prefix's key-value cache (the same numbers as the full prompt, ~80x less work)."""
    import copy

    from pipeline.models import resolve_hook
    model = loaded.model
    module = dict(model.named_modules())[resolve_hook(model, d.hook)]
    dev = loaded.device
    # transformers 5 renamed past_key_values to cache (argument and output); older versions have the first
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(model(input_ids=torch.tensor([prefix], device=dev), use_cache=True), kw)
    got = {}

    def hook(_m, _i, out):
        got["x"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    out = []
    handle = module.register_forward_hook(hook)
    try:
        for lo in range(0, len(words), batch_size):
            ids = torch.tensor(words[lo:lo + batch_size], device=dev)[:, None]
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(len(ids))
            try:
                model(input_ids=ids, use_cache=True, **{kw: c})
            except _Stop:
                pass
            out.append(got.pop("x")[:, -1].float().cpu())
    finally:
        handle.remove()
    return torch.cat(out)


def sparse_latents(d, x: Tensor, scale: Tensor, batch: int = 256):
    """scipy CSR [N, F] of latent activations times the decoder row norms `scale` [F]."""
    import scipy.sparse as sp
    rows, cols, vals = [], [], []
    for lo in range(0, len(x), batch):
        r, f, v = d.encode_sparse(x[lo:lo + batch].to(d.sae.W_enc.device))
        rows.append(r.cpu() + lo)
        cols.append(f.cpu())
        vals.append(v.float().cpu() * scale[f.cpu()])
    r, c, v = torch.cat(rows).numpy(), torch.cat(cols).numpy(), torch.cat(vals).numpy()
    return sp.csr_matrix((v, (r, c)), shape=(len(x), d.n_features), dtype=np.float32)


def absorption(d, loaded, max_words: int = 3000, max_k: int = 10, f1_jump: float = 0.03, seed: int = 0,
               batch_size: int = 64) -> dict:
    """The absorption section of audit.json for dictionary d on loaded's residual stream."""
    LogisticRegression = sklearn_logistic()
    vocab = alpha_words(loaded.tokenizer)
    if len(vocab) < 200:
        raise ConfigError(f"the tokenizer of {loaded.model_id!r} has only {len(vocab)} tokens that are a space plus "
                          "letters; the first-letter task needs a few hundred. Fix: use a model with a word-level "
                          "vocabulary")
    rng = random.Random(seed)
    rng.shuffle(vocab)
    icl, words = vocab[:N_ICL], vocab[N_ICL:N_ICL + max_words]
    prefix = prompt_prefix(loaded.tokenizer, icl)
    x = word_activations(d, loaded, prefix, [i for i, _ in words], batch_size)
    letter = np.array([LETTERS.index(w[0].lower()) for _, w in words])
    n_train = int(0.8 * len(words))
    tr, te = slice(0, n_train), slice(n_train, None)
    dec = d.decoder().float().cpu()
    norms = dec.norm(dim=1)
    lat = sparse_latents(d, x, norms)
    unit_dec = dec / norms[:, None].clamp_min(1e-12)
    xs = x / x.norm(dim=1).median()  # a scalar rescale for the solver; the probe direction is unchanged
    letters = []
    for L, ch in enumerate(LETTERS):
        y = letter == L
        if y[tr].sum() < 2 or y[te].sum() < 1:
            letters.append({"letter": ch, "n_train": int(y[tr].sum()), "n_test": int(y[te].sum()), "skipped": True})
            continue
        probe = LogisticRegression(class_weight="balanced", max_iter=2000).fit(xs[tr].numpy(), y[tr])
        score = probe.decision_function(xs[te].numpy())
        probe_f1 = f1(score > 0, y[te])
        p = torch.from_numpy(probe.coef_[0]).float()
        p = p / p.norm()
        main, k_f1 = main_latents(lat[tr], y[tr], lat[te], y[te], max_k, f1_jump)
        tp = np.nonzero(y[te] & (score > 0))[0] + n_train
        cos = unit_dec @ p
        acts = torch.from_numpy(lat[tp].toarray())
        contrib = acts * cos  # activations already carry |W_dec_i|: a_i |W_dec_i| cos_i = a_i W_dec_i . p
        frac, full = absorption_scores(x[tp] @ p, contrib, acts, cos, main)
        letters.append({"letter": ch, "n_train": int(y[tr].sum()), "n_test": int(y[te].sum()), "skipped": False,
                        "probe_f1": round(probe_f1, 4), "main_latents": main,
                        "main_cosines": [round(float(cos[i]), 4) for i in main],
                        "k_sparse_f1": [round(v, 4) for v in k_f1], "n_probe_true_positives": len(tp),
                        "mean_absorption_fraction": float(frac.mean()) if len(tp) else None,
                        "full_absorption_rate": float(full.float().mean()) if len(tp) else None,
                        "n_full_absorption": int(full.sum()),
                        "examples": [{"word": words[i][1], "absorption_fraction": round(float(f), 4),
                                      "full": bool(u)} for i, f, u in zip(tp.tolist(), frac, full) if f > 0][:8]})
    ok = [r for r in letters if not r["skipped"] and r["probe_f1"] > 0.6 and r["n_probe_true_positives"]]
    return {"n_words": len(words), "n_train": n_train, "n_test": len(words) - n_train,
            "icl_examples": [w for _, w in icl],
            "template": "<word>" + TEMPLATE, "word_position": len(prefix), "max_k": max_k, "f1_jump": f1_jump,
            "n_letters_scored": len(ok), "too_few_letters": len(ok) < 20,
            "mean_absorption_fraction": float(np.mean([r["mean_absorption_fraction"] for r in ok])) if ok else None,
            "mean_full_absorption_rate": float(np.mean([r["full_absorption_rate"] for r in ok])) if ok else None,
            "mean_num_main_latents": float(np.mean([len(r["main_latents"]) for r in ok])) if ok else None,
            "caveat": CAVEAT, "letters": letters}
