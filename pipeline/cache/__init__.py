"""Stage 1: run a language model up to its deepest hook and write the activations to a store.

    python -m pipeline.cache store.url=s3://bucket/acts hooks=[model.layers.15] n_tokens=1000000

Output contract: an activation store (docs/store-format.md)."""

from pipeline.cache.config import CacheConfig, StoreConfig, WorkerConfig
from pipeline.cache.run import CacheResult, run

__all__ = ["CacheConfig", "CacheResult", "StoreConfig", "WorkerConfig", "run"]
