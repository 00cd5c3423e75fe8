"""Batches for the trainer: this rank's share of each global batch from the shuffled,
prefetching ActivationLoader, resumable from a checkpoint."""

from __future__ import annotations

import threading
from dataclasses import replace

import torch

from pipeline.errors import ConfigError
from pipeline.sae import SAEConfig
from pipeline.store import ActivationLoader, ActivationStore
from pipeline.store.loader import Interrupted


def with_d_model(sae: SAEConfig, store: ActivationStore) -> SAEConfig:
    """`sae` with the store's width (the trainer and its dry run both take d_model from the store)."""
    if sae.d_model is not None and sae.d_model != store.d_model:
        raise ConfigError(f"sae.d_model={sae.d_model}, but the store at {store.url!r} holds activations of "
                          f"width {store.d_model}. Fix: drop sae.d_model (it is taken from the store) or "
                          "train on a store of that width")
    return replace(sae, d_model=store.d_model)


class RankBatches:
    """Iterator of this rank's `[batch_size / data_parallel, d_model]` batches.

    By default each data-parallel replica reads its own disjoint share of the store. With
    `same_batches_at_any_layout`, every replica reads the whole global batch and keeps its slice,
    so the global batches, and the trajectory, do not depend on the layout (the equivalence tests
    compare layouts this way). Feature-parallel ranks of one replica always get identical batches:
    they read with the same seed and data-parallel rank.

    Setting `interrupt` ends a wait for a batch with `Interrupted`; a configuration in which an
    epoch gives a rank fewer rows than a batch raises ConfigError (at once, or once the exclusion
    rules have been applied to one epoch)."""

    def __init__(self, store: ActivationStore, hook: str, cfg, dp_rank: int, dp_size: int, device,
                 interrupt: threading.Event | None = None):
        global_view = cfg.data.same_batches_at_any_layout and dp_size > 1
        per_rank, self.global_batch = cfg.batch_size // dp_size, cfg.batch_size
        self.slice = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank) if global_view else None
        self.store, self._args = store, dict(
            batch_size=cfg.batch_size if global_view else per_rank, hook=hook, seed=cfg.seed,
            dp_rank=0 if global_view else dp_rank, dp_size=1 if global_view else dp_size,
            shuffle_buffer=cfg.data.shuffle_buffer, epochs=None, drop_last=True, device=device,
            expected_d_model=store.d_model, exclude_positions_below=cfg.data.exclude_positions_below,
            exclude_norm_factor=cfg.data.exclude_norm_factor, skip_corrupt=cfg.data.skip_corrupt)
        self.interrupt = interrupt
        self.loader = ActivationLoader(store, **self._args, interrupt=interrupt)
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            x = next(self._it)
        except Interrupted:
            self._it = None  # that iteration is over; the next one starts with the batch not taken
            raise
        return x[self.slice] if self.slice is not None else x

    def sample(self) -> torch.Tensor:
        """The run's first global batch, read again by a loader of its own: the same rows on every
        rank whatever the layout (for data-dependent initialisation), this iterator untouched. Raises
        Interrupted when a signal ends the wait, as a batch does."""
        loader = ActivationLoader(self.store, **{**self._args, "batch_size": self.global_batch, "dp_rank": 0,
                                                 "dp_size": 1}, interrupt=self.interrupt)
        try:
            return next(iter(loader))
        finally:
            loader.close()

    def nonfinite_rows(self, state: dict) -> list[int]:
        """Store rows holding a NaN or an infinity in this rank's batch that follows `state`, read
        again with their row ids (reading ids every step would cost more reads)."""
        loader = ActivationLoader(self.store, **{**self._args, "device": "cpu"}, with_ids=True)
        loader.load_state_dict(state)
        try:
            batch = next(iter(loader))
        finally:
            loader.close()
        acts, rows = (batch.acts, batch.rows) if self.slice is None else \
            (batch.acts[self.slice], batch.rows[self.slice])
        return rows[~torch.isfinite(acts).all(1)].tolist()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def close(self) -> None:
        self.loader.close()
