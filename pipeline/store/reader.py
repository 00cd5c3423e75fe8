"""The read side of the activation store: open a committed store and read rows."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import google_crc32c
import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from pipeline.errors import ConfigError, StoreError, StoreIncompleteError
from pipeline.store import format as F
from pipeline.store.storage import Storage, is_transport_error

log = logging.getLogger("pipeline.store")


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
        # Written with chunk checksums, and with every chunk (all-zero ones included) as a file.
        self.checksum: bool = bool(meta["layout"].get("checksum"))
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
        group = storage.open_group("r")
        attrs = dict(group.attrs)
        meta, commit = attrs.get(F.HEADER_ATTR), attrs.get(F.COMMIT_ATTR)
        if meta is None or commit is None or meta.get("format") != F.FORMAT_NAME:
            raise StoreError(f"{url!r} has a commit marker but its metadata file {storage.path('zarr.json')!r} "
                             "holds no activation-store header. Fix: restore the file from a copy of the store, or "
                             "delete the store and rerun the caching stage")
        if meta.get("version") != F.FORMAT_VERSION:
            raise StoreError(f"{url!r} has store format version {meta.get('version')}; this pipeline "
                             f"reads version {F.FORMAT_VERSION}. Fix: re-cache with this version")
        store = cls(storage, group, meta, commit)
        store._warn_if_unchecked()
        return store

    def _warn_if_unchecked(self) -> None:
        """Says once, when the store is opened, what this store cannot guarantee."""
        if not self.checksum:
            log.warning("the store at %r has no chunk checksums (written with store.checksum=false, or before "
                        "checksums existed): a corrupt chunk may be read as wrong values without an error. Fix: "
                        "re-cache it to add them", self.url)
        for hook, st in self.stats.items():
            if not (math.isfinite(st.median_norm) and torch.isfinite(st.mean).all()):
                log.warning("the store at %r has non-finite statistics for hook %r (median_norm=%s; written by a "
                            "version that accepted NaN or infinite rows): normalisation and exclude_norm_factor "
                            "cannot work. Fix: re-cache it", self.url, hook, st.median_norm)

    def hook(self, hook: str | None = None) -> str:
        if hook is None:
            if len(self.hooks) != 1:
                raise ConfigError(f"the store at {self.url!r} holds hooks {self.hooks}; name one")
            return self.hooks[0]
        if hook not in self.hooks:
            raise ConfigError(f"hook {hook!r} is not in the store at {self.url!r}; it holds {self.hooks}")
        return hook

    def array(self, name: str) -> zarr.Array:
        return self._array(name)

    def acts(self, start: int, stop: int, hook: str | None = None) -> torch.Tensor:
        """Rows [start, stop) of a hook's activations as float32."""
        return F.decode(self._rows(F.hook_path(self.hook(hook), F.ACTS), start, stop), self.dtype)

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows(F.TOKENS, start, stop, required=False)

    def contexts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows(F.CONTEXT, start, stop, required=False)

    def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows(F.POSITION, start, stop, required=False)

    @property
    def has_modality(self) -> bool:
        """Whether the store marks each row as text or image (a vision-language model's store)."""
        return bool(self.meta["layout"].get("modality"))

    def modality(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int8 [rows]: F.TEXT (0) or F.IMAGE (1) per row; all text for a store without the array."""
        if not self.has_modality:
            stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
            return np.full(max(stop - start, 0), F.TEXT, dtype=np.int8)
        return self._rows(F.MODALITY, start, stop, required=False)

    def _rows(self, name: str, start: int, stop: int | None, required: bool = True) -> np.ndarray:
        """Rows [start, stop) of array `name`, read chunk by chunk so that a bad chunk raises a
        ChunkError naming it (`required`: see read_chunk)."""
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        arr = self._array(name)
        out = np.empty((max(stop - start, 0), *arr.shape[1:]), dtype=arr.dtype)
        for chunk in range(start // self.chunk_rows, math.ceil(stop / self.chunk_rows)):
            span = self.chunk_span(chunk)
            lo, hi = max(start, span.start), min(stop, span.stop)
            self.read_chunk(name, chunk, lo, hi, required, out=out[lo - start:hi - start])
        return out

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
        into it). Zarr reads a missing chunk as zeros, so this raises ChunkError instead, for any
        array of a store with checksums (whose writer writes every chunk) and for `required`
        arrays of older stores (activations and norms are never all zeros, the only chunks that
        zarr leaves unwritten); a chunk that does not decode or fails its checksum raises
        ChunkError too. Both name the zarr key and the rows."""
        required = required or self.checksum
        span = self.chunk_span(chunk)
        lo, hi = span.start if lo is None else lo, span.stop if hi is None else hi
        key, arr = self.chunk_key(name, chunk), self._array(name)
        try:
            data = self._read_rows(arr, key, span, lo, hi, required, out)
        except ChunkError:  # a missing chunk
            raise
        except Exception as exc:
            if is_transport_error(exc):  # the storage failing is not the chunk's fault: never skipped
                raise self.storage.access_error(exc, f"reading chunk {key!r} (rows {span.start}..{span.stop - 1})") \
                    from exc
            # a checksum mismatch, a wrong size, any codec's error (blosc: SystemError)
            raise ChunkError(f"chunk {key!r} of the store at {self.url!r} (rows {span.start}..{span.stop - 1}) "
                             f"is corrupt ({type(exc).__name__}: {exc}). {self._fix(span)}", key, span) from exc
        if out is not None and data is not out:
            out[...] = data
            return out
        return data

    def _read_rows(self, arr, key, span, lo, hi, required, out):
        path = self.storage.path(key)
        decoder = _decoder(arr)
        if decoder is _ZARR:  # zarr decodes; it needs a second request to tell missing
            if required and not self.storage.fs.exists(path):
                raise _missing(self, key, span)
            return arr[lo:hi]
        try:  # one GET, decoded here
            raw = self.storage.fs.cat_file(path)
        except FileNotFoundError:
            if required:
                raise _missing(self, key, span) from None
            return np.full((hi - lo, *arr.shape[1:]), arr.metadata.fill_value, dtype=arr.dtype)
        if isinstance(arr.metadata.codecs[-1], Crc32cCodec):
            raw = _checked(raw)
        if decoder is _DECODERS[BloscCodec]:
            _check_blosc_size(raw)
        whole = out is not None and (lo, hi) == (span.start, span.start + arr.chunks[0])
        if decoder is not None and whole and out.dtype == arr.dtype and out.flags.c_contiguous:
            return decoder.decode(raw, out=out)  # no copy, no temporary
        data = decoder.decode(raw) if decoder is not None else raw
        full = np.frombuffer(data, dtype=arr.dtype.newbyteorder("<")).reshape(arr.chunks)
        return full[lo - span.start:hi - span.start]

    def _fix(self, span: range) -> str:
        """The fix for a bad chunk holding store rows `span`: its shard rewritten by the writer,
        which rewrites any shard without a marker (docs/store-format.md), or skipped in training."""
        lay = self.meta["layout"]
        shard = span.start // (lay["rows_per_context"] * lay["shard_contexts"])
        return (f"Fix: delete {self.storage.path(F.shard_marker(shard))!r} and {self.storage.path(F.COMMIT_MARKER)!r}, "
                "then rerun the caching command that wrote the store (it rewrites that shard and commits); or, to "
                "train without those rows, data.skip_corrupt=true")

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:  # opening an array reads its metadata: once per store
            self._arrays[name] = self.storage.open_array(self.group, name)
        return self._arrays[name]

    def __repr__(self) -> str:
        return (f"ActivationStore({self.url!r}, n_tokens={self.n_tokens}, d_model={self.d_model}, "
                f"dtype={self.dtype}, hooks={self.hooks})")


# The compressors whose chunks read_chunk decodes itself, with one GET and straight into the caller's
# buffer: 2-4x faster than zarr's path (here, 4.7 MB blosc-lz4 chunks). Both read what they need
# (level, shuffle, type size) from the header in the compressed bytes.
_DECODERS = {ZstdCodec: numcodecs.Zstd(), BloscCodec: numcodecs.Blosc()}
_ZARR = object()  # chunks that go through zarr


def _decoder(arr: zarr.Array):
    """For the codecs our writer uses (little-endian bytes, then at most one compressor of
    _DECODERS, then optionally crc32c), the compressor's decoder or None; otherwise _ZARR."""
    codecs = list(arr.metadata.codecs)
    if isinstance(codecs[-1], Crc32cCodec):
        codecs.pop()
    first, rest = codecs[0], codecs[1:]
    little = isinstance(first, BytesCodec) and (first.endian is None or first.endian.value == "little")
    if not little or len(rest) > 1:
        return _ZARR
    return _DECODERS.get(type(rest[0]), _ZARR) if rest else None


def _checked(raw: bytes) -> np.ndarray:
    """A chunk's bytes before its trailing CRC32C, once they match it (what zarr's Crc32cCodec
    checks; numpy rather than a slice of `raw`, which would copy the chunk)."""
    body = np.frombuffer(raw, dtype=np.uint8)[:-4]
    if len(raw) < 4 or google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
        raise ValueError("its CRC32C checksum does not match its bytes")
    return body


def _check_blosc_size(raw) -> None:
    """Blosc takes a chunk's size from its header (bytes 12-16) and decodes a truncated chunk by
    reading past its end, usually without an error: refuse one (in stores without checksums)."""
    size = int.from_bytes(bytes(raw[12:16]), "little") if len(raw) >= 16 else None
    if size != len(raw):
        raise ValueError(f"its blosc header gives its size as {size} bytes, but it has {len(raw)}")


def _missing(store: ActivationStore, key: str, span: range) -> ChunkError:
    return ChunkError(f"chunk {key!r} of the store at {store.url!r} (rows {span.start}..{span.stop - 1}) is "
                      f"missing. {store._fix(span)}", key, span)
