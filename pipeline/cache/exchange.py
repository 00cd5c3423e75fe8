"""Stores to and from SAELens's cached-activation datasets (pipeline/cache/saelens_dataset.py says
what each holds and how they map).

    python -m pipeline.cache.exchange export store.url=runs/demo/activations dataset=runs/demo/saelens-acts
    python -m pipeline.cache.exchange import dataset=path/to/saelens/cache store.url=runs/imported \
        model=gpt2 first_position=0

The first argument, `import` or `export`, sets `direction`; the others are Hydra overrides of
ExchangeConfig (conf/exchange.yaml).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from pipeline.cache.config import StoreConfig
from pipeline.config import stage_main
from pipeline.errors import ConfigError
from pipeline.store.format import check_dtype

DIRECTIONS = ("import", "export")


@dataclass
class ExchangeStoreConfig(StoreConfig):
    dtype: str | None = None
    """import: the store's dtype; unset: the dataset's (bfloat16 for a dataset exported from a
    bfloat16 store), which keeps every value bit for bit. Set, the values are converted."""

    def __post_init__(self):
        if self.dtype is not None:
            check_dtype(self.dtype)


@dataclass
class ExchangeConfig:
    direction: str | None = None
    """import (SAELens dataset -> store.url) or export (store.url -> dataset)."""
    dataset: str = ""
    """The SAELens dataset folder (datasets' save_to_disk layout, as CacheActivationsRunner writes it);
    export: a new or empty folder."""
    store: ExchangeStoreConfig = field(default_factory=ExchangeStoreConfig)
    """Our store (url, storage_options; import: its layout, chunk_contexts, shard_contexts, ...)."""
    model: str | None = None
    """import: the model the dataset's activations came from (a SAELens dataset does not record it;
    a dataset we exported does, and that wins)."""
    first_position: int = 0
    """import: the position in its context of a dataset row's first activation (SAELens's seqpos_slice
    start: 1 if it dropped BOS); as above, a dataset we exported records it."""
    outlier_factor: float = 8.0
    """import: as the cache stage's (rows above this multiple of the median norm are left out of the
    statistics)."""

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction={self.direction!r}: say import or export, e.g. "
                              "`python -m pipeline.cache.exchange export store.url=... dataset=...`")
        if not self.dataset:
            raise ConfigError("dataset= is empty: name the SAELens dataset folder")
        if self.first_position < 0:
            raise ConfigError(f"first_position={self.first_position} must be 0 or more")


def run(cfg: ExchangeConfig) -> None:
    from pipeline.cache.saelens_dataset import export_store, import_dataset
    if cfg.direction == "export":
        n = export_store(cfg.store.url, cfg.store.storage_options, cfg.dataset)
        print(f"exported {n} contexts of {cfg.store.url} to the SAELens dataset {cfg.dataset}", flush=True)
        return
    record = import_dataset(cfg.dataset, cfg.store, model=cfg.model, first_position=cfg.first_position,
                            outlier_factor=cfg.outlier_factor)
    print(f"imported {record['n_tokens']} tokens of the SAELens dataset {cfg.dataset} into {cfg.store.url}",
          flush=True)


main = stage_main("exchange", ExchangeConfig)(run)


def cli() -> None:
    """A first argument without `=` is the direction."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        sys.argv[1:] = [f"direction={args[0]}", *args[1:]]
    main()


if __name__ == "__main__":
    cli()
