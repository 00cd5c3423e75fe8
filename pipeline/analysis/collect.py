"""Streaming per-feature statistics with memory bounded by the number of features (not tokens):
top-k activating contexts, a uniform sample of the non-zero activations (shown by quantile),
counts, sums and a log-spaced activation histogram; `collect` streams text into a collector.

Every update takes the non-zero latents of one batch as sparse entries (row, feature, value), so
its cost is proportional to the active latents, not to tokens x features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from pipeline.analysis.batches import context_batches, typical_rows
from pipeline.analysis.config import InputConfig
from pipeline.analysis.dictionary import Dictionary
from pipeline.models import ActivationCapture, LoadedModel

FEATURES_FILE = "features.json"
"""The interpretation stage's per-feature summary (density, max activation, examples): steering reads
max activations from it, the audit densities."""
FEATURES_FORMAT = "pipeline.features"
EXAMPLES_FILE = "examples.jsonl"
"""The interpretation stage's top-activating examples, one JSON line per live feature: {"index", "top":
[{"value", "center", "tokens" (display texts), "token_ids", "acts"}, ...] best first} (a window of
context_before + 1 + context_after tokens, cut at the context's edges). The publishing stage's
Neuronpedia export reads it."""
FEATURES_PER_PASS = 16384
"""Features collected per pass over the text by default (memory: see InterpretConfig.features_per_pass)."""
REPLAY_BYTES = 2 << 30
"""Sparse codes kept from the first reading for the later ones (SparseCodes): 20 bytes per non-zero
latent, so 100k tokens at L0 32 take 64 MB."""
Codes = tuple[Tensor, Tensor, Tensor, Tensor, int]  # ids [B, T], rows, features, values, scored positions
HIST_LO, HIST_HI, HIST_BINS = -3.0, 3.0, 60  # log10 activation bins: 1e-3 .. 1e3, 0.1 decade each


@dataclass
class Examples:
    """Per feature, up to n examples: the score that ranks them, the activation at the example's
    token, and a window of token ids (-1 outside the context) with the feature's activations."""

    score: Tensor   # [P, n] float32, -inf where empty
    value: Tensor   # [P, n] float32
    tokens: Tensor  # [P, n, W] int32
    acts: Tensor    # [P, n, W] float32

    @classmethod
    def empty(cls, p: int, n: int, w: int, device) -> "Examples":
        return cls(torch.full((p, n), float("-inf"), device=device), torch.zeros(p, n, device=device),
                   torch.full((p, n, w), -1, dtype=torch.int32, device=device), torch.zeros(p, n, w, device=device))


def segment_topk(groups: Tensor, scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Entries whose score is among the n largest of their group: (entry indices, rank in group)."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    g = groups[order]
    pos = torch.arange(len(g), device=g.device)
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    rank = pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    keep = rank < n
    return order[keep], rank[keep]


class FeatureCollector:
    """Statistics of features [lo, hi) over a stream of batches of contexts."""

    def __init__(self, lo: int, hi: int, top_k: int, n_samples: int, before: int, after: int,
                 device="cpu", seed: int = 0):
        self.lo, self.hi, self.before, self.after = lo, hi, before, after
        p, w = hi - lo, before + 1 + after
        self.top = Examples.empty(p, top_k, w, device)
        self.samples = Examples.empty(p, n_samples, w, device)
        self.count = torch.zeros(p, dtype=torch.int64, device=device)
        self.sum = torch.zeros(p, dtype=torch.float64, device=device)
        self.hist = torch.zeros(p, HIST_BINS, dtype=torch.int64, device=device)
        self.n_tokens = 0
        self.gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def update(self, ids: Tensor, rows: Tensor, feats: Tensor, vals: Tensor, n_valid: int) -> None:
        """ids [B, T] token ids; (rows, feats, vals) the non-zero latents, row = b * T + t, already
        restricted to the scored positions; n_valid the number of scored positions."""
        self.n_tokens += n_valid
        inside = (feats >= self.lo) & (feats < self.hi)
        rows, f, vals = rows[inside], feats[inside] - self.lo, vals[inside].float()
        if not len(f):
            return
        p = self.hi - self.lo
        self.count += torch.bincount(f, minlength=p)
        self.sum.index_add_(0, f, vals.double())
        b = ((vals.log10() - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS).floor().clamp(0, HIST_BINS - 1).long()
        self.hist.view(-1).index_add_(0, f * HIST_BINS + b, torch.ones_like(b))
        # sparse lookup table of this batch's activations for the context windows: key row * p + f
        lookup = torch.sort(rows * p + f)
        table = (lookup.values, vals[lookup.indices])
        self._merge(self.top, f, rows, vals, vals, ids, table)
        keys = torch.rand(len(f), generator=self.gen, device=vals.device)
        self._merge(self.samples, f, rows, keys, vals, ids, table)

    def _merge(self, ex: Examples, f: Tensor, rows: Tensor, scores: Tensor, vals: Tensor, ids: Tensor,
               table: tuple[Tensor, Tensor]) -> None:
        """Keep each feature's n best scores. Slots are unordered; with a feature's slots sorted
        ascending (o_1 <= ... <= o_n) and its candidates descending (c_1 >= c_2 >= ...), putting
        c_j into o_j's slot wherever c_j > o_j leaves exactly the n best of both, so only the
        replaced slots are written."""
        n = ex.score.shape[1]
        # only entries above their feature's current n-th best can enter: after the first batches
        # that is a small fraction, so the sort and the window gathers stay cheap
        enter = scores > ex.score.amin(1)[f]
        f, rows, scores, vals = f[enter], rows[enter], scores[enter], vals[enter]
        if not len(f):
            return
        keep, rank = segment_topk(f, scores, n)
        fk = f[keep]
        touched, inv = torch.unique(fk, return_inverse=True)
        cand = torch.full((len(touched), n), float("-inf"), device=scores.device)
        cand[inv, rank] = scores[keep]
        old, slot = ex.score[touched].sort(dim=1)
        i, j = (cand > old).nonzero(as_tuple=True)
        entry = torch.zeros((len(touched), n), dtype=torch.long, device=scores.device)
        entry[inv, rank] = torch.arange(len(keep), device=scores.device)
        e = entry[i, j]                       # which kept entry goes in
        fi, si = touched[i], slot[i, j]       # into which feature's which slot
        tok_e, act_e = self._windows(rows[keep][e], fk[e], ids, table)
        ex.tokens[fi, si] = tok_e
        ex.acts[fi, si] = act_e
        ex.value[fi, si] = vals[keep][e]
        ex.score[fi, si] = cand[i, j]

    def _windows(self, rows: Tensor, f: Tensor, ids: Tensor, table: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Token ids and feature-f activations from `before` tokens before to `after` after each row."""
        B, T = ids.shape
        b, t = rows // T, rows % T
        pos = t[:, None] + torch.arange(-self.before, self.after + 1, device=rows.device)
        ok = (pos >= 0) & (pos < T)
        pc = pos.clamp(0, T - 1)
        tok = torch.where(ok, ids[b[:, None], pc], -1).int()
        keys, values = table
        want = (b[:, None] * T + pc) * (self.hi - self.lo) + f[:, None]
        at = torch.searchsorted(keys, want).clamp(max=len(keys) - 1)
        act = torch.where(ok & (keys[at] == want), values[at], 0.0)
        return tok, act

    def summary(self) -> dict[str, Tensor]:
        n = max(self.n_tokens, 1)
        live = self.count > 0
        best = self.top.score.amax(1)
        return {"density": self.count.double() / n,
                "max_act": torch.where(live, best, torch.zeros_like(best)),
                "mean_act": torch.where(live, self.sum / self.count.clamp(min=1), torch.zeros_like(self.sum)),
                "count": self.count}


def examples_of(ex: Examples, i: int, before: int) -> list[dict]:
    """The non-empty examples of local feature i, best first: {value, tokens, acts, center}, where
    tokens[center] is the example's own token (windows are cut at the context's edges). The
    feature's tensors are read into Python once (element-wise reads cost ~1 ms per feature, most of
    a million-feature dashboard's time)."""
    score, order = ex.score[i].sort(descending=True)
    order = order[score > float("-inf")]
    tokens = ex.tokens[i, order]
    valid = tokens >= 0  # a window is cut only at the context's edges: its valid slots are contiguous
    leading = (~valid).long().cumprod(1).sum(1)
    start, end = leading.tolist(), (leading + valid.sum(1)).tolist()
    value, tokens = ex.value[i, order].tolist(), tokens.tolist()
    acts = ex.acts[i, order].double().round(decimals=4).tolist()
    return [{"value": value[j], "tokens": tokens[j][start[j]:end[j]], "acts": acts[j][start[j]:end[j]],
             "center": before - start[j]} for j in range(len(value))]


def hist_edges() -> list[float]:
    return torch.linspace(HIST_LO, HIST_HI, HIST_BINS + 1).tolist()


class TokenText:
    """Token id -> display text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i not in self.cache:
                self.cache[i] = self.tok.decode([i])
            out.append(self.cache[i])
        return out


def collect(d: Dictionary, loaded: LoadedModel, inp: InputConfig, c: FeatureCollector, desc: str = "interpret",
            batches=None, progress: bool = True) -> FeatureCollector:
    """One pass over inp's text (or `batches` of token ids) through model and dictionary, into the
    collector `c` (a new one, or one to continue)."""
    for codes in _progress(sparse_codes(d, loaded, inp, batches), inp, desc, progress):
        c.update(*codes)
    return c


def sparse_codes(d: Dictionary, loaded: LoadedModel, inp: InputConfig, batches=None) -> Iterator[Codes]:
    """Per batch of inp's text (or of `batches` of token ids): the token ids and the dictionary's
    non-zero latents at the scored positions, as FeatureCollector.update takes them."""
    capture = ActivationCapture(loaded, [d.hook])
    p = inp.exclude_positions_below
    if batches is None:
        batches = context_batches(inp.data, loaded.tokenizer, inp.context_size, inp.n_tokens, inp.batch_size)
    for ids in batches:
        ids = ids.to(loaded.device)
        x = capture(ids)[d.hook]
        B, T = ids.shape
        flat = x.reshape(B * T, -1)
        scored = typical_rows(flat, inp.exclude_norm_factor).view(B, T)
        scored[:, :p] = False
        rows, feats, vals = d.encode_sparse(flat)
        keep = scored.view(-1)[rows]
        yield ids, rows[keep], feats[keep], vals[keep], int(scored.sum())


class SparseCodes:
    """The batches' sparse codes (sparse_codes) as an iterable that may be read many times: the first
    complete reading keeps them (while they fit REPLAY_BYTES) and the later ones replay them, so model
    and encoder run once however many feature ranges are collected; beyond REPLAY_BYTES, or with
    keep=False, every reading streams the corpus again. `batches`, if given, must be re-iterable."""

    def __init__(self, d: Dictionary, loaded: LoadedModel, inp: InputConfig, batches=None, keep: bool = True):
        self.source, self.keep, self.kept = (d, loaded, inp, batches), keep, None
        self.n_features, self.inp = d.n_features, inp

    def __iter__(self) -> Iterator[Codes]:
        if self.kept is not None:
            yield from self.kept
            return
        kept, size = ([] if self.keep else None), 0
        for codes in sparse_codes(*self.source):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in codes[:4])
                if size > REPLAY_BYTES:
                    kept = None  # too many to keep: every reading streams the corpus
                else:
                    kept.append(codes)
            yield codes
        self.kept = kept


def feature_passes(codes: SparseCodes, per_pass: int, make: Callable[[int, int], FeatureCollector],
                   desc: str = "interpret", progress: bool = True) -> Iterator[FeatureCollector]:
    """One filled collector per range of per_pass features (make(lo, hi) builds it), in order, each
    dropped by the caller before the next (memory: one collector). Every pass reads `codes` (made
    with keep=True when there are several: a million features at 16,384 per pass would otherwise
    encode the corpus 62 times)."""
    n, n_pass = codes.n_features, -(-codes.n_features // per_pass)
    for k, lo in enumerate(range(0, n, per_pass)):
        c = make(lo, min(lo + per_pass, n))
        for batch in _progress(codes, codes.inp, f"{desc} {k + 1}/{n_pass}" if n_pass > 1 else desc, progress):
            c.update(*batch)
        yield c
        del c  # before the next one is made: one collector in memory at a time


def feature_density(codes: SparseCodes, progress: bool = True) -> Tensor:
    """Per feature, the fraction of the scored positions it fires on (FeatureCollector's density),
    for every feature in one reading of `codes` (float64 [n_features], on the codes' device)."""
    count, positions = None, 0
    for _, _, feats, _, n_valid in _progress(codes, codes.inp, "densities", progress):
        batch = torch.bincount(feats, minlength=codes.n_features)
        count, positions = (batch if count is None else count + batch), positions + n_valid
    return count.double() / max(positions, 1)


def _progress(batches: Iterable[Codes], inp: InputConfig, desc: str, progress: bool) -> Iterator[Codes]:
    with tqdm(total=inp.n_tokens, unit="tok", unit_scale=True, disable=not progress, desc=desc, mininterval=2) as bar:
        for codes in batches:
            yield codes
            bar.update(codes[0].numel())
