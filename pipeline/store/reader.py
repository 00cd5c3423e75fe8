"""The read side of the activation store: open a committed store and read rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zarr

from pipeline.errors import ConfigError, StoreError, StoreIncompleteError
from pipeline.store import format as F
from pipeline.store.storage import Storage


@dataclass(frozen=True)
class HookStats:
    """Normalisation statistics of one hook, over the rows that are not outliers."""

    count: int
    n_outliers: int
    median_norm: float
    mean_norm: float
    mean_sq_norm: float
    mean: torch.Tensor

    @classmethod
    def from_json(cls, d: dict) -> "HookStats":
        return cls(d["count"], d["n_outliers"], d["median_norm"], d["mean_norm"], d["mean_sq_norm"],
                   torch.tensor(d["mean"], dtype=torch.float32))


class ActivationStore:
    """A committed activation store. `meta` is the header written at creation (model, hooks,
    data, layout); `stats[hook]` the normalisation statistics written at commit."""

    def __init__(self, storage: Storage, group: zarr.Group, meta: dict, commit: dict):
        self.storage, self.group, self.meta = storage, group, meta
        self.url = storage.url
        self.n_tokens: int = commit["n_tokens"]
        self.n_contexts: int = commit["n_contexts"]
        self.hooks: list[str] = list(meta["layout"]["hooks"])
        self.d_model: int = meta["layout"]["d_model"]
        self.dtype: str = meta["layout"]["dtype"]
        self.stats = {h: HookStats.from_json(s) for h, s in commit["stats"].items()}

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> "ActivationStore":
        storage = Storage(url, storage_options)
        if not storage.check_access():
            raise StoreError(f"no activation store at {url!r}. Fix: run the caching stage "
                             "(python -m pipeline.cache store.url=...) or check the URL")
        if storage.read_json(F.COMMIT_MARKER) is None:
            done = len(storage.list_json(F.SHARD_MARKERS))
            raise StoreIncompleteError(
                f"the store at {url!r} is not committed ({done} shard(s) finished): it is still being "
                "written or its writer was killed. Fix: rerun the same caching command to finish it")
        group = zarr.open_group(storage.zarr_store(read_only=True), mode="r")
        attrs = dict(group.attrs)
        meta, commit = attrs.get(F.HEADER_ATTR), attrs.get(F.COMMIT_ATTR)
        if meta is None or commit is None or meta.get("format") != F.FORMAT_NAME:
            raise StoreError(f"{url!r} has a commit marker but no activation-store metadata")
        if meta.get("version") != F.FORMAT_VERSION:
            raise StoreError(f"{url!r} has store format version {meta.get('version')}; this pipeline "
                             f"reads version {F.FORMAT_VERSION}. Fix: re-cache with this version")
        return cls(storage, group, meta, commit)

    def hook(self, hook: str | None = None) -> str:
        if hook is None:
            if len(self.hooks) != 1:
                raise ConfigError(f"the store at {self.url!r} holds hooks {self.hooks}; name one")
            return self.hooks[0]
        if hook not in self.hooks:
            raise ConfigError(f"hook {hook!r} is not in the store at {self.url!r}; it holds {self.hooks}")
        return hook

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def acts(self, start: int, stop: int, hook: str | None = None) -> torch.Tensor:
        """Rows [start, stop) of a hook's activations as float32."""
        raw = self.group[F.hook_path(self.hook(hook), F.ACTS)][start:stop]
        return F.decode(raw, self.dtype)

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group[F.TOKENS][start:stop]

    def contexts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group[F.CONTEXT][start:stop]

    def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group[F.POSITION][start:stop]

    def __repr__(self) -> str:
        return (f"ActivationStore({self.url!r}, n_tokens={self.n_tokens}, d_model={self.d_model}, "
                f"dtype={self.dtype}, hooks={self.hooks})")
