"""The read side of the activation store: open a committed store and read rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, ZstdCodec

from pipeline.errors import ConfigError, StoreError, StoreIncompleteError
from pipeline.store import format as F
from pipeline.store.storage import Storage


class ChunkError(StoreError):
    """A chunk of a store is missing or cannot be decoded. `key` is its zarr key, `rows` the
    store rows it holds."""

    def __init__(self, message: str, key: str, rows: range):
        super().__init__(message)
        self.key, self.rows = key, rows


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
        self._arrays: dict[str, zarr.Array] = {}

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

    @property
    def has_modality(self) -> bool:
        """Whether the store marks each row as text or image (a vision-language model's store)."""
        return bool(self.meta["layout"].get("modality"))

    def modality(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int8 [rows]: F.TEXT (0) or F.IMAGE (1) per row; all text for a store without the array."""
        if not self.has_modality:
            stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
            return np.full(max(stop - start, 0), F.TEXT, dtype=np.int8)
        return self.group[F.MODALITY][start:stop]

    # -- chunk-level reads, for the loader ------------------------------------------------------
    @property
    def chunk_rows(self) -> int:
        """Rows per chunk: the unit the loader permutes, reads and deals to ranks."""
        return int(self._array(F.TOKENS).chunks[0])

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_tokens / self.chunk_rows)

    def chunk_span(self, chunk: int) -> range:
        """The store rows that chunk `chunk` holds (the last chunk may be short)."""
        start = chunk * self.chunk_rows
        return range(start, min(start + self.chunk_rows, self.n_tokens))

    def chunk_key(self, name: str, chunk: int) -> str:
        """The zarr key of one chunk of array `name`, e.g. hooks/<hook>/acts/c/7/0."""
        arr = self._array(name)
        return f"{name}/{arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))}"

    def read_chunk(self, name: str, chunk: int, lo: int | None = None, hi: int | None = None,
                   required: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [lo, hi) (store rows, inside chunk `chunk`; default all of it) of array `name`, in
        its storage dtype, written into `out` if given (a whole chunk is decompressed straight
        into it). Zarr reads a missing chunk as zeros, so this raises ChunkError instead when
        `required` (a chunk of activations or norms is never all zeros, the only case in which
        zarr leaves one unwritten); a chunk that does not decode raises ChunkError too. Both
        name the zarr key and the rows."""
        span = self.chunk_span(chunk)
        lo, hi = span.start if lo is None else lo, span.stop if hi is None else hi
        key, arr = self.chunk_key(name, chunk), self._array(name)
        try:
            data = self._read_rows(arr, key, span, lo, hi, required, out)
        except (RuntimeError, ValueError, TypeError) as exc:  # codec errors, wrong size
            raise ChunkError(
                f"chunk {key!r} of the store at {self.url!r} (rows {span.start}..{span.stop - 1}) "
                f"is corrupt ({type(exc).__name__}: {exc}). Fix: re-cache the store, or let the loader "
                "skip bad chunks (skip_corrupt=True)", key, span) from exc
        if out is not None and data is not out:
            out[...] = data
            return out
        return data

    def _read_rows(self, arr, key, span, lo, hi, required, out):
        path = self.storage.path(key)
        if not _plain_codecs(arr):  # zarr decodes; it needs a second request to tell missing
            if required and not self.storage.fs.exists(path):
                raise _missing(self, key, span)
            return arr[lo:hi]
        try:  # one GET, decoded here
            raw = self.storage.fs.cat_file(path)
        except FileNotFoundError:
            if required:
                raise _missing(self, key, span) from None
            return np.full((hi - lo, *arr.shape[1:]), arr.metadata.fill_value, dtype=arr.dtype)
        zstd = arr.metadata.codecs[-1] if isinstance(arr.metadata.codecs[-1], ZstdCodec) else None
        whole = out is not None and (lo, hi) == (span.start, span.start + arr.chunks[0])
        if zstd is not None and whole and out.dtype == arr.dtype and out.flags.c_contiguous:
            return numcodecs.Zstd(level=zstd.level).decode(raw, out=out)  # no copy, no temporary
        data = numcodecs.Zstd(level=zstd.level).decode(raw) if zstd is not None else raw
        full = np.frombuffer(data, dtype=arr.dtype.newbyteorder("<")).reshape(arr.chunks)
        return full[lo - span.start:hi - span.start]

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:  # opening an array reads its metadata: once per store
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def __repr__(self) -> str:
        return (f"ActivationStore({self.url!r}, n_tokens={self.n_tokens}, d_model={self.d_model}, "
                f"dtype={self.dtype}, hooks={self.hooks})")


def _plain_codecs(arr: zarr.Array) -> bool:
    """Whether the array uses the codecs our writer uses (little-endian bytes, optionally zstd),
    which read_chunk decodes itself; anything else goes through zarr."""
    codecs = arr.metadata.codecs
    return (isinstance(codecs[0], BytesCodec) and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and len(codecs) <= 2 and (len(codecs) == 1 or isinstance(codecs[1], ZstdCodec)))


def _missing(store: ActivationStore, key: str, span: range) -> ChunkError:
    return ChunkError(
        f"chunk {key!r} of the store at {store.url!r} (rows {span.start}..{span.stop - 1}) is missing. "
        "Fix: re-cache the store, or let the loader skip missing chunks (skip_corrupt=True)", key, span)
