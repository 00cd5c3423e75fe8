"""The write side of the activation store: a fixed row layout that lets many workers fill
disjoint shards of one store without coordination, per-shard done markers that make writing
resumable, and a commit that makes the store readable only once every shard is in."""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zarr

from pipeline.errors import ConfigError, StoreError, StoreMismatchError
from pipeline.store import format as F
from pipeline.store.storage import Storage, is_transport_error


@dataclass(frozen=True)
class StoreLayout:
    """Where each row goes. Context c's rows start at c * rows_per_context, so any worker can
    place any shard; chunks hold whole contexts and shards hold whole chunks, so two workers
    never write the same chunk."""

    hooks: tuple[str, ...]
    d_model: int
    dtype: str
    n_contexts: int         # planned; the commit shrinks the arrays if the data ran out early
    rows_per_context: int
    shard_contexts: int
    chunk_contexts: int
    compressor: str = "blosc-lz4"
    modality: bool = False  # vision-language stores: an int8 `modality` array marks image rows
    checksum: bool = True   # every chunk ends with a CRC32C that zarr verifies on read (format.compressors)

    def __post_init__(self):
        F.check_dtype(self.dtype)
        F.compressors(self.compressor)
        if self.shard_contexts % self.chunk_contexts:
            raise ConfigError(f"shard_contexts={self.shard_contexts} must be a multiple of "
                              f"chunk_contexts={self.chunk_contexts} so that shards never share a chunk")
        if self.n_contexts < 1 or self.rows_per_context < 1:
            raise ConfigError(f"a store needs at least one context and one row per context, got "
                              f"n_contexts={self.n_contexts}, rows_per_context={self.rows_per_context}")

    @property
    def n_rows(self) -> int:
        return self.n_contexts * self.rows_per_context

    @property
    def chunk_rows(self) -> int:
        return self.chunk_contexts * self.rows_per_context

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_contexts / self.shard_contexts)

    def shard_contexts_range(self, shard: int) -> range:
        start = shard * self.shard_contexts
        return range(start, min(start + self.shard_contexts, self.n_contexts))


class ShardStats:
    """Running normalisation statistics of one hook in one shard, in float64. Rows whose norm
    exceeds `outlier_factor` x the median norm of the shard's first chunk (the massive
    activations at the first positions of a context) are counted but left out of the sums.
    Every row is finite: the shard refuses others before they get here (_ShardState._check_finite)."""

    def __init__(self, d_model: int, outlier_factor: float):
        self.outlier_factor = outlier_factor
        self.median_norm: float | None = None
        self.count = 0
        self.n_outliers = 0
        self.sum = np.zeros(d_model, dtype=np.float64)
        self.sum_sq_norm = 0.0
        self.sum_norm = 0.0

    def add(self, x: np.ndarray, norm: np.ndarray) -> None:
        if self.median_norm is None:
            self.median_norm = float(np.median(norm))
        keep = norm <= self.outlier_factor * self.median_norm
        self.n_outliers += int((~keep).sum())
        x, norm = x[keep].astype(np.float64), norm[keep].astype(np.float64)
        self.count += len(x)
        self.sum += x.sum(0)
        self.sum_sq_norm += float((norm ** 2).sum())
        self.sum_norm += float(norm.sum())

    def to_json(self) -> dict:
        return {"count": self.count, "n_outliers": self.n_outliers, "median_norm": self.median_norm,
                "sum": self.sum.tolist(), "sum_sq_norm": self.sum_sq_norm, "sum_norm": self.sum_norm}


def merge_stats(parts: list[dict], outlier_factor: float) -> dict:
    """Store-wide statistics from the shards' sums: what the trainer normalises with."""
    count = sum(p["count"] for p in parts)
    if count == 0:
        raise ConfigError("the store holds no rows: nothing to compute statistics from")
    medians = [p["median_norm"] for p in parts if p["median_norm"] is not None]
    mean = np.sum([p["sum"] for p in parts], axis=0) / count
    return {"count": count, "n_outliers": sum(p["n_outliers"] for p in parts),
            "outlier_factor": outlier_factor, "median_norm": float(np.mean(medians)),
            "mean": mean.tolist(), "mean_norm": sum(p["sum_norm"] for p in parts) / count,
            "mean_sq_norm": sum(p["sum_sq_norm"] for p in parts) / count}


