"""Sparse autoencoder architectures, one plain-torch file each, and their exported checkpoint.

    sae = create(SAEConfig(architecture="topk", n_features=4096, d_model=576)); sae.reset_parameters()
    out = sae(x)              # ForwardOutput(x_hat, loss, mse, sparsity, aux, l0, fired)
    code = sae.encode(x)      # SparseCode(values, indices) of the active latents, every architecture
    sae = load("runs/demo/sae")   # an exported dictionary, for raw activations

A new architecture: a @register'ed SparseAutoencoder subclass in its own file, imported below, and
conf/sae/<name>.yaml (tests/test_fifth_architecture.py shows that nothing else changes).
"""

from pipeline.sae.base import (CLASSES, ForwardOutput, Local, SAEConfig, SparseAutoencoder, SparseCode, create,
                               register, sae_class)
from pipeline.sae.checkpoint import load, save
# imported for @register, in the order of ARCHITECTURES
from pipeline.sae.relu_l1 import ReluL1
from pipeline.sae.topk import TopK
from pipeline.sae.jumprelu import JumpReLU
from pipeline.sae.batchtopk import BatchTopK

ARCHITECTURES = tuple(CLASSES)
"""The architectures of this package: relu_l1, topk, jumprelu, batchtopk."""

__all__ = ["ARCHITECTURES", "BatchTopK", "CLASSES", "ForwardOutput", "JumpReLU", "Local", "ReluL1", "SAEConfig",
           "SparseAutoencoder", "SparseCode", "TopK", "create", "load", "register", "sae_class", "save"]
