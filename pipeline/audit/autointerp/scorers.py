"""Explanations and their scores (Bills et al. 2023; EleutherAI's delphi), judge-agnostic.

A judge explains a feature from contexts with the activating tokens marked <<like this>>, then
answers about held-out contexts; the scorers turn its answers into numbers:

- detection: does the feature fire somewhere in this (unmarked) context? Held-out activating
  contexts are positives, non-activating ones negatives. Balanced accuracy, F1, precision,
  recall; AUROC of P(yes) / (P(yes) + P(no)) when the endpoint returns log-probabilities.
- fuzzing: are the marked tokens the ones the explanation describes? Activating contexts with
  their true activating tokens marked are positives; non-activating contexts with as many random
  tokens marked as the activating ones have on average (rounded up) are negatives. Same metrics.
- simulation: the judge predicts each token's activation on a 0-10 scale; the expected value
  under its log-probabilities over the digits (OpenAI's simulator: one echoed completion per
  context) is correlated (Pearson) with the true activations over all tokens of all contexts.
- surprisal (local): the base LM's mean loss on each context after the explanation, subtracted
  from its loss after a neutral prefix; AUROC of that reduction, activating against not.
- embedding (local): cosine of the explanation's embedding (as a query) and each context's (as a
  passage); AUROC activating against not.
The judge's answers replay exactly from the cache; the local scores are recomputed in each run and
are bit-reproducible for a given thread count (CPU kernels round differently with another one).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.audit.common import auroc

NEUTRAL_PREFIX = "Various unrelated sentences."


@dataclass
class Context:
    """A window of the corpus: token ids, their texts and the feature's activation at each."""

    ids: list[int]
    tokens: list[str]
    acts: list[float]
    kind: str = "activating"  # activating (top / sample), or nonactivating

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def active(self) -> list[bool]:
        return [a > 0 for a in self.acts]


def marked(tokens: list[str], marks: list[bool]) -> str:
    """The text with each run of marked tokens between << and >>."""
    out, inside = [], False
    for t, m in zip(tokens, marks):
        if m and not inside:
            out.append("<<")
        elif not m and inside:
            out.append(">>")
        inside = m
        out.append(t)
    return "".join(out) + (">>" if inside else "")


@dataclass
class Answer:
    """A yes/no answer: the decision (None: not parseable) and P(yes) / (P(yes) + P(no)) from the
    log-probabilities (None: not available)."""

    yes: bool | None
    p_yes: float | None = None


class Judge(Protocol):
    def explain(self, contexts: list[Context]) -> str: ...
    def detect(self, explanation: str, ctx: Context) -> Answer: ...
    def fuzz(self, explanation: str, ctx: Context, marks: list[bool]) -> Answer: ...
    def simulate(self, explanation: str, ctx: Context) -> list[float] | None: ...


# -- metrics --------------------------------------------------------------------------------------

def binary_auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(a positive scores above a negative) + ties / 2 (pipeline.audit.search.auroc); None without both."""
    if not pos or not neg:
        return None
    return float(auroc(torch.tensor(pos, dtype=torch.float64)[:, None], torch.tensor(neg, dtype=torch.float64)[:, None]))


def classification_metrics(labels: list[bool], answers: list[Answer]) -> dict:
    """Balanced accuracy, F1, precision, recall, accuracy; AUROC of P(yes) if every answer has one.
    An unparseable answer counts as "no" (n_unparsed says how many)."""
    pred = [bool(a.yes) for a in answers]
    tp = sum(p and y for p, y in zip(pred, labels))
    tn = sum(not p and not y for p, y in zip(pred, labels))
    fp = sum(p and not y for p, y in zip(pred, labels))
    fn = sum(not p and y for p, y in zip(pred, labels))
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    probs = [a.p_yes for a in answers]
    au = None
    if probs and all(p is not None for p in probs):
        au = binary_auroc([p for p, y in zip(probs, labels) if y], [p for p, y in zip(probs, labels) if not y])
    return {"balanced_accuracy": (recall + specificity) / 2, "f1": f1, "precision": precision, "recall": recall,
            "accuracy": (tp + tn) / len(labels) if labels else 0.0, "auroc": au, "n": len(labels),
            "n_positive": sum(labels), "n_unparsed": sum(a.yes is None for a in answers),
            "n_with_probability": sum(p is not None for p in probs)}


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant."""
    if len(x) < 2:
        return None
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else None


# -- judge-based scorers --------------------------------------------------------------------------

def detection(judge: Judge, explanation: str, activating: list[Context], nonactivating: list[Context]) -> dict:
    items = [(c, True) for c in activating] + [(c, False) for c in nonactivating]
    answers = [judge.detect(explanation, c) for c, _ in items]
    return classification_metrics([y for _, y in items], answers)


