"""Structure of the dictionary (audit tasks neighbours, completeness, absorption) and the link from
the dashboard to the audit report: constructed dictionaries with known answers, a planted concept
feature in a tiny random Llama, SAEBench's absorption arithmetic on constructed latents, and the
command line writing audit.json, neighbours.json and audit.html."""

from __future__ import annotations

import json
from dataclasses import replace
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml

from pipeline.analysis import Dictionary, InputConfig
from pipeline.audit import AuditConfig, run
from pipeline.audit.absorption import absorption_scores, main_latents
from pipeline.audit.completeness import (ConceptListError, count_hits, corpus_frequencies, dedicated_features,
                                         load_concept_list, resolve_concept_lists, shipped_lists, template_activations)
from pipeline.audit.neighbours import nearest_neighbours, neighbourhoods
from pipeline.audit.tasks import TASKS
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.interpret import InterpretConfig
from pipeline.analysis import html as H
from pipeline.interpret import run as interpret
from pipeline.models import ActivationCapture, ModelConfig
from pipeline.sae import SAEConfig, create, save

ROOT = Path(__file__).resolve().parent.parent
HOOK = "model.layers.1"
PLANTED = 5
GENERIC = 9
ANIMALS = ["zebra", "horse", "camel", "donkey", "goat", "sheep", "tiger", "lion", "rabbit", "moose"]
TEMPLATES = ["The {} walked slowly across the plain.", "We saw a {} near the fence.",
             "My sister drew a {} in her notebook.", "Every morning the {} eats fresh grass."]


