"""Batches for the trainer: this rank's share of each global batch from the shuffled,
prefetching ActivationLoader, resumable from a checkpoint."""

from __future__ import annotations

import torch

from pipeline.store import ActivationLoader, ActivationStore


class RankBatches:
    """Iterator of this rank's `[batch_size / data_parallel, d_model]` batches.

    By default each data-parallel replica reads its own disjoint share of the store. With
    `same_batches_at_any_layout`, every replica reads the whole global batch and keeps its slice,
    so the global batches, and the trajectory, do not depend on the layout (the equivalence tests
    compare layouts this way). Feature-parallel ranks of one replica always get identical batches:
    they read with the same seed and data-parallel rank."""

    def __init__(self, store: ActivationStore, hook: str, cfg, dp_rank: int, dp_size: int, device):
        global_view = cfg.data.same_batches_at_any_layout and dp_size > 1
        per_rank = cfg.batch_size // dp_size
        self.slice = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank) if global_view else None
        self.loader = ActivationLoader(
            store, cfg.batch_size if global_view else per_rank, hook=hook, seed=cfg.seed,
            dp_rank=0 if global_view else dp_rank, dp_size=1 if global_view else dp_size,
            shuffle_buffer=cfg.data.shuffle_buffer, epochs=None, drop_last=True, device=device,
            expected_d_model=store.d_model, exclude_positions_below=cfg.data.exclude_positions_below,
            exclude_norm_factor=cfg.data.exclude_norm_factor)
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        x = next(self._it)
        return x[self.slice] if self.slice is not None else x

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def close(self) -> None:
        self.loader.close()
