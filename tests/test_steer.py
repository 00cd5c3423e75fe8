"""Steering on a tiny random Llama: a clamp at the feature's own value (or none) leaves the logits
unchanged, a large clamp raises the logits of the feature's top promoted tokens, and bad clamps
fail with errors that name the value and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.analysis import Dictionary, InputConfig
from pipeline.analysis.logits import logit_directions
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig, replace_output
from pipeline.sae import SAEConfig, create, save
from pipeline.steer import Clamp, SteerConfig, clamp_fn, generate, resolve_clamps, run


def topk_sae(d=32, n=64, k=4):
    sae = create(SAEConfig(architecture="topk", n_features=n, d_model=d, k=k))
    sae.reset_parameters(0)
    return sae


def logits(loaded, ids, hook=None, fn=None):
    with torch.no_grad():
        if fn is None:
            return loaded.model(input_ids=ids).logits
        with replace_output(loaded.model, hook, fn):
            return loaded.model(input_ids=ids).logits


IDS = torch.tensor([[1, 504, 2123, 314, 253, 1345, 30, 3212, 744, 9]])


def test_no_clamp_and_own_value_clamp_leave_logits_unchanged(tiny):
    d = Dictionary.attach(topk_sae(), tiny, "model.layers.1")
    clean = logits(tiny, IDS)
    assert torch.equal(logits(tiny, IDS, d.hook, clamp_fn(d, {})), clean)
    # a feature that fires nowhere in this prompt has own value 0 everywhere: clamp it to 0
    x = {}
    logits(tiny, IDS, d.hook, lambda t: x.setdefault("x", t))
    f = d.encode(x["x"])[0]
    silent = int((f.amax(0) == 0).nonzero()[0])
    torch.testing.assert_close(logits(tiny, IDS, d.hook, clamp_fn(d, {silent: 0.0})), clean, rtol=0, atol=1e-6)
    # a feature with a constant value c at every position (W_enc row 0, b_enc c): clamp it to c
    relu = create(SAEConfig(architecture="relu_l1", n_features=8, d_model=32))
    relu.reset_parameters(0)
    with torch.no_grad():
        relu.W_enc[3].zero_()
        relu.b_enc[3] = 2.5
    dr = Dictionary.attach(relu, tiny, "model.layers.1")
    assert torch.all(dr.encode(x["x"])[..., 3] == 2.5)
    torch.testing.assert_close(logits(tiny, IDS, dr.hook, clamp_fn(dr, {3: 2.5})), clean, rtol=0, atol=1e-6)
    # and a clamp that does differ from the own value does change them
    assert not torch.allclose(logits(tiny, IDS, dr.hook, clamp_fn(dr, {3: 25.0})), clean, atol=1e-3)


def test_large_clamp_raises_the_logits_of_the_features_promoted_tokens(tiny):
    d = Dictionary.attach(topk_sae(), tiny, "model.layers.3")  # the last block: the direct path dominates
    feature = 5
    effect = logit_directions(tiny.model, d.decoder()[feature:feature + 1])[0]
    promoted = effect.topk(10).indices
    clean = logits(tiny, IDS)[0]
    steered = logits(tiny, IDS, d.hook, clamp_fn(d, {feature: 200.0}))[0]
    raised = steered[:, promoted] - clean[:, promoted]
    assert (raised > 0).all(), raised
    # at every position the top promoted token becomes the most likely next token
    assert torch.equal(steered.argmax(-1), promoted[0].expand(IDS.shape[1]))
    # greedy generation with the clamp (applied at every new position too) emits promoted tokens
    text = generate(tiny, d, IDS, {feature: 200.0}, max_new_tokens=5)
    assert text == tiny.tokenizer.decode([int(promoted[0])] * 5, skip_special_tokens=True)
    assert generate(tiny, d, IDS, {}, max_new_tokens=5) != text


def test_negative_clamp_lowers_them(tiny):
    d = Dictionary.attach(topk_sae(), tiny, "model.layers.3")
    effect = logit_directions(tiny.model, d.decoder()[5:6])[0]
    promoted = effect.topk(10).indices
    clean = logits(tiny, IDS)[0]
    steered = logits(tiny, IDS, d.hook, clamp_fn(d, {5: -200.0}))[0]
    assert (steered[:, promoted] < clean[:, promoted]).all()


def test_clamp_parsing_and_bad_clamps(tiny, tmp_path):
    assert Clamp.parse("12:10x") == Clamp(12, 10.0, True)
    assert Clamp.parse("7=-2.5") == Clamp(7, -2.5, False)
    with pytest.raises(ConfigError, match="FEATURE:VALUE"):
        SteerConfig(clamp=["twelve"])
    with pytest.raises(ConfigError, match="twice"):
        SteerConfig(clamp=["1:2", "1:3x"])
    d = Dictionary.attach(topk_sae(), tiny, "model.layers.1")
    stats = tmp_path / "features.json"
    feats = [{"index": i, "density": 0.01 if i != 9 else 0.0, "max_act": 3.0 if i != 9 else 0.0} for i in range(64)]
    stats.write_text(json.dumps({"n_features": 64, "n_tokens": 1000, "features": feats}))
    assert resolve_clamps(d, [Clamp(4, 10, True), Clamp(5, 1.5, False)], str(stats)) == {4: 30.0, 5: 1.5}
    with pytest.raises(ConfigError) as e:
        resolve_clamps(d, [Clamp(64, 1, True)], str(stats))
    assert "64" in str(e.value) and "0..63" in str(e.value)
    with pytest.raises(ConfigError) as e:
        resolve_clamps(d, [Clamp(9, 10, True)], str(stats))
    assert "feature 9 is dead" in str(e.value) and "Fix" in str(e.value)
    with pytest.raises(ConfigError, match="allow_dead=true"):
        resolve_clamps(d, [Clamp(9, 10, False)], str(stats))
    assert resolve_clamps(d, [Clamp(9, 10, False)], str(stats), allow_dead=True) == {9: 10.0}
    with pytest.raises(ConfigError, match="pipeline.interpret"):
        resolve_clamps(d, [Clamp(4, 10, True)], str(tmp_path / "missing.json"))


def test_run_prints_clean_and_steered_side_by_side(tiny_model_dir, tmp_path, capsys):
    save(topk_sae(), tmp_path / "sae", meta={"hook": "model.layers.3", "model": {"id": str(tiny_model_dir)}})
    inp = InputConfig(checkpoint=str(tmp_path / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"))
    out = run(SteerConfig(input=inp, prompt="The bridge", clamp=["5:200"], features=str(tmp_path / "none.json"),
                          max_new_tokens=6, out_dir=str(tmp_path / "steer")))
    printed = capsys.readouterr().out
    assert "clean" in printed and "steered" in printed and "feature 5 = 200" in printed
    assert out["clean"] != out["steered"]
    assert json.loads((tmp_path / "steer" / "generations.json").read_text())["steered"] == out["steered"]
