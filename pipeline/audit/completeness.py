"""Feature completeness (Scaling Monosemanticity, "Feature Completeness"): for lists of concrete
concepts (chemical elements, cities, animals), how often each occurs in the training corpus and
whether the dictionary has a feature dedicated to it, against frequency x number of alive features.

Frequency: hits of " <name> " (a space on each side, case as written in the list, overlapping
hits counted) in the first `max_documents` documents of the corpus (the text source the activation
store was cached from), divided by the number of tokens of those documents (the model's tokenizer).

Alive features: those that fire at least once on `alive_tokens` tokens of the same corpus (the
dashboard's rule: BOS and rows of massive norm left out); the same pass gives each feature's density.

Dedicated feature (our rule; the paper's exact test is unpublished): every name of every list is
put in its list's template sentences; a name's activation of a feature in a sentence is the
feature's largest activation over the name's tokens. Concept c has a dedicated feature f when
  1. f fires (> 0) on c's name in at least `min_fire_fraction` (0.5) of the templates,
  2. f is rare in text: it fires on at most `max_density` (0.001) of the corpus tokens, and
  3. f separates c's name from everything else in the sentences: the AUROC of f's activations on
     c's name (one per template) against its activations on every other name of every list (in
     their templates) and on every other token of all the sentences is at least `dedicated_auroc`
     (0.99: about one in a hundred of those reaches c's level), and
  4. f is c's own: its mean activation on c's name (over the templates) is at least `uniqueness`
     (2) times its mean on any other name of any list.
Without 2 and 3 almost every concept "has" a feature: among thousands of features, some sparse one
fires on any given name in most templates and on few of the hundred other names (AUROC ~0.95 against
a category alone).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from pipeline.audit.common import auroc
from pipeline.errors import ConfigError

LISTS_DIR = Path(__file__).resolve().parent / "concept_lists"


class ConceptListError(ConfigError):
    """A concept list file is missing, malformed or inconsistent."""


@dataclass
class ConceptList:
    name: str
    description: str
    templates: list[str]
    concepts: list[str]
    path: str


def shipped_lists() -> dict[str, Path]:
    return {p.stem: p for p in sorted(LISTS_DIR.glob("*.yaml"))}


def load_concept_list(path: str | Path) -> ConceptList:
    path = Path(path)
    if not path.is_file():
        raise ConceptListError(f"concept list {str(path)!r} does not exist. Fix: name a shipped list "
                               f"({sorted(shipped_lists())}) or an existing YAML file")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    fields = {"name", "description", "templates", "concepts"}
    if not isinstance(doc, dict) or fields - set(doc):
        missing = sorted(fields - set(doc)) if isinstance(doc, dict) else sorted(fields)
        raise ConceptListError(f"concept list {str(path)!r} is missing the field(s) {missing}. Fix: give name, "
                               "description, templates (sentences with {} for the name) and concepts (names)")
    if set(doc) - fields:
        raise ConceptListError(f"concept list {str(path)!r} has unknown field(s) {sorted(set(doc) - fields)}; "
                               f"allowed: {sorted(fields)}")
    for key in ("templates", "concepts"):
        v = doc[key]
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise ConceptListError(f"concept list {str(path)!r}: {key!r} must be a list of non-empty strings; got "
                                   f"{v!r}. Fix: quote YAML values such as no, true, 1")
    names = doc["concepts"]
    bad = [n for n in names if not re.fullmatch(r"[^\W\d_][\w'-]*", n)]
    if bad:
        raise ConceptListError(f"concept list {str(path)!r}: {bad[:5]} are not single words (the frequency counts "
                               "' <name> '). Fix: use single-word names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConceptListError(f"concept list {str(path)!r} repeats {dup}. Fix: list each concept once")
    if len(names) < 3:
        raise ConceptListError(f"concept list {str(path)!r} has {len(names)} concepts; the AUROC against the other "
                               "names needs at least 3. Fix: add concepts")
    bad = [t for t in doc["templates"] if t.count("{}") != 1 or t.startswith("{}")]
    if bad:
        raise ConceptListError(f"concept list {str(path)!r}: templates {bad} must hold exactly one {{}} and not "
                               "start with it (the name is read as a mid-sentence word). Fix: e.g. 'We saw the {}.'")
    return ConceptList(str(doc["name"]), str(doc["description"]), list(doc["templates"]), list(names), str(path))


def resolve_concept_lists(names: list[str]) -> list[ConceptList]:
    """Shipped list names or YAML paths; empty: every shipped list."""
    lib = shipped_lists()
    if not names:
        return [load_concept_list(p) for p in lib.values()]
    out = []
    for n in names:
        if n in lib:
            out.append(load_concept_list(lib[n]))
        elif n.endswith((".yaml", ".yml", ".json")) or "/" in n:
            out.append(load_concept_list(n))
        else:
            raise ConceptListError(f"task.categories=[{n!r}] is neither a shipped concept list ({sorted(lib)}) nor a "
                                   "YAML path. Fix: task.categories=[animals] or task.categories=[my/list.yaml]")
    return out


# --- frequency ---------------------------------------------------------------------------------

def count_hits(docs, names: list[str]) -> dict[str, int]:
    """Hits of ' <name> ' per name over the documents (overlapping: ' dog dog ' is two hits)."""
    counts = dict.fromkeys(names, 0)
    if not names:
        return counts
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pat = re.compile(rf"(?<= )(?:{alt})(?= )")
    for doc in docs:
        for m in pat.finditer(doc):
            counts[m.group(0)] += 1
    return counts


def corpus_frequencies(data, tokenizer, names: list[str], max_documents: int) -> dict:
    """Hits per name, documents and tokens counted, over the first max_documents documents of data."""
    from itertools import islice

    from pipeline.data import iter_documents
    docs = list(islice(iter_documents(data), max_documents))
    if not docs:
        raise ConfigError(f"corpus (source={data.source!r}, path={data.path}) yields no document to count concept "
                          "frequencies in. Fix: point corpus at the text the store was cached from")
    n_tokens = 0
    for lo in range(0, len(docs), 2000):
        n_tokens += sum(len(x) for x in tokenizer(docs[lo:lo + 2000], add_special_tokens=False).input_ids)
    return {"hits": count_hits(docs, names), "n_documents": len(docs), "n_tokens": n_tokens,
            "n_chars": sum(len(d) for d in docs)}


@torch.no_grad()
def feature_density(d, loaded, data, n_tokens: int, context_size: int = 128, batch_size: int = 8,
                    skip: int = 1, norm_factor: float | None = 8.0) -> tuple[Tensor, int]:
    """[F] fraction of n_tokens tokens of data on which each feature fires (the dashboard's rule:
    BOS and rows above norm_factor x the median norm left out), and the tokens scored."""
    from pipeline.analysis.batches import context_batches, typical_rows
    from pipeline.models import ActivationCapture
    capture = ActivationCapture(loaded, [d.hook])
    count = torch.zeros(d.n_features)
    scored = 0
    for ids in context_batches(data, loaded.tokenizer, context_size, n_tokens, batch_size):
        x = capture(ids)[d.hook][:, skip:].reshape(-1, d.d_model)
        x = x[typical_rows(x, norm_factor)]
        scored += x.shape[0]
        _, f, _ = d.encode_sparse(x)
        count += torch.bincount(f.cpu(), minlength=d.n_features).float()
    return count / max(scored, 1), scored


# --- dedicated features ------------------------------------------------------------------------

def name_spans(tokenizer, text: str, name: str) -> tuple[list[int], list[int]]:
    """Token ids of text and the positions of the tokens that overlap the name (its one occurrence)."""
    a = text.index(name)
    b = a + len(name)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pos = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < b and e > a]
    if not pos:
        raise ConfigError(f"the tokenizer gives no token for {name!r} in {text!r}")
    return list(enc.input_ids), pos


@torch.no_grad()
def template_activations(d, loaded, lists: list[ConceptList], batch_size: int = 32
                         ) -> tuple[list[Tensor], Tensor, Tensor]:
    """Every name of every list in each of its list's templates (BOS first, as in training).
    Returns, over the K features that fire on some name (the others cannot be any concept's
    feature, so memory does not grow with the dictionary): per list [concepts, templates, K], each
    feature's largest activation over the name's tokens; [M, K] its activation at every other
    token of those sentences (the context: BOS left out); and the K feature ids."""
    from pipeline.models import ActivationCapture
    tok = loaded.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items = []
    for cl in lists:
        for c in cl.concepts:
            for t in cl.templates:
                ids, pos = name_spans(tok, t.format(c), c)
                items.append(([bos, *ids], {p + 1 for p in pos}))
    capture = ActivationCapture(loaded, [d.hook])
    name_parts, ctx_parts, n_ctx = [], [], 0
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        T = max(len(i) for i, _ in chunk)
        # right padding: with causal attention the padded tail never changes the positions read
        x = capture(torch.tensor([i + [pad] * (T - len(i)) for i, _ in chunk]))[d.hook]
        at_name = [(b, p) for b, (_, pos) in enumerate(chunk) for p in sorted(pos)]
        at_ctx = [(b, p) for b, (i, pos) in enumerate(chunk) for p in range(1, len(i)) if p not in pos]
        for sel, parts, base in ((at_name, name_parts, None), (at_ctx, ctx_parts, n_ctx)):
            rows = torch.stack([x[b, p] for b, p in sel])
            r, f, v = d.encode_sparse(rows)
            r = r.cpu()
            owner = torch.tensor([lo + b for b, _ in sel])[r] if base is None else r + base
            parts.append((owner, f.cpu(), v.float().cpu().clamp_min(0)))
        n_ctx += len(at_ctx)
    owner, f, v = (torch.cat(z) for z in zip(*name_parts))
    ids, col = torch.unique(f, return_inverse=True)
    K = len(ids)
    names = torch.zeros(len(items) * K)
    # a name of several tokens keeps the largest activation over them
    names.scatter_reduce_(0, owner * K + col, v, "amax", include_self=True)
    names = names.view(len(items), K)
    r, f, v = (torch.cat(z) for z in zip(*ctx_parts))
    keep = torch.isin(f, ids)
    ctx = torch.zeros(n_ctx, K)
    ctx[r[keep], torch.searchsorted(ids, f[keep])] = v[keep]
    out, at = [], 0
    for cl in lists:
        n = len(cl.concepts) * len(cl.templates)
        out.append(names[at:at + n].view(len(cl.concepts), len(cl.templates), K))
        at += n
    return out, ctx, ids


def dedicated_features(acts: Tensor, others: Tensor | None = None, density: Tensor | None = None,
                       dedicated_auroc: float = 0.99, min_fire_fraction: float = 0.5, max_density: float = 1e-3,
                       other_means: Tensor | None = None, uniqueness: float = 2.0) -> list[dict]:
    """Per concept (first axis of acts [C, T, F]: the concepts' names in T templates): its best
    candidate feature and whether that feature is dedicated to it. Candidates fire on the name in
    at least min_fire_fraction of the templates and, if density [F] is given, on at most max_density
    of corpus tokens. The negatives of concept c are the other concepts' names (acts) and the rows of
    others [N, F] (other lists' names, the context tokens). Dedicated: the AUROC of c's name against
    the negatives is >= dedicated_auroc and the feature's mean activation on c's name (over the
    templates) is >= uniqueness x its largest mean on any other name (acts and other_means [N', F],
    the other lists' names). The best candidate is the dedicated one with the highest AUROC, else the
    candidate with the highest AUROC (ties: the highest mean activation)."""
    C, T, F = acts.shape
    fires = (acts > 0).float().mean(1)  # [C, F]
    means = acts.mean(1)  # [C, F]
    flat = acts.reshape(C * T, F)
    out = []
    for c in range(C):
        ok = fires[c] >= min_fire_fraction
        if density is not None:
            ok &= density <= max_density
        cand = ok.nonzero().flatten()
        if len(cand) == 0:
            out.append({"feature": None, "auroc": None, "fire_fraction": float(fires[c].max()) if F else 0.0,
                        "density": None, "mean_activation": None, "runner_up_mean": None, "found": False})
            continue
        neg = torch.cat([flat[:c * T], flat[(c + 1) * T:]])[:, cand]
        if others is not None:
            neg = torch.cat([neg, others[:, cand]])
        au = auroc(acts[c][:, cand], neg)
        mean = means[c, cand]
        rivals = torch.cat([means[:c], means[c + 1:]] + ([other_means] if other_means is not None else []))[:, cand]
        second = rivals.amax(0) if rivals.shape[0] else torch.zeros(len(cand))
        passes = (au >= dedicated_auroc) & (mean >= uniqueness * second)
        key = passes.double() * 1e13 + torch.round(au.double() * 1e6) * 1e6 + mean.double() / (mean.max() + 1e-12)
        best = int(torch.argmax(key))
        f = int(cand[best])
        out.append({"feature": f, "auroc": round(float(au[best]), 4), "fire_fraction": round(float(fires[c, f]), 4),
                    "density": None if density is None else float(density[f]),
                    "mean_activation": round(float(mean[best]), 4), "runner_up_mean": round(float(second[best]), 4),
                    "found": bool(passes[best])})
    return out


def binned(points: list[tuple[float, bool]], edges: list[float]) -> list[dict]:
    """P(found) per bin of log10(frequency x alive) (points with frequency 0 in their own first bin)."""
    bins = [{"lo": None, "hi": None, "n": 0, "found": 0}] + [
        {"lo": edges[i], "hi": edges[i + 1], "n": 0, "found": 0} for i in range(len(edges) - 1)]
    for x, found in points:
        if x == -math.inf:
            b = bins[0]
        else:
            i = max(0, min(len(edges) - 2, sum(x >= e for e in edges[1:-1])))
            b = bins[i + 1]
        b["n"] += 1
        b["found"] += int(found)
    for b in bins:
        b["p_found"] = b["found"] / b["n"] if b["n"] else None
    return bins


def completeness(d, loaded, lists: list[ConceptList], data, max_documents: int, alive_tokens: int,
                 dedicated_auroc: float, min_fire_fraction: float, max_density: float, uniqueness: float = 2.0,
                 context_size: int = 128) -> dict:
    """The completeness section of audit.json."""
    names = sorted({n for cl in lists for n in cl.concepts})
    freq = corpus_frequencies(data, loaded.tokenizer, names, max_documents)
    density, scored = feature_density(d, loaded, data, alive_tokens, context_size)
    n_alive = int((density > 0).sum())
    per_list, ctx, ids = template_activations(d, loaded, lists)
    dens = density[ids]
    categories, points = [], []
    for k, cl in enumerate(lists):
        acts = per_list[k]
        others = torch.cat([ctx] + [a.reshape(-1, a.shape[-1]) for j, a in enumerate(per_list) if j != k])
        other_means = torch.cat([ctx[:0]] + [a.mean(1) for j, a in enumerate(per_list) if j != k])
        rows = []
        for name, r in zip(cl.concepts, dedicated_features(acts, others, dens, dedicated_auroc, min_fire_fraction,
                                                           max_density, other_means, uniqueness)):
            if r["feature"] is not None:
                r["feature"] = int(ids[r["feature"]])
            f = freq["hits"][name] / max(freq["n_tokens"], 1)
            x = math.log10(f * n_alive) if f > 0 and n_alive > 0 else -math.inf
            rows.append({"concept": name, "hits": freq["hits"][name], "frequency": f,
                         "frequency_x_alive": f * n_alive, **r})
            points.append((x, r["found"]))
        found = sum(r["found"] for r in rows)
        categories.append({"name": cl.name, "description": cl.description, "path": cl.path,
                           "templates": cl.templates, "n_concepts": len(rows), "n_found": found, "concepts": rows})
        print(f"completeness {cl.name}: {found}/{len(rows)} concepts with a dedicated feature", flush=True)
    xs = [x for x, _ in points if x != -math.inf]
    lo, hi = (math.floor(min(xs)), math.ceil(max(xs))) if xs else (-3, 0)
    hi = max(hi, lo + 1)
    edges = [float(v) for v in range(lo, hi + 1)]
    return {"n_features": d.n_features, "n_alive": n_alive, "alive_tokens": scored,
            "corpus": {"n_documents": freq["n_documents"], "n_tokens": freq["n_tokens"], "n_chars": freq["n_chars"],
                       "max_documents": max_documents},
            "dedicated_auroc": dedicated_auroc, "min_fire_fraction": min_fire_fraction, "max_density": max_density,
            "uniqueness": uniqueness,
            "n_context_tokens": int(ctx.shape[0]), "n_concepts": len(points), "n_found": sum(f for _, f in points),
            "bins": binned(points, edges), "categories": categories}