def fuzz_marks(activating: list[Context], nonactivating: list[Context], rng: random.Random) -> list[list[bool]]:
    """Per non-activating context, ceil(mean number of active tokens of the activating ones) random
    tokens marked (at least one)."""
    mean_active = sum(sum(c.active) for c in activating) / max(len(activating), 1)
    k = max(1, math.ceil(mean_active))
    out = []
    for c in nonactivating:
        at = set(rng.sample(range(len(c.tokens)), min(k, len(c.tokens))))
        out.append([i in at for i in range(len(c.tokens))])
    return out


def fuzzing(judge: Judge, explanation: str, activating: list[Context], nonactivating: list[Context],
            rng: random.Random) -> dict:
    items = [(c, c.active, True) for c in activating]
    items += [(c, m, False) for c, m in zip(nonactivating, fuzz_marks(activating, nonactivating, rng))]
    answers = [judge.fuzz(explanation, c, m) for c, m, _ in items]
    return classification_metrics([y for *_, y in items], answers)


def simulation(judge: Judge, explanation: str, activating: list[Context], nonactivating: list[Context]) -> dict:
    """Pearson r of the predicted against the true activations over all tokens of all contexts, and
    over the per-context maxima (OpenAI's ev_correlation_score and its max variant)."""
    pred, true, pmax, tmax = [], [], [], []
    for c in activating + nonactivating:
        p = judge.simulate(explanation, c)
        if p is None:
            return {"score": None, "reason": "the endpoint returned no prompt log-probabilities"}
        pred += p
        true += c.acts
        pmax.append(max(p))
        tmax.append(max(c.acts))
    r = pearson(pred, true)
    return {"score": r, "r_squared": None if r is None else r * r, "score_max": pearson(pmax, tmax),
            "n_tokens": len(true), "n_contexts": len(tmax)}


# -- local scorers --------------------------------------------------------------------------------

@torch.no_grad()
def context_loss(loaded, prefix: str, contexts: list[Context]) -> list[float]:
    """Mean next-token loss of the base LM on each context's tokens after BOS + prefix + newline."""
    tok = loaded.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    pre = ([bos] if bos is not None else []) + tok(prefix + "\n", add_special_tokens=False).input_ids
    out = []
    for c in contexts:
        ids = torch.tensor([pre + list(c.ids)], device=loaded.device)
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        nll = -logp.gather(1, tgt[:, None])[:, 0]
        out.append(float(nll[len(pre) - 1:].mean()))
    return out


def surprisal(loaded, explanation: str, activating: list[Context], nonactivating: list[Context]) -> dict:
    ctx = activating + nonactivating
    with_exp, neutral = context_loss(loaded, explanation, ctx), context_loss(loaded, NEUTRAL_PREFIX, ctx)
    gain = [n - e for n, e in zip(neutral, with_exp)]
    k = len(activating)
    return {"auroc": binary_auroc(gain[:k], gain[k:]), "mean_gain_activating": _mean(gain[:k]),
            "mean_gain_nonactivating": _mean(gain[k:]), "neutral_prefix": NEUTRAL_PREFIX,
            "loss_with_explanation": with_exp, "loss_neutral": neutral}


def embedding(embedder, explanation: str, activating: list[Context], nonactivating: list[Context]) -> dict:
    """embedder.query(str) -> [d] and embedder.passage(list[str]) -> [n, d], L2-normalised."""
    q = torch.as_tensor(embedder.query(explanation), dtype=torch.float64)
    texts = [c.text for c in activating + nonactivating]
    p = torch.as_tensor(embedder.passage(texts), dtype=torch.float64).reshape(len(texts), -1)
    sim = (p @ q).tolist()
    k = len(activating)
    return {"auroc": binary_auroc(sim[:k], sim[k:]), "mean_cosine_activating": _mean(sim[:k]),
            "mean_cosine_nonactivating": _mean(sim[k:])}


def _mean(x: list[float]) -> float | None:
    return sum(x) / len(x) if x else None


# -- the judge behind an OpenAI-compatible endpoint -----------------------------------------------

EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher studying one feature of a language model. You are shown text "
    "examples; in each, the tokens where the feature is active are marked between << and >>. Say in one "
    "short phrase what the marked tokens have in common: the words themselves, their meaning, or the "
    "context around them. Do not list the examples. Reply with one line: [EXPLANATION]: <phrase>")
DETECT_SYSTEM = (
    "You judge whether a feature of a language model is active on a text, given an explanation of the "
    "feature. Answer Yes if the text contains what the explanation describes, otherwise No. Answer with "
    "one word: Yes or No.")
FUZZ_SYSTEM = (
    "You judge whether an explanation of a language-model feature matches marked tokens. Some tokens of "
    "the text are marked between << and >>. Answer Yes if the marked tokens are what the explanation "
    "describes, otherwise No. Answer with one word: Yes or No.")
SIMULATE_HEAD = (
    "We are studying a feature of a language model. For each token of a text, the feature has an "
    "activation between 0 and 10: 0 where it is silent, 10 where it is most active. Most activations "
    "are 0.\n\nExplanation of the feature: {explanation}\n\nEach line below is a token, a tab, and "
    "the feature's activation on it.\n\n<start>\n")
