"""Evaluation stage on a tiny random Llama: the downstream-loss identities (an exact identity SAE
recovers all of the loss, a zero reconstruction none of it), the metrics file, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.data import DataConfig
from pipeline.errors import ConfigError, HookNotFoundError
from pipeline.analysis import Dictionary, InputConfig
from pipeline.analysis.metrics import evaluate
from pipeline.evaluate import EvalConfig, run
from pipeline.models import ModelConfig
from pipeline.sae import SAEConfig, create, save

HOOK = "model.layers.1"


def identity_sae(d: int):
    """relu(x) - relu(-x) = x: a ReLU SAE with 2d features that reconstructs exactly."""
    sae = create(SAEConfig(architecture="relu_l1", n_features=2 * d, d_model=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int):
    """Fires, but decodes to exactly 0."""
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def random_topk(d: int, n: int = 128, k: int = 4, seed: int = 0):
    sae = create(SAEConfig(architecture="topk", n_features=n, d_model=d, k=k))
    sae.reset_parameters(seed)
    return sae


@pytest.fixture(scope="module")
def heldout(text_dir):
    return DataConfig(source="files", path=[str(text_dir / "*")], split="test", test_fraction=0.5)


def cfg_for(tiny_model_dir, heldout, tmp_path, **kw):
    inp = InputConfig(checkpoint=str(tmp_path / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=heldout, context_size=32, n_tokens=32 * 6, batch_size=3)
    return EvalConfig(input=inp, progress=False, out_dir=str(tmp_path / "eval"), **kw)


def test_identity_sae_recovers_all_of_the_loss(tiny, tiny_model_dir, heldout, tmp_path):
    d = Dictionary.attach(identity_sae(32), tiny, HOOK)
    m = evaluate(d, tiny, cfg_for(tiny_model_dir, heldout, tmp_path).input, progress=False)
    assert m["ce_loss"]["spliced"] == m["ce_loss"]["clean"]
    assert m["delta_loss"] == 0.0
    assert m["ce_loss_recovered"] == 1.0
    assert m["kl_to_clean"]["spliced"] == 0.0
    assert m["mse"] == 0.0 and m["fvu"] == 0.0 and m["explained_variance"] == 1.0
    assert m["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_loss"]["zero"] != m["ce_loss"]["clean"]  # the ablation changes this model's predictions
    assert m["kl_to_clean"]["zero"] > 0 and m["kl_to_clean"]["mean"] > 0


def test_zero_reconstruction_equals_zero_ablation(tiny, tiny_model_dir, heldout, tmp_path):
    d = Dictionary.attach(zero_sae(32), tiny, HOOK)
    m = evaluate(d, tiny, cfg_for(tiny_model_dir, heldout, tmp_path).input, progress=False)
    assert m["ce_loss"]["spliced"] == m["ce_loss"]["zero"]
    assert m["ce_loss_recovered"] == 0.0
    assert m["kl_to_clean"]["spliced"] == m["kl_to_clean"]["zero"]
    assert m["fvu"] > 1  # 0 is worse than the mean


def test_run_writes_metrics_and_histogram(tiny_model_dir, heldout, tmp_path):
    sae = random_topk(32)
    save(sae, tmp_path / "sae", meta={"hook": HOOK, "model": {"id": str(tiny_model_dir)}})
    m = run(cfg_for(tiny_model_dir, heldout, tmp_path))
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    png = (tmp_path / "eval" / "density_histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("mse", "fvu", "explained_variance", "cosine_similarity", "l0", "dead_fraction", "dense_fraction",
                "delta_loss", "ce_loss_recovered", "kl_to_clean", "feature_density", "n_outlier_rows_excluded"):
        assert key in on_disk, key
    assert set(on_disk["ce_loss"]) == {"clean", "spliced", "zero", "mean"}
    assert len(on_disk["feature_density"]) == 128
    # topk: exactly k latents per token unless a selected pre-activation is <= 0
    assert 0 < on_disk["l0"] <= 4
    density = torch.tensor(on_disk["feature_density"])
    assert on_disk["dead_fraction"] == pytest.approx(float((density == 0).float().mean()))
    assert density.sum().item() == pytest.approx(on_disk["l0"], rel=1e-4)
    assert math.isfinite(on_disk["fvu"]) and on_disk["n_tokens_evaluated"] == 32 * 6
    assert m["ce_loss"] == on_disk["ce_loss"]


def test_sae_forward_matches_dense_encode_decode(tiny):
    sae = random_topk(32)
    d = Dictionary.attach(sae, tiny, HOOK)
    x = torch.randn(50, 32)
    torch.testing.assert_close(d.decode(d.encode(x)), d.forward(x).x_hat, rtol=1e-5, atol=1e-5)
    assert (d.encode(x) > 0).sum(1).max() <= 4


def test_dense_code_of_ragged_batchtopk_rows_keeps_every_latent(tiny):
    """batchtopk's inference code has a different width per token, padded with index 0: the dense
    code must keep feature 0 where a token really has it."""
    sae = create(SAEConfig(architecture="batchtopk", n_features=64, d_model=32, k=4))
    sae.reset_parameters(0)
    sae.eval()
    x = torch.randn(200, 32)
    with torch.no_grad():
        sae.threshold.fill_(float((x @ sae.W_enc.t()).relu().quantile(0.9)))
    d = Dictionary.attach(sae, tiny, HOOK)
    dense = d.encode(x)
    rows, feats, vals = d.encode_sparse(x)
    assert (dense[:, 0] > 0).any() and ((dense > 0).sum(1) != (dense > 0).sum(1)[0]).any()  # ragged, uses 0
    expected = torch.zeros_like(dense).index_put_((rows, feats), vals)
    torch.testing.assert_close(dense, expected)


def test_bad_hook_and_width_name_the_value_and_the_fix(tiny, tiny_model_dir, heldout, tmp_path):
    save(random_topk(32), tmp_path / "sae", meta={"hook": "model.layers.9"})
    with pytest.raises(HookNotFoundError) as e:
        run(cfg_for(tiny_model_dir, heldout, tmp_path))
    assert "model.layers.9" in str(e.value) and "model.layers.3" in str(e.value) and "Fix" in str(e.value)
    save(random_topk(48), tmp_path / "sae48", meta={"hook": HOOK})
    with pytest.raises(ConfigError) as e:
        Dictionary.load(tmp_path / "sae48", tiny)
    assert "d_model=48" in str(e.value) and "width 32" in str(e.value) and "Fix" in str(e.value)
    save(random_topk(32), tmp_path / "nohook")
    with pytest.raises(ConfigError, match="hook=") as e:
        Dictionary.load(tmp_path / "nohook", tiny)


def test_training_split_is_refused(tiny_model_dir, heldout, tmp_path):
    from dataclasses import replace
    with pytest.raises(ConfigError, match="split=test"):
        cfg_for(tiny_model_dir, replace(heldout, split="train"), tmp_path)
    with pytest.raises(ConfigError, match="ablations"):
        cfg_for(tiny_model_dir, heldout, tmp_path, ablations=["resample"])
