"""Audit stage on a tiny random Llama: the ranking statistics on constructed cases, a planted
concept feature found first and confirmed on held-out prompts, the steering check moving the
concept words' log-probability the right way, concept-set validation, feature splitting, and the
command line writing audit.json and audit.html (opened in headless Chromium when installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.analysis import Dictionary, InputConfig
from pipeline.audit import (AuditConfig, ConceptSetError, auroc, effect_size, load_concept_set, match_features,
                            resolve_concept_sets, run, search_concept, shipped)
from pipeline.audit.search import SteeringCheck, word_ids
from pipeline.audit.tasks import TASKS
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.interpret import InterpretConfig
from pipeline.interpret import run as interpret
from pipeline.models import ActivationCapture, ModelConfig
from pipeline.sae import SAEConfig, create, save

import system_packages

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FEATURE = 17  # the planted feature
N_FEATURES = 64

# A concept the tiny random model can carry: the token " zebra" (positives) against other animals in
# the same frames (negatives); held-out prompts use frames and animals the ranking never sees.
FRAMES = ["The {} walked slowly across the dry plain.", "A young {} drank from the river at dawn.",
          "We saw a {} near the fence yesterday.", "In the picture, the {} is standing alone.",
          "My sister drew a {} in her notebook.", "The old {} slept under the tree.",
          "Every morning the {} eats fresh grass.", "A {} ran past the jeep at full speed."]
HELDOUT = ["Suddenly a {} appeared on the road.", "The children pointed at the {} and laughed.",
           "Nobody expected to find a {} in the garden.", "The keeper fed the {} some hay."]
OTHERS = ["horse", "camel", "donkey", "goat", "sheep", "tiger", "lion", "rabbit"]
HELDOUT_OTHERS = ["moose", "llama", "buffalo", "deer"]


def zebra_set() -> dict:
    return {"name": "zebra", "description": "The word zebra against other animals (test set).",
            "positive": [f.format("zebra") for f in FRAMES], "negative": [f.format(o) for f, o in zip(FRAMES, OTHERS)],
            "heldout_positive": [f.format("zebra") for f in HELDOUT],
            "heldout_negative": [f.format(o) for f, o in zip(HELDOUT, HELDOUT_OTHERS)],
            "concept_words": ["zebra"]}


@pytest.fixture(scope="module")
def zebra_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("concepts") / "zebra.yaml"
    p.write_text(yaml.safe_dump(zebra_set()), encoding="utf-8")
    return p


def activations(loaded, hook: str, text: str) -> torch.Tensor:
    """[T, d] activations at positions >= 1 (after BOS), as the audit reads them."""
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    return ActivationCapture(loaded, [hook])(torch.tensor([[loaded.tokenizer.bos_token_id] + ids]))[hook][0, 1:]


def concept_direction(loaded, hook: str, cs) -> torch.Tensor:
    """Unit direction separating the training positives from the negatives: the mean activation at
    the concept token in the positives minus the mean over all positions of the negatives."""
    marker = set(loaded.tokenizer(" zebra", add_special_tokens=False).input_ids)
    at = []
    for text in cs.positive:
        ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
        x = activations(loaded, hook, text)
        at.append(x[[i for i, t in enumerate(ids) if t in marker]].mean(0))
    neg = torch.cat([activations(loaded, hook, t) for t in cs.negative]).mean(0)
    u = torch.stack(at).mean(0) - neg
    return u / u.norm()


def planted_sae(loaded, hook: str, cs, seed: int = 0, decoder_word: str | None = None):
    """A relu_l1 dictionary of random features plus feature FEATURE, whose encoder row is the concept
    direction with a threshold between the negatives' and the positives' largest projections (on
    the training prompts only), and whose decoder row is, if asked, the unembedding of a word."""
    u = concept_direction(loaded, hook, cs)
    top_pos = min(float((activations(loaded, hook, t) @ u).max()) for t in cs.positive)
    top_neg = max(float((activations(loaded, hook, t) @ u).max()) for t in cs.negative)
    assert top_pos > top_neg, "the planted direction must separate the training prompts"
    sae = create(SAEConfig(architecture="relu_l1", n_features=N_FEATURES, d_model=loaded.model.config.hidden_size))
    sae.reset_parameters(seed)
    threshold = (top_pos + top_neg) / 2
    scale = 1.0 / (top_pos - threshold)  # the weakest training positive fires at 1
    with torch.no_grad():
        sae.W_enc[FEATURE] = u * scale
        sae.b_enc[FEATURE] = -threshold * scale
        if decoder_word is not None:
            (tid,) = loaded.tokenizer(" " + decoder_word, add_special_tokens=False).input_ids
            w = loaded.model.get_output_embeddings().weight[tid]
            sae.W_dec[FEATURE] = w / w.norm()
    return sae


# --- ranking statistics ------------------------------------------------------------------------

def test_auroc_and_effect_size_on_constructed_cases():
    pos = torch.tensor([[3.0, 0.0, 1.0, 2.0], [4.0, 0.0, 1.0, 0.0], [5.0, 1.0, 1.0, 2.0]])
    neg = torch.tensor([[1.0, 5.0, 1.0, 2.0], [2.0, 6.0, 1.0, 1.0]])
    au = auroc(pos, neg)
    # col 0: every positive above every negative; col 1: every one below; col 2: all tied;
    # col 3: pairs (2>2 tie, 2>1 win) x2, (0<2, 0<1) -> (0.5 + 1 + 0 + 0 + 0.5 + 1) / 6
    torch.testing.assert_close(au, torch.tensor([1.0, 0.0, 0.5, 3.0 / 6]))
    # against brute force over all pairs on random scores, across the block boundary
    g = torch.Generator().manual_seed(0)
    p, n = torch.randint(0, 4, (7, 5), generator=g).float(), torch.randint(0, 4, (6, 5), generator=g).float()
    brute = torch.tensor([sum((a > b) + 0.5 * (a == b) for a in p[:, j] for b in n[:, j]).item() / 42
                          for j in range(5)])
    torch.testing.assert_close(auroc(p, n, block=2), brute)
    # Cohen's d: means 4 and 1.5, pooled variance (2 + 0.5) / 3
    d = effect_size(pos, neg)
    assert d[0].item() == pytest.approx(2.5 / (2.5 / 3) ** 0.5)
    assert d[1].item() < 0
    assert d[2].item() == 0.0  # identical everywhere: floored deviation, no division by zero
    with pytest.raises(ValueError, match="at least one score of each class"):
        auroc(pos[:0], neg)


# --- concept search ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_planted_feature_is_ranked_first_and_holds_on_heldout_prompts(tiny, zebra_file, seed):
    cs = load_concept_set(zebra_file)
    hook = "model.layers.1"
    d = Dictionary.attach(planted_sae(tiny, hook, cs, seed), tiny, hook)
    r = search_concept(d, tiny, cs, top=3, clamp_multiple=5.0, neutral_prompts=["I would like to tell you about"])
    best = r["features"][0]
    assert best["feature"] == FEATURE, r["features"]
    assert best["auroc"] == 1.0
    assert best["heldout_auroc"] >= 0.95, best
    assert best["effect_size"] > 1.0 and best["neg_mean_of_max"] == 0.0  # silent on every negative
    assert [f["auroc"] for f in r["features"]] == sorted((f["auroc"] for f in r["features"]), reverse=True)
    # the evidence holds the planted feature's per-token activations on every held-out prompt
    ev = r["heldout_evidence"]
    assert [e["label"] for e in ev] == ["positive"] * 4 + ["negative"] * 4
    assert all(len(e["acts"][str(FEATURE)]) == len(e["tokens"]) for e in ev)
    assert all(max(e["acts"][str(FEATURE)]) > 0 for e in ev if e["label"] == "positive")
    assert all(max(e["acts"][str(FEATURE)]) == 0 for e in ev if e["label"] == "negative")
    assert ev[0]["tokens"][0] != tiny.tokenizer.bos_token  # BOS (position 0) is not shown


def test_steering_check_moves_the_concept_words_the_right_way(tiny):
    hook = "model.layers.3"  # the last block: the direct path to the logits dominates
    sae = create(SAEConfig(architecture="relu_l1", n_features=N_FEATURES, d_model=32))
    sae.reset_parameters(0)
    (tid,) = tiny.tokenizer(" water", add_special_tokens=False).input_ids
    with torch.no_grad():
        w = tiny.model.get_output_embeddings().weight[tid]
        sae.W_dec[FEATURE] = w / w.norm()
        sae.W_enc[FEATURE] = 0.0  # never fires on its own: its own value is 0 everywhere
        sae.b_enc[FEATURE] = -1.0
    d = Dictionary.attach(sae, tiny, hook)
    prompts = ["I would like to tell you about", "My favourite topic is"]
    check = SteeringCheck(tiny, d, prompts, word_ids(tiny, ["water", "rain drops"]))
    up, down, same = check(FEATURE, 20.0), check(FEATURE, -20.0), check(FEATURE, 0.0)
    # (a random tiny model's logits span well under a nat: RMSNorm bounds what one direction adds)
    assert up["delta_logprob"] > 0.3, up
    assert up["delta_logprob_per_word"][0] > 0.3  # " water" itself
    assert up["kl"] > 0.01 and up["promoted_tokens"][0] == " water"
    assert up["added_norm"] == pytest.approx(20.0, rel=1e-5)  # |clamp| x a unit decoder row
    x = ActivationCapture(tiny, [hook])(check.batch[:1])[hook][0, 1:len(check.prompts[0])]
    assert up["added_norm_ratio"] == pytest.approx(20.0 / float(x.norm(dim=-1).median()), rel=1e-4)
    assert down["delta_logprob"] < -0.3, down
    # a random direction pushed as hard moves the word far less
    assert abs(up["control_delta_logprob"]) < 0.3 * up["delta_logprob"], up
    assert up["control_kl"] > 0
    # clamping a feature to its own value changes nothing: the SAE error term is kept
    assert abs(same["delta_logprob"]) < 1e-4 and same["kl"] < 1e-6
    # the clean log-probability agrees with a plain forward pass of the model
    ids = torch.tensor([[tiny.tokenizer.bos_token_id] + tiny.tokenizer(prompts[0], add_special_tokens=False).input_ids])
    with torch.no_grad():
        lp = torch.log_softmax(tiny.model(input_ids=ids).logits[0, -1], -1)[tid]
    assert check.clean["word"][0, 0].item() == pytest.approx(lp.item(), abs=1e-4)


# --- concept sets ------------------------------------------------------------------------------

def test_the_shipped_library_loads_and_covers_the_issue(tmp_path):
    library = shipped()
    for name in ("deception", "sycophancy", "power_seeking", "bias", "unsafe_code", "golden_gate_bridge"):
        assert name in library
    sets = resolve_concept_sets([])
    assert len(sets) == len(library) >= 9
    multilingual = [c for c in sets if {"en", "de", "es", "it"} <= set(c.languages)]
    assert len(multilingual) >= 3
    for c in sets:
        assert len(c.positive) >= 8 and len(c.negative) >= 8 and len(c.heldout_positive) >= 4, c.name
        assert not set(c.heldout_positive) & set(c.positive)
    # the package ships the YAML files (setup.cfg package_data)
    assert "pipeline.audit = concepts/*.yaml" in (ROOT / "setup.cfg").read_text()


def test_bad_concept_sets_fail_with_the_file_and_the_field(tmp_path):
    doc = zebra_set()
    del doc["heldout_negative"]
    bad = tmp_path / "no_heldout.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConceptSetError) as e:
        load_concept_set(bad)
    assert str(bad) in str(e.value) and "'heldout_negative'" in str(e.value) and "Fix" in str(e.value)
    assert isinstance(e.value, ConfigError)
    with pytest.raises(ConceptSetError, match="missing the field"):  # through the config resolution too
        resolve_concept_sets([str(bad)])
    doc = zebra_set() | {"concept_word": ["typo"]}
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConceptSetError, match=r"unknown field\(s\) \['concept_word'\]"):
        load_concept_set(bad)
    doc = zebra_set() | {"concept_words": ["lie", False]}  # YAML's unquoted false
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConceptSetError, match="'concept_words' must be a list of non-empty strings"):
        load_concept_set(bad)
    doc = zebra_set()
    doc["heldout_positive"] = doc["positive"][:2]
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConceptSetError, match="also appear in positive/negative"):
        load_concept_set(bad)
    with pytest.raises(ConceptSetError, match="neither a shipped set"):
        resolve_concept_sets(["watre"])
    with pytest.raises(ConceptSetError, match="does not exist"):
        resolve_concept_sets([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="task.small=runs/sae-1k"):
        TASKS["splitting"].Config()
    with pytest.raises(ConfigError, match="task='concept'.*audit/task=concept"):
        AuditConfig(task="concept")


# --- splitting ---------------------------------------------------------------------------------

def split_copies(small: torch.Tensor, n_novel: int, noise: float = 0.25, seed: int = 0):
    """Every small row twice, each copy perturbed, plus random rows; shuffled. Returns the large rows,
    each row's parent (-1: novel)."""
    g = torch.Generator().manual_seed(seed)
    s, dm = small.shape
    u = small / small.norm(dim=1, keepdim=True)
    copies = u.repeat_interleave(2, 0)
    copies = copies + noise * torch.randn(copies.shape, generator=g) / dm ** 0.5
    novel = torch.randn(n_novel, dm, generator=g)
    rows = torch.cat([copies * 3.0, novel])  # norms differ: matching is by cosine
    parents = torch.cat([torch.arange(s).repeat_interleave(2), torch.full((n_novel,), -1)])
    perm = torch.randperm(len(rows), generator=g)
    return rows[perm], parents[perm]


