"""Interpretation stage on a tiny random Llama: the streaming collector against brute force, the
dashboard files, feature search and the cross-lingual check."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from pipeline.analysis import Dictionary, InputConfig
from pipeline.analysis import collect as collect_module
from pipeline.analysis.collect import FeatureCollector, examples_of, segment_topk
from pipeline.analysis.prompts import prompt_activations
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.interpret import InterpretConfig, run
from pipeline.interpret.crosslingual import crosslingual, default_parallel_file, read_parallel
from pipeline.models import ModelConfig
from pipeline.sae import SAEConfig, create, save

HOOK = "model.layers.1"


def topk_sae(d=32, n=64, k=4):
    sae = create(SAEConfig(architecture="topk", n_features=n, d_model=d, k=k))
    sae.reset_parameters(0)
    return sae


def interpret_cfg(tiny_model_dir, text_dir, tmp, **kw):
    inp = InputConfig(checkpoint=str(tmp / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=DataConfig(source="files", path=[str(text_dir / "*.txt")]), context_size=32,
                      n_tokens=32 * 12, batch_size=4)
    base = dict(top_k=5, n_samples=6, n_quantiles=3, context_before=6, context_after=2, out_dir=str(tmp / "dash"),
                progress=False)
    return InterpretConfig(input=inp, **{**base, **kw})


@pytest.fixture(scope="module")
def dashboard(tiny_model_dir, text_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpret")
    save(topk_sae(), tmp / "sae", meta={"hook": HOOK, "model": {"id": str(tiny_model_dir)}})
    small = tmp / "parallel.jsonl"  # the cross-lingual page on 6 of the shipped sentences (speed)
    small.write_text("".join(default_parallel_file().read_text(encoding="utf-8").splitlines(True)[::5]),
                     encoding="utf-8")
    cfg = interpret_cfg(tiny_model_dir, text_dir, tmp, parallel_file=str(small))
    return cfg, run(cfg), tmp / "dash"


def test_segment_topk():
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    scores = torch.tensor([1.0, 5, 3, 2, 4, 0.5, 9])
    keep, rank = segment_topk(groups, scores, 2)
    assert sorted(zip(groups[keep].tolist(), rank.tolist(), scores[keep].tolist())) == [
        (0, 0, 5.0), (0, 1, 4.0), (1, 0, 2.0), (2, 0, 9.0), (2, 1, 3.0)]


def test_collector_matches_brute_force_with_bounded_state():
    torch.manual_seed(0)
    B, T, P, K = 3, 12, 6, 4
    c = FeatureCollector(2, 2 + P, top_k=K, n_samples=5, before=3, after=2)
    sizes = [t.numel() for t in (c.top.tokens, c.samples.tokens, c.hist)]
    seen = []
    for _ in range(5):
        ids = torch.randint(0, 1000, (B, T))
        dense = torch.relu(torch.randn(B * T, 10) - 0.8)
        rows, feats = dense.nonzero(as_tuple=True)
        c.update(ids, rows, feats, dense[rows, feats], B * T)
        seen.append((ids, dense.view(B, T, 10)))
    assert [t.numel() for t in (c.top.tokens, c.samples.tokens, c.hist)] == sizes  # independent of tokens
    all_acts = torch.cat([d.reshape(-1, 10) for _, d in seen])
    for i in range(P):
        col = all_acts[:, 2 + i]
        torch.testing.assert_close(c.top.score[i].sort(descending=True).values, col.topk(K).values)
        assert int(c.count[i]) == int((col > 0).sum()) == int(c.hist[i].sum())
        assert c.summary()["density"][i] == pytest.approx(float((col > 0).float().mean()))
        for e in examples_of(c.top, i, 3):  # the window is the example's own context
            match = [(ids, d) for ids, d in seen if (d[..., 2 + i] == e["value"]).any()]
            ids, d = match[0]
            b, t = [int(v) for v in (d[..., 2 + i] == e["value"]).nonzero()[0]]
            lo = max(t - 3, 0)
            assert e["tokens"] == ids[b, lo:t + 3].tolist() and e["center"] == t - lo
            torch.testing.assert_close(torch.tensor(e["acts"]), d[b, lo:t + 3, 2 + i], atol=1e-4, rtol=0)
        samples = examples_of(c.samples, i, 3)
        assert len(samples) == min(5, int(c.count[i])) and all(s["value"] > 0 for s in samples)


def test_dashboard_files(dashboard):
    cfg, result, out = dashboard
    doc = json.loads((out / "features.json").read_text())
    assert doc["n_features"] == 64 and len(doc["features"]) == 64 and doc["hook"] == HOOK
    live = [f for f in doc["features"] if f["count"] > 0]
    assert result["live"] == len(live) > 0 and result["pages"] == len(live)
    assert set(result["phase_seconds"]) == {"collect", "logit effects", "writing"}
    assert 0 < sum(result["phase_seconds"].values()) <= result["seconds"]
    for f in live:
        page = (out / "features" / f"{f['index']}.html").read_text()
        assert f"Feature {f['index']}" in page and 'class="tok max"' in page and "<svg" in page
        assert html_text(f["promoted"][0][0]) in page
        assert len(f["promoted"]) == len(f["suppressed"]) == cfg.n_logits
        assert f["promoted"][0][1] >= f["promoted"][-1][1] > f["suppressed"][-1][1]
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [e["index"] for e in examples] == [f["index"] for f in live]
    for e, f in zip(examples, live):  # best first, the best at the feature's maximum, its token at the centre
        assert 0 < len(e["top"]) <= cfg.top_k and e["top"][0]["value"] == pytest.approx(f["max_act"])
        assert [t["value"] for t in e["top"]] == sorted((t["value"] for t in e["top"]), reverse=True)
        for t in e["top"]:
            assert len(t["tokens"]) == len(t["token_ids"]) == len(t["acts"])
            assert t["acts"][t["center"]] == pytest.approx(t["value"], abs=1e-4)
    index = (out / "index.html").read_text()
    data = json.loads(re.search(r"const DATA = (.*?);</script>", index).group(1))
    cols = data["columns"]
    assert cols["index"] == list(range(64)) and all(len(v) == 64 for v in cols.values())
    assert [bool(p) for p in cols["page"]] == [f["count"] > 0 for f in doc["features"]]
    assert cols["max_act"] == [pytest.approx(f["max_act"], rel=1e-3) for f in doc["features"]]
    for name in ["index.html", "crosslingual.html", *(f"features/{f['index']}.html" for f in live)]:
        text = (out / name).read_text()
        # self-contained: nothing is fetched (no http(s) URLs, no external scripts or stylesheets)
        assert not re.search(r"(src|href)=\"(https?:)?//", text) and "<link" not in text, name


def html_text(s):
    import html
    from pipeline.analysis.html import show
    return html.escape(show(s))


@pytest.mark.parametrize("per_pass", [64, 24])
def test_max_pages_writes_the_densest_features(dashboard, tiny_model_dir, text_dir, tmp_path, capsys, per_pass):
    """The densest of the whole dictionary, also when it is collected in several passes."""
    _, _, out = dashboard
    save(topk_sae(), tmp_path / "sae", meta={"hook": HOOK})
    r = run(interpret_cfg(tiny_model_dir, text_dir, tmp_path, max_pages=3, features_per_pass=per_pass,
                          crosslingual_in_dashboard=False))
    live = sorted((f for f in json.loads((out / "features.json").read_text())["features"] if f["count"]),
                  key=lambda f: -f["density"])
    pages = {int(p.stem) for p in (tmp_path / "dash" / "features").glob("*.html")}
    assert r["pages"] == len(pages) == 3 and pages == {f["index"] for f in live[:3]}
    assert f"pages for the 3 densest of {len(live)} live features (max_pages=3" in capsys.readouterr().out


@pytest.mark.parametrize("replay", [True, False])
def test_feature_passes_give_the_same_features(dashboard, tiny_model_dir, text_dir, tmp_path, monkeypatch, replay):
    """Three passes of 24 features equal one pass of 64: replaying the first pass's sparse codes, and
    streaming the corpus again when the codes exceed REPLAY_BYTES. Replay encodes each batch once."""
    cfg, _, out = dashboard
    save(topk_sae(), tmp_path / "sae", meta={"hook": HOOK})
    if not replay:
        monkeypatch.setattr(collect_module, "REPLAY_BYTES", 0)
    encoded = []
    encode = Dictionary.encode_sparse
    monkeypatch.setattr(Dictionary, "encode_sparse", lambda self, x: encoded.append(len(x)) or encode(self, x))
    run(interpret_cfg(tiny_model_dir, text_dir, tmp_path, features_per_pass=24, crosslingual_in_dashboard=False))
    batches = -(-cfg.input.n_tokens // (cfg.input.context_size * cfg.input.batch_size))
    assert len(encoded) == (batches if replay else 3 * batches)
    for name in ("features.json", "examples.jsonl"):
        assert (out / name).read_text() == (tmp_path / "dash" / name).read_text().replace(str(tmp_path), str(out.parent))


def test_search_lists_the_top_features_of_each_token(dashboard, tiny, capsys):
    cfg, _, out = dashboard
    from dataclasses import replace
    result = run(replace(cfg, task="search", prompt="The Golden Gate Bridge is orange"))
    printed = capsys.readouterr().out
    d = Dictionary.load(cfg.input.checkpoint, tiny)
    ids, acts = prompt_activations(d, tiny, "The Golden Gate Bridge is orange")
    assert len(result["tokens"]) == len(ids) - 1  # BOS left out
    for t, row in zip(result["tokens"], acts[1:]):
        assert [f["feature"] for f in t["features"]] == row.topk(cfg.search_top).indices.tolist()[:len(t["features"])]
    assert result["overall"][0]["max"] == pytest.approx(float(acts[1:].max()))
    assert "'orange'" in printed or "' orange'" in printed
    page = (out / "search.html").read_text()
    assert "Feature search" in page and f'features/{result["overall"][0]["feature"]}.html' in page


def test_crosslingual_identical_sentences_overlap_fully(tiny, tmp_path):
    d = Dictionary.attach(topk_sae(), tiny, HOOK)
    rows = read_parallel(default_parallel_file(), ["en", "de", "es", "it", "fr"])
    assert len(rows) >= 24 and len({r["topic"] for r in rows}) >= 5
    same = [{"topic": r["topic"], "a": r["en"], "b": r["en"]} for r in rows[:8]]
    report = crosslingual(d, tiny, same, ["a", "b"], top=5)
    assert report["pairs"]["a-b"]["parallel"] == 1.0 > report["pairs"]["a-b"]["mismatched"]
    # identical sentences: the difference is 1 - mismatched, the interval brackets it and has width
    diff = report["parallel_minus_mismatched"]
    assert diff["mean"] == pytest.approx(1 - report["pairs"]["a-b"]["mismatched"], abs=1e-6)
    assert diff["ci95"][0] < diff["mean"] < diff["ci95"][1] <= 1
    report = crosslingual(d, tiny, rows[:6], ["en", "de", "fr"], top=5)
    assert set(report["pairs"]) == {"en-de", "en-fr", "de-fr"}
    assert all(0 <= v["parallel"] <= 1 for v in report["pairs"].values())
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"topic": "x", "en": "a"}) + "\n" + json.dumps({"topic": "y", "en": "b"}) + "\n")
    with pytest.raises(ConfigError, match="lacks sentences in \\['de'\\]"):
        read_parallel(bad, ["en", "de"])


def test_bad_config():
    with pytest.raises(ConfigError, match="prompt"):
        InterpretConfig(task="search")
    with pytest.raises(ConfigError, match="task='plot'"):
        InterpretConfig(task="plot")


def test_massive_activation_rows_are_never_examples(tiny, tiny_model_dir, text_dir, tmp_path):
    from pipeline.analysis.batches import context_batches, typical_rows
    from pipeline.analysis.collect import collect
    from pipeline.models import ActivationCapture

    rows = torch.ones(9, 4)
    rows[3] *= 50  # one massive row among typical ones
    assert typical_rows(rows, 8.0).tolist() == [True] * 3 + [False] + [True] * 5
    assert typical_rows(rows, None).all()

    save(topk_sae(), tmp_path / "sae", meta={"hook": HOOK})
    inp = replace(interpret_cfg(tiny_model_dir, text_dir, tmp_path).input, exclude_norm_factor=1.05)  # drops many rows
    d = Dictionary.load(inp.checkpoint, tiny, inp.hook)
    batches = list(context_batches(inp.data, tiny.tokenizer, inp.context_size, inp.n_tokens, inp.batch_size))
    capture = ActivationCapture(tiny, [d.hook])
    typical = torch.cat([typical_rows(capture(ids)[d.hook].reshape(-1, d.d_model), 1.05).view(ids.shape)[:, 1:]
                         for ids in batches])
    assert 0 < int(typical.sum()) < typical.numel()
    def collector(d):
        return FeatureCollector(0, d.n_features, 5, 6, 6, 2)

    kept = collect(d, tiny, inp, collector(d), batches=batches, progress=False)
    every = collect(d, tiny, replace(inp, exclude_norm_factor=None), collector(d), batches=batches, progress=False)
    assert kept.n_tokens == int(typical.sum()) and every.n_tokens == typical.numel()
    assert int(kept.count.sum()) < int(every.count.sum())