class ActivationStoreWriter:
    """Creates (or reopens, to resume) a store and writes shards to it on a background thread,
    so that compression and I/O overlap the model's forward pass."""

    def __init__(self, url: str, layout: StoreLayout, header: dict, *, storage_options=None,
                 overwrite: bool = False, outlier_factor: float = 8.0, queue_size: int = 4):
        self.layout = layout
        self.outlier_factor = outlier_factor
        self.storage = Storage(url, storage_options)
        self.header = {"format": F.FORMAT_NAME, "version": F.FORMAT_VERSION, **header,
                       "layout": {**asdict(layout), "hooks": list(layout.hooks)},
                       "outlier_factor": outlier_factor}
        with self.storage.failures("creating or reopening the store"):
            self._open(overwrite)
        # Zarr skips chunks that hold only zeros (an all-text modality chunk, context 0's ids): write
        # them all, so that a reader can tell a lost chunk file from an all-zero chunk.
        self.arrays = {k: a.with_config({"write_empty_chunks": True}) for k, a in self.arrays.items()}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # -- creation ----------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        # One listing decides what is here. A concurrent worker of this store writes the group's
        # zarr.json (header included, atomically: a "*.partial" file then a rename) before anything
        # else, so a listing without it holds only that worker's write in flight or a foreign folder.
        entries = self.storage.fs.ls(self.storage.root, detail=False) if self.storage.check_access() else []
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in entries} - {""}
        names = {n for n in names if not n.endswith(".partial")}
        group = self.storage.open_group("r+") if "zarr.json" in names else None
        old = dict(group.attrs).get(F.HEADER_ATTR) if group is not None else None
        if old is not None and old.get("fingerprint") != self.header["fingerprint"]:
            if not overwrite:
                diff = _diff(old.get("config", {}), self.header.get("config", {}))
                raise StoreMismatchError(
                    f"the store at {self.storage.url!r} was written with a different configuration "
                    f"({'; '.join(diff) or 'layout differs'}). Fix: pass the same configuration to resume "
                    "it, choose another store URL, or set overwrite=true to replace it")
            self.storage.fs.rm(self.storage.root, recursive=True)
        elif old is None and names:
            if not overwrite:
                raise StoreMismatchError(
                    f"{self.storage.url!r} exists and is not an activation store; refusing to write into "
                    "it. Fix: choose another URL, or set overwrite=true to replace its contents")
            self.storage.fs.rm(self.storage.root, recursive=True)
        # A new group's metadata is written with the header in it: a concurrent worker of the same
        # store never sees a group without one (which it would refuse as "not an activation store").
        group = self.storage.open_group("a", attributes={F.HEADER_ATTR: self.header})
        self.group = group
        if old is not None and old.get("fingerprint") == self.header["fingerprint"]:
            names = _array_names(self.layout.hooks, self.layout.modality)
            self._create_arrays(group, [k for k in names if k not in group])  # a writer stopped while creating them
            self._resize(old, group)
            return
        # The header came first (above): a writer stopped while creating the arrays (killed, or the
        # storage failed) leaves a store that a rerun recognises as its own and completes.
        self.arrays = self._create_arrays(group, _array_names(self.layout.hooks, self.layout.modality))

    def _create_arrays(self, group: zarr.Group, names: list[str]) -> dict[str, zarr.Array]:
        lay = self.layout
        codec = F.compressors(lay.compressor, lay.checksum)
        rows = {"shape": (lay.n_rows,), "chunks": (lay.chunk_rows,), "compressors": codec}
        specs = {F.TOKENS: {"dtype": "int32", **rows}, F.CONTEXT: {"dtype": "int32", **rows},
                 F.POSITION: {"dtype": "int16", **rows}, F.MODALITY: {"dtype": "int8", **rows}}
        for hook in lay.hooks:
            specs[F.hook_path(hook, F.ACTS)] = {"shape": (lay.n_rows, lay.d_model), "dtype": F.STORAGE_DTYPES[lay.dtype],
                                                "chunks": (lay.chunk_rows, lay.d_model), "compressors": codec}
            specs[F.hook_path(hook, F.NORM)] = {"dtype": "float32", **rows}
        arrays = {}
        for name in names:
            try:
                arrays[name] = group.create_array(name, **specs[name])
            except zarr.errors.ContainsArrayError:  # a concurrent worker of this store (same fingerprint) made it
                arrays[name] = self.storage.open_array(group, name)
        return arrays

    def _resize(self, old: dict, group: zarr.Group) -> None:
        """Reopen a store of the same configuration, possibly planned to a different size: shards
        do not depend on the planned size, so a store can be extended with more tokens, or a
        running cache stopped early and committed at the size it reached."""
        names = _array_names(self.layout.hooks, self.layout.modality)
        self.arrays = {k: self.storage.open_array(group, k) for k in names}
        commit = dict(group.attrs).get(F.COMMIT_ATTR)
        if self.is_committed() and commit is not None:
            if self.layout.n_contexts == old["layout"]["n_contexts"]:
                return  # complete; the caller sees is_committed()
            if self.layout.n_contexts < commit["n_contexts"]:
                raise StoreMismatchError(
                    f"the store at {self.storage.url!r} is complete with {commit['n_tokens']} tokens; a smaller "
                    f"size ({self.layout.n_rows}) would discard data. Fix: keep n_tokens, choose another URL, or "
                    "set overwrite=true")
            self.storage.fs.rm(self.storage.path(F.COMMIT_MARKER))  # extending: no longer complete
        if self.arrays[F.TOKENS].shape[0] != self.layout.n_rows:
            if self.arrays[F.TOKENS].shape[0] > self.layout.n_rows:
                # shrinking deletes the rows of every shard beyond the new plan: their markers go
                # first, so that a later, larger plan computes them again instead of reading holes
                for k in (int(name.split(".")[0]) for name in self.storage.list_json(F.SHARD_MARKERS)):
                    if k >= self.layout.n_shards:
                        self.storage.fs.rm(self.storage.path(F.shard_marker(k)))
            for arr in self.arrays.values():
                arr.resize((self.layout.n_rows, *arr.shape[1:]))
        if old["layout"]["n_contexts"] != self.layout.n_contexts:
            group.attrs[F.HEADER_ATTR] = self.header

    # -- resumability --------------------------------------------------------------------------
    def finished_shards(self) -> set[int]:
        """Shards with a marker written for the shard's current extent (a marker of a shard that was
        the short last one of a smaller plan does not count once the plan grew)."""
        done = set()
        for name in self.storage.list_json(F.SHARD_MARKERS):
            k = int(name.split(".")[0])
            if k < self.layout.n_shards:
                marker = self.storage.read_json(F.shard_marker(k))
                if marker.get("planned", marker["contexts"]) == len(self.layout.shard_contexts_range(k)):
                    done.add(k)
        return done

    def is_committed(self) -> bool:
        return self.storage.read_json(F.COMMIT_MARKER) is not None

    # -- writing (producer side, called by the caching loop) ----------------------------------
    def begin_shard(self, shard: int) -> None:
        self._put(("begin", shard))

    def append(self, acts: dict[str, torch.Tensor], tokens: torch.Tensor, context: torch.Tensor,
               position: torch.Tensor, modality: torch.Tensor | None = None) -> None:
        """Rows of the current shard, in order. Tensors are moved to the CPU here, converted on the
        writer thread. `modality` (F.TEXT/F.IMAGE per row) is required by, and only kept in, stores
        whose layout has modality=True."""
        if self.layout.modality and modality is None:
            raise ValueError("this store marks each row's modality; pass modality= to append")
        if modality is None:
            modality = torch.zeros(len(tokens), dtype=torch.int8)
        # a blocking copy: a non-blocking one from a GPU lands in pinned memory later, and the writer
        # thread would convert whatever was there before it arrived
        self._put(("rows", {h: a.detach().to("cpu") for h, a in acts.items()},
                   tokens.cpu(), context.cpu(), position.cpu(), modality.cpu()))

    def end_shard(self, n_contexts: int) -> None:
        self._put(("end", n_contexts))

    def close(self) -> None:
        self._put(("stop",))
        self._thread.join()
        self._raise()

    def _put(self, item) -> None:
        self._raise()
        while True:  # a bounded queue applies back-pressure; poll so a dead writer is noticed
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise()
                if not self._thread.is_alive():
                    raise RuntimeError("store writer thread stopped unexpectedly")

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            state = None
            while True:
                item = self._queue.get()
                if item[0] == "stop":
                    return
                if item[0] == "begin":
                    state = _ShardState(item[1], self)
                elif item[0] == "rows":
                    state.add(*item[1:])
                elif item[0] == "end":
                    state.finish(item[1])
                    state = None
        except BaseException as exc:  # surfaced to the producer on its next call
            self._error = self.storage.access_error(exc, f"writing shard {state.shard if state else '?'}") \
                if is_transport_error(exc) else exc
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break