def test_splitting_matches_every_child_to_its_parent_and_reports_novel_features():
    g = torch.Generator().manual_seed(1)
    small = torch.randn(64, 128, generator=g)
    large, parents = split_copies(small, n_novel=20)
    r = match_features(small, large, threshold=0.7)
    for entry in r["children"]:
        got = sorted(c["feature"] for c in entry["children"])
        assert got == sorted((parents == entry["feature"]).nonzero().flatten().tolist()), entry
    assert sorted(n["feature"] for n in r["novel"]) == sorted((parents == -1).nonzero().flatten().tolist())
    assert r["counts"] == {"small_with_no_child": 0, "small_with_one_child": 0, "small_split": 64,
                           "large_children": 128, "large_novel": 20}
    assert sum(r["best_cosine_histogram"]["counts"]) == 148
    # blocked matching (memory bound for large dictionaries) gives the same answer
    from pipeline.audit.splitting import best_match
    (i7, c7), (i, c) = best_match(small, large, block=7), best_match(small, large)
    assert torch.equal(i7, i)
    torch.testing.assert_close(c7, c)
    # a threshold above every copy's cosine makes everything novel
    r = match_features(small, large, threshold=0.999)
    assert r["counts"]["large_novel"] == 148 and r["counts"]["small_with_no_child"] == 64
    with pytest.raises(ConfigError, match="same hook"):
        match_features(small, large[:, :64])


