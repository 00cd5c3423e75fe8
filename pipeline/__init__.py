"""Dictionary learning at frontier scale: cache activations, train feature-sharded SAEs, evaluate, publish."""

__version__ = "0.1.0"