def pairs(n_pairs: int = 32, d: int = 48, noise: float = 0.05, seed: int = 0):
    """Decoder rows made of near-duplicate pairs (random directions, each twice with a little noise,
    different norms), shuffled; and each row's pair."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_pairs, d, generator=g)
    scale = base.norm(dim=1).repeat_interleave(2)[:, None] / d ** 0.5
    rows = base.repeat_interleave(2, 0) + noise * torch.randn(2 * n_pairs, d, generator=g) * scale
    rows = rows * torch.rand(2 * n_pairs, 1, generator=g).add(0.5)
    perm = torch.randperm(2 * n_pairs, generator=g)
    inv = torch.argsort(perm)
    partner = torch.arange(2 * n_pairs) ^ 1  # 0<->1, 2<->3, ... before shuffling
    return rows[perm], inv[partner[perm]]


# --- neighbours --------------------------------------------------------------------------------

def test_first_neighbour_is_the_near_duplicate_and_blocks_agree():
    rows, partner = pairs()
    idx, cos = nearest_neighbours(rows, 5)
    assert torch.equal(idx[:, 0], partner)
    assert (cos[:, 0] > 0.95).all() and (cos[:, 1] < 0.7).all()
    assert not (idx == torch.arange(len(rows))[:, None]).any()  # never its own neighbour
    assert (cos[:, :-1] >= cos[:, 1:]).all()  # best first
    i3, c3 = nearest_neighbours(rows, 5, block=3)  # blocked (memory bound) = one block
    assert torch.equal(i3, idx)
    torch.testing.assert_close(c3, cos)
    summary, data = neighbourhoods(rows, n=3, method="pca")
    assert len(data["map"]) == len(rows) and all(len(p) == 2 for p in data["map"])
    assert [r[0] for r in data["neighbours"]] == partner.tolist()
    assert summary["map_method"] == "pca" and sum(summary["first_cosine_histogram"]["counts"]) == len(rows)
    # the near-duplicate pairs are the top pairs, each once
    assert {frozenset((p["a"], p["b"])) for p in summary["top_pairs"]} == \
        {frozenset((i, int(partner[i]))) for i in range(len(rows))}
    # PCA of pairs: a feature lands nearer its pair than the typical distance between features
    xy = torch.tensor(data["map"])
    d_pair = (xy - xy[partner]).norm(dim=1).median()
    assert d_pair < 0.2 * torch.cdist(xy, xy).median()


def test_neighbours_bad_input():
    rows, _ = pairs(n_pairs=4)
    with pytest.raises(ConfigError, match=r"task.n_neighbours=8 must be in \[1, 7\].*Fix: task.n_neighbours=7"):
        nearest_neighbours(rows, 8)
    with pytest.raises(ConfigError, match="task.map_method='tsne' is not one of"):
        TASKS["neighbours"].Config(map_method="tsne")
    with pytest.raises(ConfigError, match="task.n_neighbours=0"):
        TASKS["neighbours"].Config(n_neighbours=0)


# --- completeness ------------------------------------------------------------------------------

def test_frequency_counts_space_delimited_hits(tmp_path):
    text = "a dog and a dog dog ran with the dog. hotdog dogs Dog dog "
    # ' dog ' at 1, 11 and 15 (overlapping), not 'dog.', 'hotdog', 'dogs' or 'Dog'; then the last one
    assert count_hits([text], ["dog", "cat", "Dog"]) == {"dog": 4, "cat": 0, "Dog": 1}
    assert count_hits(["x Lyon y Lyons z "], ["Lyon", "Lyons"]) == {"Lyon": 1, "Lyons": 1}
    docs = tmp_path / "c.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["one zebra and a zebra here", "a zebra walked by", "zebra zebra zebra zebra go"]))
    data = DataConfig(source="files", path=[str(docs)], split="all", shuffle_seed=None)
    from transformers import AutoTokenizer
    from pipeline.models import embedded_model_dir
    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    f = corpus_frequencies(data, tok, ["zebra"], max_documents=2)
    assert f["hits"] == {"zebra": 3} and f["n_documents"] == 2  # the third document is past the bound
    assert f["n_tokens"] == sum(len(tok(t, add_special_tokens=False).input_ids)
                                for t in ["one zebra and a zebra here", "a zebra walked by"])
    # the third document adds 3: its first 'zebra' has no space before it
    assert corpus_frequencies(data, tok, ["zebra"], max_documents=10)["hits"] == {"zebra": 6}


def test_dedicated_feature_rule_on_constructed_activations():
    C, T, F = 6, 4, 6
    acts = torch.zeros(C, T, F)
    acts[0, :, 2] = torch.tensor([3.0, 2.0, 4.0, 1.0])  # only on concept 0: dedicated
    acts[:, :, 3] = 1.0                                  # on every name alike: AUROC 0.5
    acts[1, 0, 4] = 5.0                                  # concept 1, one template of four: fires too rarely
    acts[2, :3, 1] = 2.0                                 # concept 2 (3 of 4 templates), but also ...
    acts[[3, 5], :, 1] = 3.0                             # ... higher on concepts 3 and 5: AUROC below 0.99
    acts[4, :, 5] = 2.0                                  # only concept 4's name among the names, but ...
    others = torch.zeros(50, F)
    others[:9, 5] = 2.5                                  # ... above it on 9 of 50 context tokens
    r = dedicated_features(acts, others, dedicated_auroc=0.99, min_fire_fraction=0.5)
    assert r[0]["found"] and r[0]["feature"] == 2 and r[0]["auroc"] == 1.0 and r[0]["fire_fraction"] == 1.0
    assert [x["found"] for x in r] == [True, False, False, False, False, False]
    # the generic feature: tied with the 20 other names, above the 50 context tokens
    assert r[1]["feature"] == 3 and r[1]["auroc"] == pytest.approx((50 + 20 / 2) / 70, abs=1e-4)
    assert r[2]["auroc"] < 0.99
    assert r[4]["feature"] == 5 and r[4]["auroc"] == pytest.approx(61 / 70, abs=1e-4)  # 20 names, 41 tokens below
    # without the context tokens feature 5 would look dedicated to concept 4
    assert dedicated_features(acts, None)[4]["found"]
    # a feature that fires on much of the corpus is no candidate
    dense = torch.full((F,), 1e-4)
    dense[2] = 0.01
    r = dedicated_features(acts, others, dense, max_density=1e-3)
    assert not r[0]["found"] and r[0]["feature"] != 2
    assert dedicated_features(acts, others, dense, max_density=0.02)[0]["found"]
    assert not dedicated_features(acts, others, min_fire_fraction=1.0)[2]["found"]
    # uniqueness: as strong on another list's name (mean 1.5 > 2.0 / 2) is not dedicated, whatever the AUROC
    one = torch.zeros(3, 2, 1)
    one[0, :, 0] = 2.0
    context = torch.zeros(1000, 1)
    assert dedicated_features(one, context)[0]["found"]
    rival = torch.tensor([[1.5]])
    r = dedicated_features(one, torch.cat([context, rival, rival]), other_means=rival)
    assert r[0]["auroc"] == 1.0 and r[0]["runner_up_mean"] == 1.5 and not r[0]["found"]
    assert dedicated_features(one, torch.cat([context, rival, rival]), other_means=rival, uniqueness=1.2)[0]["found"]


def test_shipped_concept_lists_and_bad_lists(tmp_path):
    lists = resolve_concept_lists([])
    assert {c.name for c in lists} == {"elements", "cities", "animals"} == set(shipped_lists())
    for c in lists:
        assert len(c.concepts) >= 100 and len(c.templates) >= 5, c.name
    assert "concept_lists/*.yaml" in (ROOT / "setup.cfg").read_text()  # shipped in the wheel
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "description": "x", "concepts": ["a", "b", "c"]}))
    with pytest.raises(ConceptListError, match=r"missing the field\(s\) \['templates'\].*Fix"):
        load_concept_list(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "description": "x", "templates": ["A {}."],
                                   "concepts": ["New York", "Paris", "Rome"]}))
    with pytest.raises(ConceptListError, match=r"\['New York'\] are not single words"):
        load_concept_list(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "description": "x", "templates": ["{} is big."],
                                   "concepts": ["Oslo", "Paris", "Rome"]}))
    with pytest.raises(ConceptListError, match="not start with it"):
        load_concept_list(bad)
    with pytest.raises(ConceptListError,
                       match=r"task.categories=\['animal'\] is neither.*Fix: task.categories=\[animals\]"):
        resolve_concept_lists(["animal"])
    with pytest.raises(ConfigError, match="task.dedicated_auroc=1.5 must lie in"):
        TASKS["completeness"].Config(dedicated_auroc=1.5)
    with pytest.raises(ConfigError, match="task.uniqueness=0.5 >= 1. Fix"):
        TASKS["completeness"].Config(uniqueness=0.5)


@pytest.fixture(scope="module")
def animal_list(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("lists") / "few_animals.yaml"
    p.write_text(yaml.safe_dump({"name": "few_animals", "description": "Ten animals (test list)",
                                 "templates": TEMPLATES, "concepts": ANIMALS}))
    return p


def planted_dictionary(tiny, animal_list) -> torch.nn.Module:
    """relu_l1 SAE whose feature PLANTED fires on ' zebra' (encoder: the mean activation at the zebra
    tokens minus that at the other names, threshold between them), GENERIC on every name alike, and
    the rest never."""
    cl = load_concept_list(animal_list)
    tok = tiny.tokenizer
    capture = ActivationCapture(tiny, [HOOK])
    at, rest = {}, []
    from pipeline.audit.completeness import name_spans
    for c in cl.concepts:
        xs = []
        for t in cl.templates:
            ids, pos = name_spans(tok, t.format(c), c)
            x = capture(torch.tensor([[tok.bos_token_id, *ids]]))[HOOK][0]
            xs.append(x[[p + 1 for p in pos]].max(0).values)
            rest.append(x[[p for p in range(1, len(ids) + 1) if p - 1 not in pos]])  # the context tokens
        at[c] = torch.stack(xs)
    others = torch.cat([at[c] for c in ANIMALS[1:]] + rest)
    u = at["zebra"].mean(0) - others.mean(0)
    u = u / u.norm()
    lo_pos, hi_neg = float((at["zebra"] @ u).min()), float((others @ u).max())
    assert lo_pos > hi_neg, "the planted direction must separate zebra from the other names and the context"
    sae = create(SAEConfig(architecture="relu_l1", n_features=16, d_model=tiny.model.config.hidden_size))
    sae.reset_parameters(0)
    thr = (lo_pos + hi_neg) / 2
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # silent
        sae.W_enc[PLANTED] = u / (lo_pos - thr)
        sae.b_enc[PLANTED] = -thr / (lo_pos - thr)
        g = torch.cat([at[c] for c in ANIMALS]).mean(0)
        sae.W_enc[GENERIC] = g / g.norm() ** 2
        sae.b_enc[GENERIC] = 0.0
    return sae


def test_planted_concept_feature_is_found_and_others_are_not(tiny, animal_list, tmp_path):
    sae = planted_dictionary(tiny, animal_list)
    d = Dictionary.attach(sae, tiny, HOOK)
    cl = load_concept_list(animal_list)
    (acts,), ctx, ids = template_activations(d, tiny, [cl])
    assert set(ids.tolist()) == {PLANTED, GENERIC}  # only features that fire on some name are kept
    assert ctx.shape == (sum(len(tiny.tokenizer(t.format(c), add_special_tokens=False).input_ids) - 1
                             for c in ANIMALS for t in TEMPLATES), 2)  # every token but the one-token name
    r = dedicated_features(acts, ctx)
    zebra = r[0]
    assert zebra["found"] and ids[zebra["feature"]] == PLANTED and zebra["auroc"] == 1.0
    assert not any(x["found"] for x in r[1:])
    # the generic feature is the others' best candidate (or none fires often enough), never dedicated
    assert all(x["feature"] is None or (ids[x["feature"]] == GENERIC and x["auroc"] < 0.99) for x in r[1:]), r
    # end to end: frequencies from a corpus with known counts, alive features on it
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                              ["A zebra and a horse walked by the zebra pen."] * 30
                              + ["A camel, then a goat ate."] * 30))
    save(sae, tmp_path / "sae", meta={"hook": HOOK})
    task = TASKS["completeness"].Config(
        categories=[str(animal_list)], alive_tokens=256,
        max_density=0.5,  # zebra fills this tiny corpus: its feature fires on ~10% of the tokens
        corpus=DataConfig(source="files", path=[str(corpus)], split="all", shuffle_seed=None))
    cfg = AuditConfig(task=task, input=InputConfig(checkpoint=str(tmp_path / "sae"),
                                                   model=ModelConfig(name=tiny.model_id, device="cpu")),
                      out_dir=str(tmp_path / "out"), dashboard=None)
    doc = run(cfg)
    sec = doc["completeness"]
    rows = {x["concept"]: x for x in sec["categories"][0]["concepts"]}
    assert rows["zebra"]["found"] and rows["zebra"]["feature"] == PLANTED and sec["n_found"] == 1
    assert 0.05 < rows["zebra"]["density"] < 0.5
    assert rows["zebra"]["hits"] == 60 and rows["horse"]["hits"] == 30 and rows["camel"]["hits"] == 0  # 'camel,'
    assert rows["goat"]["hits"] == 30 and sec["corpus"]["n_documents"] == 60 and sec["n_alive"] >= 1
    assert rows["zebra"]["frequency_x_alive"] == pytest.approx(60 / sec["corpus"]["n_tokens"] * sec["n_alive"])
    zero_bin = sec["bins"][0]
    assert zero_bin["lo"] is None and zero_bin["n"] == 7 and zero_bin["found"] == 0  # 7 names never in the corpus
    assert sum(b["found"] for b in sec["bins"]) == 1
    page = (tmp_path / "out" / "audit.html").read_text()
    assert 'id="completeness-plot"' in page and 'data-concept="zebra"' in page


# --- absorption --------------------------------------------------------------------------------

def test_absorption_arithmetic_on_constructed_latents():
    cos = torch.tensor([1.0, 0.9, 0.05, -0.2, 0.5])
    main = [0]
    cases = {  # proj, activations (contribution = activation x cos)
        "full": (2.0, [0.0, 2.0, 0.0, 0.0, 0.0]),        # main silent, an aligned latent carries it
        "none": (2.0, [2.0, 0.0, 0.0, 1.0, 0.0]),        # the main latent carries it all
        "half": (2.0, [1.0, 1.5 / 0.9, 0.0, 0.0, 0.0]),  # main 1, absorber 1.5: a = min(1.5, 1) -> 1 / 2
        "weak": (2.0, [0.5, 0.5 / 0.9, 0.0, 0.0, 0.0]),  # absorbers 0.5 < 0.4 x 2
        "lowcos": (2.0, [0.0, 0.0, 38.0, 0.0, 0.0]),     # cos 0.05 < 0.1: no absorber; but >= 0.025: full
    }
    proj = torch.tensor([p for p, _ in cases.values()])
    acts = torch.tensor([a for _, a in cases.values()])
    frac, full = absorption_scores(proj, acts * cos, acts, cos, main)
    got = dict(zip(cases, zip(frac.tolist(), full.tolist())))
    assert got["full"] == (1.0, True)
    assert got["none"] == (0.0, False)
    assert got["half"][0] == pytest.approx(0.5) and not got["half"][1]
    assert got["weak"] == (0.0, False)
    assert got["lowcos"] == (0.0, True)
    # three absorbers at most: four small aligned latents, main silent
    cos4 = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5])
    a4 = torch.tensor([[0.0, 0.6, 0.6, 0.6, 0.6]])
    f4, u4 = absorption_scores(torch.tensor([1.2]), a4 * cos4, a4, cos4, [0])
    assert f4.item() == 1.0 and not u4.item()  # top contributor 0.3 < 0.4 x 1.2: not full


def test_main_latents_grow_while_f1_jumps():
    rng = np.random.default_rng(0)
    n, F = 400, 12
    y = rng.random(n) < 0.5
    lat = np.abs(rng.normal(0, 0.05, (n, F))) * (rng.random((n, F)) < 0.2)
    half = rng.random(n) < 0.5
    lat[:, 4] += 2.0 * (y & half)   # the letter's words, split across two latents
    lat[:, 7] += 2.0 * (y & ~half)
    m = sp.csr_matrix(lat.astype(np.float32))
    main, f1s = main_latents(m[:300], y[:300], m[300:], y[300:], max_k=4, f1_jump=0.03)
    assert sorted(main) == [4, 7]
    assert f1s[1] > f1s[0] + 0.2 and f1s[1] > 0.95 and len(f1s) == 4
    with pytest.raises(ConfigError, match="task.words=10 must be >= 100"):
        TASKS["absorption"].Config(words=10)


def test_word_activations_on_the_prefix_cache_equal_the_whole_prompt(tiny):
    from pipeline.audit.absorption import TEMPLATE, alpha_words, prompt_prefix, word_activations
    vocab = alpha_words(tiny.tokenizer)
    assert len(vocab) > 1000 and all(tiny.tokenizer.decode([i]) == " " + w and w.isalpha() for i, w in vocab[:500])
    icl, words = vocab[:10], vocab[10:40]
    prefix = prompt_prefix(tiny.tokenizer, icl)
    sae = create(SAEConfig(architecture="relu_l1", n_features=16, d_model=32))
    d = Dictionary.attach(sae, tiny, HOOK)
    x = word_activations(d, tiny, prefix, [i for i, _ in words], batch_size=7)
    post = tiny.tokenizer(TEMPLATE, add_special_tokens=False).input_ids
    full = torch.tensor([prefix + [i] + post for i, _ in words])
    ref = ActivationCapture(tiny, [HOOK])(full)[HOOK][:, len(prefix)]
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


# --- command line, report and the dashboard link ------------------------------------------------

@pytest.fixture(scope="module")
def audited(tiny, tiny_model_dir, text_dir, animal_list, tmp_path_factory):
    """A real dashboard of a 64-feature dictionary of near-duplicate decoder pairs; then
    audit/task=neighbours from the command line and the absorption task in process, into one out_dir."""
    tmp = tmp_path_factory.mktemp("structure")
    rows, partner = pairs(n_pairs=32, d=32)
    sae = create(SAEConfig(architecture="relu_l1", n_features=64, d_model=32))
    sae.reset_parameters(0)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
    save(sae, tmp / "sae", meta={"hook": HOOK, "model": {"id": str(tiny_model_dir)}})
    inp = InputConfig(checkpoint=str(tmp / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=DataConfig(source="files", path=[str(text_dir / "*.txt")]), context_size=32,
                      n_tokens=32 * 4, batch_size=4)
    interpret(InterpretConfig(input=inp, top_k=2, n_samples=2, out_dir=str(tmp / "dash"),
                              crosslingual_in_dashboard=False, progress=False))
    env = {**os.environ, "PIPELINE_RUNS": str(tmp / "runs"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline.audit", "audit/task=neighbours",
                        f"input.checkpoint={tmp / 'sae'}", f"input.model.name={tiny_model_dir}",
                        f"out_dir={tmp / 'out'}", f"dashboard={tmp / 'dash'}", "task.n_neighbours=4"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run(AuditConfig(task=TASKS["absorption"].Config(words=300, max_k=3), input=replace(inp, data=DataConfig()),
                    out_dir=str(tmp / "out"), dashboard=str(tmp / "dash")))
    return tmp, partner, p.stdout


def test_cli_neighbours_section_map_and_lists(audited):
    tmp, partner, out = audited
    assert re.search(r"neighbours: 64 features, median nearest cosine 0\.9\d\d, umap map", out), out
    doc = json.loads((tmp / "out" / "audit.json").read_text())
    sec = doc["neighbours"]
    assert sec["map_method"] == "umap" and sec["n_features"] == 64 and sec["file"] == "neighbours.json"
    data = json.loads((tmp / "out" / "neighbours.json").read_text())
    assert [r[0] for r in data["neighbours"]] == partner.tolist() and len(data["neighbours"][0]) == 4
    assert len(data["map"]) == 64
    xy = torch.tensor(data["map"])  # UMAP puts each feature near its near-duplicate
    assert (xy - xy[partner]).norm(dim=1).median() < 0.5 * torch.cdist(xy, xy).median()
    page = (tmp / "out" / "audit.html").read_text()
    svg = page[page.index('<svg id="feature-map"'):page.index("</svg>", page.index('<svg id="feature-map"'))]
    assert svg.count("<circle") == 64
    have = {int(p.stem) for p in (tmp / "dash" / "features").glob("*.html")}
    assert have and svg.count('href="../dash/features/') == len(have)  # points link where a page exists
    assert "<script" not in page[page.index('id="neighbours"'):]  # static: no script in these sections


def test_absorption_section_covers_every_letter_with_the_caveat(audited):
    tmp = audited[0]
    sec = json.loads((tmp / "out" / "audit.json").read_text())["absorption"]
    assert [r["letter"] for r in sec["letters"]] == list("abcdefghijklmnopqrstuvwxyz")
    assert sec["n_words"] == 300 and sec["n_train"] == 240
    assert sum(r["n_test"] for r in sec["letters"]) == 60
    scored = [r for r in sec["letters"] if not r["skipped"]]
    assert scored and all(1 <= len(r["main_latents"]) <= 3 and len(r["k_sparse_f1"]) <= 3 for r in scored)
    assert sec["n_letters_scored"] == sum(r["probe_f1"] > 0.6 and r["n_probe_true_positives"] > 0 for r in scored)
    assert sec["too_few_letters"] == (sec["n_letters_scored"] < 20)
    page = (tmp / "out" / "audit.html").read_text()
    assert "not meaningful below about 1B parameters" in page and 'id="absorption-letters"' in page


def test_dashboard_index_links_to_the_audit_report(audited):
    tmp = audited[0]
    index = tmp / "dash" / H.INDEX_FILE
    text = index.read_text()
    hrefs = re.findall(r'<a id="audit-link" href="([^"]+)">', text)
    assert len(hrefs) == 1  # two audit runs wrote it; one link
    assert (index.parent / hrefs[0]).resolve() == (tmp / "out" / "audit.html").resolve()
    # the report links back to the dashboard
    assert 'href="../dash/index.html"' in (tmp / "out" / "audit.html").read_text()
    # rewriting the index (the interpretation stage rerun) keeps the link
    from pipeline.interpret.run import _write_index
    _write_index(tmp / "dash", ({"sae": "s", "hook": HOOK, "n_features": 64, "n_tokens": 1, "data": "d"}, []))
    assert re.findall(r'<a id="audit-link" href="([^"]+)">', index.read_text()) == hrefs
    # an index without the markers (older dashboards) is left alone and reported
    old = tmp / "old" / H.INDEX_FILE
    old.parent.mkdir()
    old.write_text("<html><body>old</body></html>")
    assert not H.set_audit_link(old, tmp / "out" / "audit.html")
    assert old.read_text() == "<html><body>old</body></html>"