# --- command line and report -------------------------------------------------------------------

@pytest.fixture(scope="module")
def audited(tiny, tiny_model_dir, text_dir, zebra_file, tmp_path_factory):
    """The CLI on a planted dictionary (encoder: the zebra direction at block 1; decoder: the
    unembedding of " zebra"), with a real dashboard of the same SAE to link to, then
    audit/task=splitting into the same folder."""
    tmp = tmp_path_factory.mktemp("audit")
    hook = "model.layers.1"
    cs = load_concept_set(zebra_file)
    sae = planted_sae(tiny, hook, cs, decoder_word="zebra")
    save(sae, tmp / "sae", meta={"hook": hook, "model": {"id": str(tiny_model_dir)}})
    inp = InputConfig(checkpoint=str(tmp / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=DataConfig(source="files", path=[str(text_dir / "*.txt")]), context_size=32,
                      n_tokens=32 * 8, batch_size=4)
    interpret(InterpretConfig(input=inp, top_k=4, n_samples=4, out_dir=str(tmp / "dash"),
                              crosslingual_in_dashboard=False, progress=False))
    (tmp / "dash" / "features" / f"{FEATURE}.html").write_text("<p>planted</p>")  # linked even if it never fired
    env = {**os.environ, "PIPELINE_RUNS": str(tmp / "runs")}
    base = [sys.executable, "-m", "pipeline.audit", f"input.model.name={tiny_model_dir}", "input.model.device=cpu",
            f"out_dir={tmp / 'out'}", f"dashboard={tmp / 'dash'}"]
    p = subprocess.run(base + [f"input.checkpoint={tmp / 'sae'}", f"task.concepts=[{zebra_file},dog]", "task.top=3",
                               "task.clamp_multiple=10"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    concepts_doc = json.loads((tmp / "out" / "audit.json").read_text())
    # splitting: the dictionary against a larger one made of its perturbed copies and random rows
    large_rows, parents = split_copies(sae.W_dec.detach(), n_novel=10, noise=0.1)
    big = create(SAEConfig(architecture="relu_l1", n_features=len(large_rows), d_model=32))
    big.reset_parameters(3)
    with torch.no_grad():
        big.W_dec.copy_(large_rows)
    save(big, tmp / "big", meta={"hook": hook, "model": {"id": str(tiny_model_dir)}})
    q = subprocess.run(base + ["audit/task=splitting", f"task.small={tmp / 'sae'}", f"task.large={tmp / 'big'}",
                               "task.threshold=0.8"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    return tmp, p.stdout, q.stdout, concepts_doc, parents


def test_cli_writes_audit_json_and_report(audited):
    tmp, out, split_out, concepts_doc, parents = audited
    assert re.search(rf"zebra: feature {FEATURE} AUROC 1\.000", out), out
    doc = json.loads((tmp / "out" / "audit.json").read_text())
    assert doc["format"] == "pipeline.audit" and set(doc) >= {"concepts", "splitting"}
    assert doc["concepts"] == concepts_doc["concepts"]  # the splitting run kept the concepts section
    sec = doc["concepts"]
    assert [c["name"] for c in sec["concepts"]] == ["zebra", "dog"]
    zebra = sec["concepts"][0]
    best = zebra["features"][0]
    assert best["feature"] == FEATURE and best["heldout_auroc"] >= 0.95
    st = best["steering"]
    assert st["clamp_value"] == pytest.approx(sec["clamp_multiple"] * best["pos_max"]) and sec["clamp_multiple"] == 10.0
    assert st["delta_logprob"] > 0.2 and st["kl"] > 0 and st["promoted_tokens"][0] == " zebra", st
    assert st["delta_logprob"] > st["control_delta_logprob"] + 0.1
    assert len(sec["concepts"][1]["features"]) == 3  # the shipped dog set ran too (random features)
    # splitting: every copy is its parent's child, the random rows are novel
    sp = doc["splitting"]
    assert sp["counts"]["small_split"] == N_FEATURES and sp["counts"]["large_novel"] == 10
    assert {n["feature"] for n in sp["novel"]} == set((parents == -1).nonzero().flatten().tolist())
    assert "64 split" in split_out
    page = (tmp / "out" / "audit.html").read_text()
    assert f'href="../dash/features/{FEATURE}.html"' in page
    assert 'href="../dash/index.html"' in page and 'id="splitting"' in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # works offline


@pytest.mark.skipif(CHROMIUM is None, reason=system_packages.missing("chromium", "renders the report headless"))
def test_report_renders_in_headless_chromium(audited):
    tmp = audited[0]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
    url = (tmp / "out" / "audit.html").resolve().as_uri()
    done = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={tmp / 'profile'}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    summary = dom[dom.index('id="summary"'):dom.index("</table>", dom.index('id="summary"'))]
    assert re.findall(r'<tr data-concept="([a-z_]+)">', summary) == ["zebra", "dog"]
    assert re.search(rf'<a class="feature" href="../dash/features/{FEATURE}.html">{FEATURE}</a>', summary)
    # the linked page exists where the browser would go
    assert (tmp / "out" / ".." / "dash" / "features" / f"{FEATURE}.html").resolve().exists()
    # held-out evidence: highlighted tokens, shaded where the planted feature fires
    assert re.search(r'<span class="tok" style="background:rgba\(255,130,0,(0\.[1-9]\d|1\.00)\)"', dom)
    assert re.search(r'<td class="num" id="n-novel">10</td>', dom)
    assert re.search(r'<td class="num control">[+-]\d\.\d{3}</td>', dom)
    shot = tmp / "audit.png"
    done = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={tmp / 'profile2'}", f"--screenshot={shot}",
                           "--window-size=1200,1600", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
