"""Activation stores: chunked Zarr v3 groups at any fsspec URL (format: docs/store-format.md)."""

from pipeline.store.reader import ActivationStore, HookStats
from pipeline.store.writer import ActivationStoreWriter, StoreLayout, commit

__all__ = ["ActivationStore", "ActivationStoreWriter", "HookStats", "StoreLayout", "commit"]
