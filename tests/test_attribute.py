"""task=attribute on a planted feature: a tiny random Llama and a topk SAE in which one feature fires at
every token with a decoder direction along the target's unembedding row, so it must carry the
prediction; the rest are random directions."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pipeline.analysis import Dictionary, InputConfig
from pipeline.analysis.collect import FeatureCollector, collect
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.interpret import InterpretConfig, run
from pipeline.interpret.attribute import attribute, densities
from pipeline.models import ModelConfig
from pipeline.sae import SAEConfig, create, save

HOOK = "model.layers.1"
PLANTED = 17
PROMPT, TARGET = "The capital of France is", " Paris"


def planted_sae(loaded, target_id: int):
    sae = create(SAEConfig(architecture="topk", n_features=64, d_model=32, k=4))
    sae.reset_parameters(0)
    with torch.no_grad():  # always on (activation 1, above the others' ~0.1), writing along the target's unembedding
        sae.W_enc[PLANTED] = 0
        sae.b_enc[PLANTED] = 1.0
        sae.W_dec[PLANTED] = loaded.model.get_output_embeddings().weight[target_id]
    return sae


@pytest.fixture(scope="module")
def result(tiny, tiny_model_dir, text_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attribute")
    tid = tiny.tokenizer(TARGET, add_special_tokens=False).input_ids[0]
    save(planted_sae(tiny, tid), tmp / "sae", meta={"hook": HOOK, "model": {"id": str(tiny_model_dir)}})
    inp = InputConfig(checkpoint=str(tmp / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=DataConfig(source="files", path=[str(text_dir / "*.txt")]), context_size=32,
                      n_tokens=32 * 8, batch_size=4)
    cfg = InterpretConfig(task="attribute", input=inp, prompt=PROMPT, target=TARGET, n_attributed=4, n_random=3,
                          out_dir=str(tmp / "dash"), progress=False)
    return cfg, run(cfg), tmp / "dash"


def test_the_planted_feature_is_found_and_confirmed_by_ablation(result, tiny):
    cfg, r, out = result
    top = r["features"][0]
    assert top["feature"] == PLANTED and top["attribution"] > 10 * abs(r["features"][1]["attribution"])
    assert top["density"] == 1.0 and top["acts"] == [1.0] * len(r["tokens"])  # measured on the corpus sample
    assert top["ablation_drop"] > 0.3 and top["beats_random"]
    assert top["ablation_drop"] > 10 * max(abs(x) for x in top["random"]["drops"])
    assert len(top["random"]["features"]) == 3 and PLANTED not in top["random"]["features"]
    assert r["summary"]["confirmed"] and r["summary"]["mean_drop"] > r["summary"]["mean_random_drop"]
    # the error term keeps the spliced model's output the model's own
    ids = torch.tensor([[tiny.tokenizer.bos_token_id] + tiny.tokenizer(PROMPT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        own = tiny.model(input_ids=ids).logits[0, -1].log_softmax(-1)[r["target_id"]]
    assert abs(r["base_logprob"] - float(own)) < 1e-5 and r["model_logprob"] == pytest.approx(float(own), abs=1e-6)
    assert json.loads((out / "attribute.json").read_text())["features"][0]["feature"] == PLANTED
    assert "Feature attribution" in (out / "attribute.html").read_text()
    assert r["density_source"].startswith("corpus sample")


def test_densities_from_features_json(result, tiny, tmp_path):
    cfg, _, out = result
    d = Dictionary.load(cfg.input.checkpoint, tiny)
    density = [0.5 ** (i % 20) for i in range(64)]
    doc = {"sae": d.path, "hook": HOOK, "n_features": 64, "features": [{"index": i, "density": x} for i, x in enumerate(density)]}
    (tmp_path / "features.json").write_text(json.dumps(doc))
    r = run(replace(cfg, features=str(tmp_path / "features.json"), out_dir=str(tmp_path)))
    assert r["density_source"] == str(tmp_path / "features.json")
    assert all(f["random"]["densities"] == [density[i] for i in f["random"]["features"]] for f in r["features"])
    (tmp_path / "other.json").write_text(json.dumps({**doc, "n_features": 65}))
    with pytest.raises(ConfigError, match="describes another SAE"):
        run(replace(cfg, features=str(tmp_path / "other.json")))
    # direct call: random picks follow the seed and never include a kept feature
    a = attribute(d, tiny, PROMPT, TARGET, torch.tensor(density), n_attributed=3, n_random=2, seed=1)
    kept = {f["feature"] for f in a["features"]}
    assert all(not kept & set(f["random"]["features"]) for f in a["features"])


def test_corpus_densities_equal_the_collectors(result, tiny, tmp_path):
    cfg, _, _ = result
    d = Dictionary.load(cfg.input.checkpoint, tiny)
    density, source = densities(d, tiny, cfg.input, None, str(tmp_path), progress=False)
    c = collect(d, tiny, cfg.input, FeatureCollector(0, 64, 1, 1, 0, 0), progress=False)
    assert source.startswith("corpus sample") and density[PLANTED] == 1.0
    assert torch.equal(density, c.summary()["density"].float())


def test_target_must_be_one_token(result, tiny):
    cfg, _, _ = result
    with pytest.raises(ConfigError, match=r"target=' Golden Gate' is 2 tokens .*exactly one.*target=' Golden'"):
        run(replace(cfg, target=" Golden Gate"))
    with pytest.raises(ConfigError, match="task=attribute needs a prompt and a target"):
        InterpretConfig(task="attribute", prompt=PROMPT)
    with pytest.raises(ConfigError, match="n_random=0 must be positive"):
        InterpretConfig(task="attribute", prompt=PROMPT, target=TARGET, n_random=0)