DIGITS = {str(i): i for i in range(11)}


def parse_explanation(text: str) -> str:
    """The phrase after "[EXPLANATION]:" (else the first non-empty line), without quotes and << >>
    markers (a small judge copies them from the examples), at most 200 characters."""
    t = text.split("[EXPLANATION]:", 1)[1] if "[EXPLANATION]:" in text else text
    line = next((x.strip() for x in t.strip().splitlines() if x.strip()), "")
    return line.replace("<<", "").replace(">>", "").strip("\"'` ")[:200] or "(no explanation)"


def show_token(t: str) -> str:
    """A token's text on one simulator line (newlines and tabs made visible)."""
    return t.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


class EndpointJudge:
    """Explainer and judge behind an OpenAI-compatible endpoint (client.Endpoint): chat completions
    for explaining, detection and fuzzing; echoed completions with prompt log-probabilities for
    simulation. simulate() returns None once the endpoint has refused echo + logprobs."""

    def __init__(self, endpoint, explain_max_tokens: int = 48, temperature: float = 0.0, logprobs: bool = True,
                 top_logprobs: int = 10, seed: int = 0):
        self.endpoint, self.explain_max_tokens, self.temperature = endpoint, explain_max_tokens, temperature
        self.logprobs, self.top_logprobs, self.seed = logprobs, top_logprobs, seed
        self.simulation_error: str | None = None

    def _chat(self, system: str, user: str, max_tokens: int, logprobs: bool) -> dict:
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "max_tokens": max_tokens, "temperature": self.temperature, "seed": self.seed}
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        return self.endpoint("chat/completions", body)["choices"][0]

    def explain(self, contexts: list[Context]) -> str:
        user = "\n".join(f"Example {i}: {marked(c.tokens, c.active)}" for i, c in enumerate(contexts, 1))
        return parse_explanation(self._chat(EXPLAIN_SYSTEM, user, self.explain_max_tokens, False)["message"]["content"]
                                 or "")

    def _yes_no(self, system: str, user: str) -> Answer:
        choice = self._chat(system, user, 2, self.logprobs)
        words = (choice["message"]["content"] or "").strip().lower()
        yes = True if words.startswith("yes") else False if words.startswith("no") else None
        p = None
        content = ((choice.get("logprobs") or {}).get("content") or [])
        if content and content[0].get("top_logprobs"):
            py = sum(math.exp(t["logprob"]) for t in content[0]["top_logprobs"] if t["token"].strip().lower() == "yes")
            pn = sum(math.exp(t["logprob"]) for t in content[0]["top_logprobs"] if t["token"].strip().lower() == "no")
            p = py / (py + pn) if py + pn > 0 else 0.5
        return Answer(yes, p)

    def detect(self, explanation: str, ctx: Context) -> Answer:
        return self._yes_no(DETECT_SYSTEM, f"Explanation: {explanation}\n\nText: {ctx.text}\n\nIs the feature active "
                                           "on this text? Yes or No?")

    def fuzz(self, explanation: str, ctx: Context, marks: list[bool]) -> Answer:
        return self._yes_no(FUZZ_SYSTEM, f"Explanation: {explanation}\n\nText: {marked(ctx.tokens, marks)}\n\nAre "
                                         "the marked tokens what the explanation describes? Yes or No?")

    def simulate(self, explanation: str, ctx: Context) -> list[float] | None:
        from pipeline.audit.autointerp.client import EndpointRequestError
        if self.simulation_error or not self.logprobs:
            return None
        prompt, spots = SIMULATE_HEAD.format(explanation=explanation), []
        for t in ctx.tokens:
            prompt += show_token(t) + "\t"
            spots.append(len(prompt))
            prompt += "unknown\n"
        prompt += "<end>\n"
        try:
            lp = self.endpoint("completions", {"prompt": prompt, "max_tokens": 0, "echo": True,
                                               "logprobs": self.top_logprobs, "temperature": 0})["choices"][0]["logprobs"]
        except EndpointRequestError as e:
            self.simulation_error = str(e)
            return None
        if not lp or not lp.get("top_logprobs"):
            self.simulation_error = "no prompt log-probabilities in the answer"
            return None
        at = {o: i for i, o in enumerate(lp["text_offset"])}
        out = []
        for s in spots:
            i = at.get(s)
            top = lp["top_logprobs"][i] if i is not None else None
            out.append(expected_value(top) if top else 0.0)
        return out


def expected_value(top: dict[str, float]) -> float:
    """E[activation] under the judge's distribution over the numbers 0-10 among its top tokens
    (renormalised); 0 when none of them is a number."""
    w: dict[int, float] = {}
    for t, v in top.items():
        if t.strip() in DIGITS:
            w[DIGITS[t.strip()]] = w.get(DIGITS[t.strip()], 0.0) + math.exp(v)
    z = sum(w.values())
    return sum(k * p for k, p in w.items()) / z if z > 0 else 0.0