class _ShardState:
    """Buffers one shard's rows into whole chunks, writes them, and finally its done marker."""

    def __init__(self, shard: int, writer: ActivationStoreWriter):
        self.shard, self.w = shard, writer
        lay = writer.layout
        self.next_row = lay.shard_contexts_range(shard).start * lay.rows_per_context
        self.rows_written = 0
        self.buf: list[tuple] = []
        self.buffered = 0
        self.stats = {h: ShardStats(lay.d_model, writer.outlier_factor) for h in lay.hooks}

    def add(self, acts, tokens, context, position, modality) -> None:
        self.buf.append((acts, tokens, context, position, modality))
        self.buffered += len(tokens)
        while self.buffered >= self.w.layout.chunk_rows:
            self._flush(self.w.layout.chunk_rows)

    def _flush(self, n: int) -> None:
        parts = self.buf
        cat = lambda i: torch.cat([p[i] for p in parts])  # noqa: E731
        tokens, context, position, modality = cat(1), cat(2), cat(3), cat(4)
        acts = {h: torch.cat([p[0][h] for p in parts]) for h in self.w.layout.hooks}
        self.buf = [({h: a[n:] for h, a in acts.items()}, tokens[n:], context[n:], position[n:], modality[n:])] \
            if len(tokens) > n else []
        self.buffered = len(tokens) - n
        dtype = self.w.layout.dtype
        stored = {h: F.encode(a[:n], dtype) for h, a in acts.items()}
        seen = {h: F.decode(x, dtype) for h, x in stored.items()}  # what readers will see
        for h, x in seen.items():
            self._check_finite(h, acts[h][:n], x)
        sl = slice(self.next_row, self.next_row + n)
        arrays = self.w.arrays
        arrays[F.TOKENS][sl] = tokens[:n].numpy().astype(np.int32)
        arrays[F.CONTEXT][sl] = context[:n].numpy().astype(np.int32)
        arrays[F.POSITION][sl] = position[:n].numpy().astype(np.int16)
        if F.MODALITY in arrays:
            arrays[F.MODALITY][sl] = modality[:n].numpy().astype(np.int8)
        for h, x in seen.items():
            norm = x.norm(dim=1).numpy()
            arrays[F.hook_path(h, F.ACTS)][sl] = stored[h]
            arrays[F.hook_path(h, F.NORM)][sl] = norm
            self.stats[h].add(x.numpy(), norm)
        self.next_row += n
        self.rows_written += n

    def _check_finite(self, hook: str, given: torch.Tensor, seen: torch.Tensor) -> None:
        """Refuses the shard if a row holds a NaN or infinite value. Dropping such rows instead
        would leave holes in the fixed row layout that every reader relies on, and keeping them
        poisons the statistics (a NaN median turns the norm rule off for the whole store)."""
        bad = ~torch.isfinite(seen).all(dim=1)
        if not bad.any():
            return
        rows = (self.next_row + torch.nonzero(bad).flatten()).tolist()
        if torch.isfinite(given[bad]).all():  # finite in the model, out of range once stored
            cause = f"finite in the model's output, out of the range of store.dtype={self.w.layout.dtype}"
            fix = "store.dtype=bfloat16 or store.dtype=float32"
        else:
            cause = "already in the model's output"
            fix = "run the model in float32 (model.dtype=float32) and check its weights and inputs"
        raise StoreError(
            f"shard {self.shard} of the store at {self.w.storage.url!r} was not written: hook {hook!r} gave "
            f"{len(rows)} row(s) with a NaN or infinite value among store rows {self.next_row}.."
            f"{self.next_row + len(seen) - 1} ({', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}; "
            f"{cause}). Fix: {fix}")

    def finish(self, n_contexts: int) -> None:
        if self.buffered:
            self._flush(self.buffered)
        expected = n_contexts * self.w.layout.rows_per_context
        if self.rows_written != expected:
            raise RuntimeError(f"shard {self.shard}: wrote {self.rows_written} rows, expected {expected}")
        self.w.storage.write_json(F.shard_marker(self.shard), {
            "shard": self.shard, "contexts": n_contexts, "rows": self.rows_written,
            "planned": len(self.w.layout.shard_contexts_range(self.shard)),
            "fingerprint": self.w.header["fingerprint"],
            "stats": {h: s.to_json() for h, s in self.stats.items()}})


