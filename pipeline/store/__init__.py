"""Activation stores: chunked Zarr v3 groups at any fsspec URL (format: docs/store-format.md)."""

from pipeline.store.loader import ActivationLoader, Batch
from pipeline.store.reader import ActivationStore, ChunkError, HookStats
from pipeline.store.writer import ActivationStoreWriter, StoreLayout, commit

__all__ = ["ActivationLoader", "ActivationStore", "ActivationStoreWriter", "Batch", "ChunkError", "HookStats",
           "StoreLayout", "commit"]
