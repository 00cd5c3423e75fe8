"""Batches for the trainer: this rank's share of each global batch, resumable.

Interim: rows in store order (the shuffled, prefetching ActivationLoader of
pipeline/store/loader.py replaces this once it is in).
"""

from __future__ import annotations

import torch

from pipeline.store import ActivationStore


class StoreBatches:
    """Global batch t holds rows [t * B, (t + 1) * B) of the store (wrapping around); data-parallel
    rank r gets rows [r * B / dp, (r + 1) * B / dp) of it. Identical on feature-parallel ranks."""

    def __init__(self, store: ActivationStore, hook: str, batch_size: int, dp_rank: int, dp_size: int):
        self.store, self.hook = store, hook
        self.n = batch_size // dp_size
        self.offset = dp_rank * self.n
        self.batch_size = batch_size
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        start = (self.step * self.batch_size + self.offset) % self.store.n_tokens
        rows = [self.store.acts(start, min(start + self.n, self.store.n_tokens), self.hook)]
        while sum(len(r) for r in rows) < self.n:  # wrap around the end of the store
            rows.append(self.store.acts(0, self.n - sum(len(r) for r in rows), self.hook))
        self.step += 1
        return torch.cat(rows)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