def commit(writer: ActivationStoreWriter) -> dict | None:
    """Commit the store if every shard is in; returns the commit record, or None if shards are
    missing. Idempotent: several workers may race to commit and write the same record."""
    with writer.storage.failures("committing the store"):
        return _commit(writer)


def _commit(writer: ActivationStoreWriter) -> dict | None:
    lay, storage = writer.layout, writer.storage
    done = writer.finished_shards()
    if len(done) < lay.n_shards:
        return None
    markers = [storage.read_json(F.shard_marker(k)) for k in range(lay.n_shards)]
    contexts = [m["contexts"] for m in markers]
    for k, c in enumerate(contexts[:-1]):  # only the end of the data may be short
        if c < len(lay.shard_contexts_range(k)) and any(contexts[k + 1:]):
            raise RuntimeError(f"shard {k} is short ({c} contexts) but later shards hold data; "
                               "the data source is not deterministic")
    n_contexts = sum(contexts)
    if n_contexts == 0:
        from pipeline.errors import EmptyDataError
        raise EmptyDataError(f"no contexts were written to {storage.url!r}: the data source is empty")
    # A version that accepted non-finite rows left a NaN median in the marker of a shard that held one.
    poisoned = [k for k, m in enumerate(markers) if any(
        s["median_norm"] is not None and not math.isfinite(s["median_norm"]) for s in m["stats"].values())]
    if poisoned:
        raise StoreError(
            f"shard(s) {poisoned} of the store at {storage.url!r} have a non-finite median norm (written by a "
            "version that accepted NaN or infinite rows). Fix: delete "
            f"{', '.join(storage.path(F.shard_marker(k)) for k in poisoned)} and rerun the caching command: each "
            "shard is rewritten, or refused with its non-finite rows named")
    n_rows = n_contexts * lay.rows_per_context
    if n_rows < lay.n_rows:  # the data ran out before the planned size
        for arr in writer.arrays.values():
            arr.resize((n_rows, *arr.shape[1:]))
    record = {"n_tokens": n_rows, "n_contexts": n_contexts,
              "stats": {h: merge_stats([m["stats"][h] for m in markers], writer.outlier_factor)
                        for h in lay.hooks}}
    writer.group.attrs[F.COMMIT_ATTR] = record
    storage.write_json(F.COMMIT_MARKER, {"n_tokens": n_rows, "fingerprint": writer.header["fingerprint"]})
    return record


def _array_names(hooks, modality: bool = False) -> list[str]:
    return [F.TOKENS, F.CONTEXT, F.POSITION] + ([F.MODALITY] if modality else []) + \
        [F.hook_path(h, leaf) for h in hooks for leaf in (F.ACTS, F.NORM)]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: store has {a!r}, config has {b!r}")
    return out
