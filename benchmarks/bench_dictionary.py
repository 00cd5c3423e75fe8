"""The dictionary a model-level benchmark runs: an exported SAE (--sae) or a random topk SAE of
--features latents at --hook, the same options in every such benchmark."""

from __future__ import annotations

import argparse
import tempfile

from pipeline.analysis import Dictionary
from pipeline.models import LoadedModel
from pipeline.sae import SAEConfig, create, save


def add_arguments(ap: argparse.ArgumentParser, features: int) -> None:
    ap.add_argument("--features", type=int, default=features)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--hook", default="model.layers.15")
    ap.add_argument("--sae", default=None, help="an exported SAE folder (default: a random topk SAE)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")


def load(a: argparse.Namespace, loaded: LoadedModel) -> Dictionary:
    if a.sae:
        return Dictionary.load(a.sae, loaded)
    sae = create(SAEConfig(architecture="topk", n_features=a.features, d_model=loaded.model.config.hidden_size, k=a.k))
    sae.reset_parameters(0)
    with tempfile.TemporaryDirectory() as tmp:
        return Dictionary.load(save(sae, f"{tmp}/sae", meta={"hook": a.hook}), loaded, a.hook)
