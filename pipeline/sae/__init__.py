"""Sparse autoencoder architectures, one plain-torch file each, and their exported checkpoint.

    sae = create(SAEConfig(architecture="topk", n_features=4096, d_model=576)); sae.reset_parameters()
    out = sae(x)              # ForwardOutput(x_hat, loss, mse, sparsity, aux, l0, fired)
    sae = load("runs/demo/sae")   # an exported dictionary, for raw activations
"""

from pipeline.sae.base import ARCHITECTURES, ForwardOutput, Local, SAEConfig, SparseAutoencoder
from pipeline.sae.batchtopk import BatchTopK
from pipeline.sae.checkpoint import load, save
from pipeline.sae.jumprelu import JumpReLU
from pipeline.sae.relu_l1 import ReluL1
from pipeline.sae.topk import TopK

CLASSES: dict[str, type[SparseAutoencoder]] = {c.architecture: c for c in (ReluL1, TopK, JumpReLU, BatchTopK)}
assert tuple(CLASSES) == ARCHITECTURES


def create(cfg: SAEConfig, features: range | None = None, device=None) -> SparseAutoencoder:
    """An SAE of cfg.architecture holding `features` (default: all), parameters not initialised
    (call reset_parameters); on device="meta" nothing is allocated."""
    return CLASSES[cfg.architecture](cfg, features, device)


__all__ = ["ARCHITECTURES", "CLASSES", "ForwardOutput", "Local", "SAEConfig", "SparseAutoencoder", "create",
           "load", "save"]
