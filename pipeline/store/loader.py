"""Shuffled, rank-aware, prefetching batches of activations from one or several stores.

Which rows a batch holds is a pure function of (seed, epoch, dp_rank, the stores and the settings
that shape batches), never of timing, threads or how far the loader ran before, so a loader
restored from `state_dict()` continues with exactly the batch an uninterrupted one would have
yielded:

1. Epoch plan. The chunks of all stores (with `weights`, a weighted share of each store's chunks,
   drawn from a per-store cycle of permutations) are permuted with a generator seeded by
   (seed, epoch), the same on every rank.
2. Dealing. The permutation is cut into rounds of dp_size chunks and rank r takes the r-th chunk
   of each round. A round whose chunks differ in length (one holds a store's short last chunk, or
   it is the incomplete last round) is split by rows instead, so the ranks' row counts in an epoch
   differ by at most one and no row is dropped or read twice.
3. Windows. Each rank's chunks are grouped, in order, into windows of about `shuffle_buffer` rows.
   Background threads read and decompress a window's chunks into one buffer while the previous
   window is being batched; the window's rows are then permuted by a generator seeded by
   (seed, epoch, dp_rank, window).
4. Batches. The permuted windows of an epoch, less the rows that the exclusion rules drop, are
   concatenated and cut into `batch_size` rows; a batch may span two windows, never two epochs.
   The loader thread gathers them (and converts them to float32 unless they go to a GPU, which
   converts them after a half-size copy), so the training thread only takes finished batches.

The state is (epoch, window, offset in the window) rather than a batch index, because exclusions
make a window's length known only once it is read: resuming reads one window again, not the
epoch from its start.

Trade-off of the windowed shuffle: a streaming shuffle buffer (each incoming row replaces a random
slot) mixes rows over a longer, fuzzier horizon, but its state is the buffer itself (gigabytes to
checkpoint, or a replay from the start of the epoch to resume). Here rows only mix inside a window,
which holds rows of shuffle_buffer / chunk_rows chunks drawn from anywhere in the stores (two rows
of a batch share a context with probability about 1 / contexts-per-window), and the whole state is
(epoch, window, offset): a few integers in the training checkpoint.

Feature-parallel ranks of one replica pass the same seed and dp_rank: they compute the same plan
and read the same chunks, so their batches are bit-identical without any communication. We chose
this over one rank reading and broadcasting because it needs no collective, no extra traffic on
the interconnect the sharded SAE already uses for its own reductions, and no synchronisation
point in which a slow read on one rank stalls the others; what it costs is that each
feature-parallel rank reads (and decompresses) the same bytes, on background threads.
benchmarks/loader_throughput.py measures both (BENCHMARKS.md): here a gloo broadcast of one
4096 x 576 float32 batch took ~5 ms on the training thread, reading it took ~14 ms of loader
threads' time; both are under 0.5% of a 3.4 s training step. Should storage bandwidth ever be
the limit (each feature-parallel rank multiplies the bytes read), broadcasting is the fallback.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.store import format as F
from pipeline.store.reader import ActivationStore, ChunkError

log = logging.getLogger("pipeline.store")

# Tags that keep the seeded streams independent of one another.
_EPOCH, _STORE_CYCLE, _WINDOW = 0, 1, 2
_END = object()
_NO_COUNTS = {"position": 0, "norm": 0, "skipped": 0}
# torch twins of format.STORAGE_DTYPES, for buffers that numpy fills (bfloat16 travels as its bits)
_TORCH_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.uint16}


class Batch(NamedTuple):
    """A batch with the identity of each row, yielded when the loader has `with_ids=True`."""

    acts: torch.Tensor       # [n, d_model] float32 on the loader's device
    tokens: torch.Tensor     # [n] int32 token ids
    contexts: torch.Tensor   # [n] int32 context index inside its store
    positions: torch.Tensor  # [n] int16 position inside the context
    stores: torch.Tensor     # [n] int16 index of the store in the loader's list
    rows: torch.Tensor       # [n] int64 row index inside its store


class Interrupted(Exception):
    """The wait for a batch ended because the loader's `interrupt` event was set."""


@dataclass(frozen=True)
class _Cursor:
    """Where the next batch starts: row `offset` of permuted window `window` of `epoch`. `counts`
    are the exclusions and skips of the windows before that one."""

    epoch: int = 0
    window: int = 0
    offset: int = 0
    batch: int = 0
    counts: dict = field(default_factory=lambda: dict(_NO_COUNTS))


@dataclass(frozen=True)
class _Plan:
    """One rank's share of one epoch."""

    segments: np.ndarray   # [n, 4] int64: store, chunk, first row, end row (store rows)
    windows: np.ndarray    # [n_windows + 1]: index of each window's first segment
    rank_rows: np.ndarray  # [dp_size]: rows each rank gets in this epoch

    @property
    def n_windows(self) -> int:
        return len(self.windows) - 1


class ActivationLoader:
    """Iterates over `[batch_size, d_model]` float32 batches of activations.

    Parameters
    ----------
    stores : ActivationStore, str, or a sequence of them
        The stores to read (URLs are opened with `storage_options`). Several stores are read as
        one; they must hold the same d_model.
    batch_size : int
        Rows per batch. The last batch of an epoch is shorter unless `drop_last`.
    hook : str, optional
        Which hook's activations to read; may be omitted for stores that hold one hook.
    seed : int
        Seeds the chunk permutation and the shuffle; the same seed gives the same batches.
    dp_rank, dp_size : int
        Data-parallel rank and world size: each rank gets a disjoint share of every epoch.
        Feature-parallel ranks of one replica pass the same dp_rank and get identical batches.
    shuffle_buffer : int
        Rows shuffled together (a window). About (prefetch + 2) x this many rows are held in memory
        in the stores' dtype: the window being batched, the one before it, `prefetch` being read.
    prefetch : int
        Windows read ahead of the one being batched (whatever its size, reading runs a window
        ahead; more smooths out slow reads).
    prefetch_batches : int
        Finished batches queued for the training thread.
    num_workers : int
        Threads that read and decompress chunks.
    epochs : int or None
        Passes over the data (None: repeat forever). Within an epoch no row is repeated
        (unless `weights` up-weight a store beyond its size).
    drop_last : bool
        Drop each epoch's short last batch. Without exclusion rules every rank then yields the
        same number of batches (`batches_in_epoch`), which keeps data-parallel ranks in step.
        An epoch that would yield a rank no batch at all (with drop_last, fewer rows than a batch)
        raises ConfigError: at construction when that is known from the stores' sizes, else at the
        end of the first such epoch, rather than reading epoch after epoch for nothing.
    device : str or torch.device
        Where batches go. On CUDA, batches are built in pinned memory and copied non-blocking.
    skip_corrupt : bool
        Skip chunks that are missing, fail their checksum or do not decode (each logged, counted in
        `skipped`) instead of raising ChunkError. Skipping is local to a rank: ranks may then yield
        different numbers of batches.
    expected_d_model, expected_dtype : optional
        What the trainer expects; a store that differs raises ConfigError.
    exclude_positions_below : int
        Drop rows whose position in their context is below this (0 keeps all).
    exclude_norm_factor : float or None
        Drop rows whose norm exceeds this multiple of their store's median norm (the massive
        activations of the first tokens); None keeps all. Exclusions are counted in `excluded`.
        Rows whose norm is not finite (NaN or inf values, which only stores written before the
        writer refused them hold) are excluded and counted by this rule too.
    weights : sequence of float, optional
        Mixing weights of the stores: an epoch then draws about weight / sum(weights) of its rows
        from each store (cycling through a store's chunks across epochs). Default: every chunk of
        every store once per epoch.
    with_ids : bool
        Yield `Batch` tuples (activations with token ids, contexts, positions, store index and store
        row) instead of bare tensors.
    interrupt : threading.Event, optional
        Set (e.g. by a signal handler) while the caller waits for a batch, it ends the wait within
        a second with `Interrupted`; the position is kept, so a new iteration yields that batch.
    storage_options : dict, optional
        fsspec options for stores given as URLs.
    """

    def __init__(self, stores: ActivationStore | str | Sequence[ActivationStore | str], batch_size: int, *,
                 hook: str | None = None, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 shuffle_buffer: int = 2 ** 17, prefetch: int = 1, prefetch_batches: int = 2,
                 num_workers: int = 4, epochs: int | None = 1, drop_last: bool = False,
                 device: str | torch.device = "cpu", skip_corrupt: bool = False,
                 expected_d_model: int | None = None, expected_dtype: str | None = None,
                 exclude_positions_below: int = 0, exclude_norm_factor: float | None = None,
                 weights: Sequence[float] | None = None, with_ids: bool = False,
                 interrupt: threading.Event | None = None, storage_options: dict | None = None):
        if isinstance(stores, (str, ActivationStore)):
            stores = [stores]
        self.stores = [s if isinstance(s, ActivationStore) else ActivationStore.open(s, storage_options)
                       for s in stores]
        _check_args(batch_size=batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                    shuffle_buffer=shuffle_buffer, prefetch=prefetch, prefetch_batches=prefetch_batches,
                    num_workers=num_workers, epochs=epochs, n_stores=len(self.stores), weights=weights,
                    exclude_positions_below=exclude_positions_below, exclude_norm_factor=exclude_norm_factor)
        self.d_model = _check_stores(self.stores, expected_d_model, expected_dtype)
        self.batch_size, self.seed, self.dp_rank, self.dp_size = batch_size, seed, dp_rank, dp_size
        self.shuffle_buffer, self.prefetch, self.prefetch_batches = shuffle_buffer, prefetch, prefetch_batches
        self.num_workers, self.epochs, self.drop_last = num_workers, epochs, drop_last
        self.skip_corrupt, self.with_ids, self.interrupt = skip_corrupt, with_ids, interrupt
        self.exclude_positions_below, self.exclude_norm_factor = exclude_positions_below, exclude_norm_factor
        self.weights = None if weights is None else [float(w) for w in weights]
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self.hooks = [s.hook(hook) for s in self.stores]
        self._acts = [F.hook_path(h, F.ACTS) for h in self.hooks]
        dtypes = {s.dtype for s in self.stores}
        # The window buffer keeps the stored dtype (half the memory of float32) unless stores differ.
        self._buf_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
        self._draws = self._weighted_draws()
        self._cursor = _Cursor()
        self._counts = dict(_NO_COUNTS)
        self._running: tuple[threading.Event, threading.Thread] | None = None
        self._plans: dict[int, _Plan] = {}
        self._plan_lock = threading.Lock()
        rank_rows = self.plan(0).rank_rows
        if rank_rows.min() < (batch_size if drop_last else 1):  # no batch at all: refused before any read
            raise self._too_few_rows(0, int(rank_rows.argmin()), int(rank_rows.min()), dict(_NO_COUNTS))

    # -- what the trainer reads --------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Chunks skipped as missing or corrupt (with skip_corrupt=True) in the windows that the
        yielded batches came from; kept across state_dict / load_state_dict."""
        return self._counts["skipped"]

    @property
    def excluded(self) -> dict[str, int]:
        """Rows dropped by each exclusion rule ("position", "norm") in the windows that the yielded
        batches came from; kept across state_dict / load_state_dict."""
        return {k: self._counts[k] for k in ("position", "norm")}

    def batches_in_epoch(self, epoch: int = 0) -> int:
        """Batches this rank yields in `epoch`; exact without exclusion rules and skipped chunks
        (they can only make it smaller). With drop_last it is the same on every rank."""
        rows = self.plan(epoch).rank_rows
        if self.drop_last:
            return int(rows.min()) // self.batch_size
        return -(-int(rows[self.dp_rank]) // self.batch_size)

    def _too_few_rows(self, epoch: int, rank: int, kept: int, dropped: dict) -> ConfigError:
        """The error for an epoch that gives a rank no batch (`kept` rows, with drop_last fewer than
        a batch): iterating on would read epoch after epoch and yield nothing, forever."""
        why = {"position": "excluded by exclude_positions_below", "norm": "excluded by exclude_norm_factor",
               "skipped": "chunk(s) skipped as corrupt"}
        after = ", ".join(f"{n} {why[k]}" for k, n in dropped.items() if n)
        return ConfigError(
            f"epoch {epoch} gives data-parallel rank {rank} (of {self.dp_size}) {kept} rows"
            f"{f' ({after})' if after else ''}, fewer than one batch of {self.batch_size} rows"
            f"{' per rank' if self.dp_size > 1 else ''}, so it would yield no batch (the stores hold "
            f"{sum(s.n_tokens for s in self.stores)} rows). Fix: a smaller batch_size, more tokens in the store "
            "(cache more), fewer data-parallel ranks, or looser exclusion rules")

    # -- planning: pure functions of (seed, epoch, rank) ---------------------------------------------
    def plan(self, epoch: int) -> _Plan:
        """This rank's segments and windows in `epoch` (the last two epochs' plans are cached)."""
        with self._plan_lock:  # asked for by the loader thread and by batches_in_epoch
            if epoch not in self._plans:
                if len(self._plans) >= 2:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = self._make_plan(epoch)
            return self._plans[epoch]

    def _make_plan(self, epoch: int) -> _Plan:
        items = self._epoch_chunks(epoch)
        chunk_rows = np.array([s.chunk_rows for s in self.stores], dtype=np.int64)[items[:, 0]]
        n_tokens = np.array([s.n_tokens for s in self.stores], dtype=np.int64)[items[:, 0]]
        first = items[:, 1] * chunk_rows
        seg, rank_rows = deal(np.minimum(chunk_rows, n_tokens - first), self.dp_rank, self.dp_size)
        i = seg[:, 0]
        segments = np.stack([items[i, 0], items[i, 1], first[i] + seg[:, 1], first[i] + seg[:, 2]], 1)
        rows = segments[:, 3] - segments[:, 2]
        window_id = (np.cumsum(rows) - rows) // self.shuffle_buffer  # by the row each segment starts at
        windows = np.concatenate([[0], np.flatnonzero(np.diff(window_id)) + 1, [len(segments)]])
        return _Plan(segments, windows.astype(np.int64) if len(segments) else np.zeros(1, np.int64), rank_rows)

    def _weighted_draws(self) -> list[int] | None:
        """Chunks drawn from each store per epoch when weights are given."""
        if self.weights is None:
            return None
        total = sum(s.n_tokens for s in self.stores)
        return [max(1, round(w / sum(self.weights) * total / s.chunk_rows))
                for w, s in zip(self.weights, self.stores)]

    def _epoch_chunks(self, epoch: int) -> np.ndarray:
        """[n, 2] (store, chunk) in the order of the epoch's permutation (the same on all ranks)."""
        parts = []
        for s, st in enumerate(self.stores):
            n = st.n_chunks
            if self._draws is None:
                chunks = np.arange(n)
            else:  # positions epoch*k .. (epoch+1)*k of an endless sequence of permutations
                k = self._draws[s]
                cycle, index = np.divmod(np.arange(epoch * k, (epoch + 1) * k), n)
                chunks = np.empty(k, dtype=np.int64)
                for c in np.unique(cycle):
                    chunks[cycle == c] = _rng(self.seed, _STORE_CYCLE, s, c).permutation(n)[index[cycle == c]]
            parts.append(np.stack([np.full(len(chunks), s), chunks], 1))
        items = np.concatenate(parts).astype(np.int64)
        return items[_rng(self.seed, _EPOCH, epoch).permutation(len(items))]

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor | Batch]:
        """Batches from the current position on; the reader threads start at once."""
        self.close()
        stop, q = threading.Event(), queue.Queue(self.prefetch_batches)
        thread = threading.Thread(target=self._produce, args=(self._cursor, q, stop),
                                  name="activation-loader", daemon=True)
        self._running = (stop, thread)
        thread.start()
        return self._consume(q, stop, thread)

    def _consume(self, q: queue.Queue, stop: threading.Event, thread: threading.Thread):
        try:
            while True:
                try:
                    item = q.get(timeout=1.0)
                except queue.Empty:
                    if self.interrupt is not None and self.interrupt.is_set():
                        raise Interrupted("the wait for a batch was interrupted") from None
                    if not thread.is_alive() and q.empty():
                        raise RuntimeError("the loader thread stopped without a result") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                acts, ids, cursor, counts = item
                self._cursor, self._counts = cursor, counts  # the state after this batch
                if self._pin:  # stored dtype in pinned memory: copy, then convert on the GPU
                    if self._buf_dtype == "bfloat16":
                        acts = acts.view(torch.bfloat16)
                    acts = acts.to(self.device, non_blocking=True).float()
                elif self.device.type != "cpu":
                    acts = acts.to(self.device)
                yield Batch(acts, *ids) if self.with_ids else acts
        finally:
            stop.set()

    def close(self) -> None:
        """Stop the background threads of a running iteration (the position is kept)."""
        if self._running is not None:
            stop, thread = self._running
            stop.set()
            thread.join(timeout=30)
            self._running = None

    def _produce(self, start: _Cursor, q: queue.Queue, stop: threading.Event) -> None:
        """The loader thread: waits for windows and cuts them into batches."""
        pool = _ReadPool(self.num_workers, "activation-loader-read")
        buffers = _Buffers(self.shuffle_buffer + max(s.chunk_rows for s in self.stores), self.d_model,
                           F.STORAGE_DTYPES[self._buf_dtype])
        live: deque[_Window] = deque()  # windows whose rows may still go into a batch
        scratch = np.empty((self.batch_size, self.d_model), F.STORAGE_DTYPES[self._buf_dtype])  # reused
        try:
            batch, counts = start.batch, dict(start.counts)
            epoch_counts, kept = counts, 0  # counts before this epoch, rows it kept
            pieces: list[tuple[_Window, int, int]] = []
            have = 0
            for win in self._windows(start, pool, stop, buffers):
                if isinstance(win, int):  # epoch `win` is over: its short last batch, then the next
                    short = have and not self.drop_last
                    if batch == 0 and not short:  # refused rather than reading epoch after epoch for nothing
                        raise self._too_few_rows(win, self.dp_rank, kept,
                                                 {k: counts[k] - epoch_counts[k] for k in counts})
                    if short and not _put(q, stop, self._batch(pieces, _Cursor(win + 1, counts=counts), counts,
                                                               scratch)):
                        return
                    batch, pieces, have, epoch_counts, kept = 0, [], 0, counts, 0
                    _release(live, buffers, keep=False)
                    continue
                if not win.finish(stop):
                    return
                kept += len(win.perm)
                _release(live, buffers, keep=len(pieces) > 0)
                live.append(win)
                base, counts = counts, _add(counts, win.counts)
                pos = start.offset if (win.epoch, win.index) == (start.epoch, start.window) else 0
                limit = self.batches_in_epoch(win.epoch) if self.drop_last and not self._excludes() else None
                while pos < len(win.perm) and (limit is None or batch < limit):
                    take = min(self.batch_size - have, len(win.perm) - pos)
                    pieces.append((win, pos, pos + take))
                    have, pos = have + take, pos + take
                    if have == self.batch_size:
                        cursor = _Cursor(win.epoch, win.index, pos, batch + 1, base) if pos < len(win.perm) \
                            else _Cursor(win.epoch, win.index + 1, 0, batch + 1, counts)
                        if not _put(q, stop, self._batch(pieces, cursor, counts, scratch)):
                            return
                        pieces, have, batch = [], 0, batch + 1
                        _release(live, buffers, keep=True)
            _put(q, stop, _END)
        except BaseException as exc:  # handed to the training thread, which raises it
            _put(q, stop, exc)
        finally:
            pool.shutdown()

    def _windows(self, start: _Cursor, pool: "_ReadPool", stop: threading.Event, buffers: "_Buffers"):
        """Windows from `start` on, each epoch followed by its number: the first yielded is being
        read, and `prefetch` more behind it, across epoch ends too."""
        ahead: deque[_Window | int] = deque()
        epochs = itertools.count(start.epoch) if self.epochs is None else range(start.epoch, self.epochs)
        for epoch in epochs:
            plan = self.plan(epoch)
            for w in range(start.window if epoch == start.epoch else 0, plan.n_windows):
                if stop.is_set():
                    return
                segments = plan.segments[plan.windows[w]:plan.windows[w + 1]]
                ahead.append(_Window(self, pool, epoch, w, segments, buffers))
                while sum(isinstance(x, _Window) for x in ahead) > self.prefetch:
                    yield ahead.popleft()
            ahead.append(epoch)
        yield from ahead

    def _batch(self, pieces: list[tuple["_Window", int, int]], cursor: _Cursor, counts: dict,
               scratch: np.ndarray):
        """Gathers a batch's rows from their windows. For CUDA it stays in the stored dtype, in
        pinned memory: half the bytes cross to the GPU, which converts them for free. For the CPU
        it is converted to float32 here, off the training thread.

        Both steps run on this thread alone: numpy's take does, and copies below torch's parallel
        grain (32768 elements) do. Larger torch ops would start an OpenMP team that competes with
        the training thread's; that made the loader 2x slower on this 2-core machine."""
        n = sum(hi - lo for _, lo, hi in pieces)
        if self._pin or self._buf_dtype == "float32":
            acts = torch.empty(n, self.d_model, dtype=_TORCH_STORAGE[self._buf_dtype], pin_memory=self._pin)
            gathered = acts.numpy()
        else:
            gathered = scratch[:n]
        ids, o = [], 0
        for win, lo, hi in pieces:
            idx = win.perm[lo:hi]
            np.take(win.buf, idx, axis=0, out=gathered[o:o + len(idx)], mode="clip")  # clip: no buffering
            if self.with_ids:
                ids.append([win.ids[name][idx] for name in _ID_FIELDS])
            o += len(idx)
        if not (self._pin or self._buf_dtype == "float32"):
            acts = torch.empty(n, self.d_model, dtype=torch.float32)
            src = torch.from_numpy(gathered)
            src = src.view(torch.bfloat16) if self._buf_dtype == "bfloat16" else src
            step = max(1, 32768 // self.d_model)
            for a in range(0, n, step):
                acts[a:a + step].copy_(src[a:a + step])
        if self.with_ids:
            ids = [torch.from_numpy(np.concatenate(col)) for col in zip(*ids)]
        return acts, ids, cursor, counts

    def _excludes(self) -> bool:
        return self.exclude_positions_below > 0 or self.exclude_norm_factor is not None

    # -- checkpointing -----------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"stores": [s.url for s in self.stores], "hooks": self.hooks, "weights": self.weights,
                "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "drop_last": self.drop_last, "exclude_positions_below": self.exclude_positions_below,
                "exclude_norm_factor": self.exclude_norm_factor}

    def state_dict(self) -> dict:
        """The position after the last batch yielded, and the settings that decide the batches."""
        return {"version": 1, **asdict(self._cursor), "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batch is the one that followed it in the saved run."""
        diff = [f"{k}: saved {v!r}, now {self._config()[k]!r}" for k, v in state["config"].items()
                if self._config().get(k) != v]
        if diff:
            raise ConfigError(
                f"the saved loader state was made with other settings ({'; '.join(diff)}); with them the "
                "batches would differ, so the run would not continue where it stopped. Fix: resume with "
                "the saved settings, or start the loader afresh (do not load the state)")
        self.close()
        self._cursor = _Cursor(state["epoch"], state["window"], state["offset"], state["batch"],
                               dict(state["counts"]))
        self._counts = dict(state["counts"])


_ID_FIELDS = ("tokens", "contexts", "positions", "stores", "rows")


class _Window:
    """One shuffle window: its segments read on the pool into one buffer, then permuted."""

    def __init__(self, loader: ActivationLoader, pool: "_ReadPool", epoch: int, index: int,
                 segments: np.ndarray, buffers: "_Buffers"):
        self.loader, self.epoch, self.index, self.segments = loader, epoch, index, segments
        self.offsets = np.concatenate([[0], np.cumsum(segments[:, 3] - segments[:, 2])]).astype(np.int64)
        n = int(self.offsets[-1])
        self.buf = buffers.get(n)
        self.store = np.repeat(segments[:, 0], segments[:, 3] - segments[:, 2]).astype(np.int16)
        need_pos = loader.exclude_positions_below > 0 or loader.with_ids
        self.cols = {name: np.zeros(n, dtype) for name, dtype, wanted in (
            (F.POSITION, np.int16, need_pos), (F.TOKENS, np.int32, loader.with_ids),
            (F.CONTEXT, np.int32, loader.with_ids),
            ("norm", np.float32, loader.exclude_norm_factor is not None)) if wanted}
        self.futures = [pool.submit(self._read, i) for i in range(len(segments))]

    def _read(self, i: int) -> None:
        """Reads segment i into its rows of the buffer (on a pool thread: decompression and
        copies release the GIL)."""
        s, chunk, lo, hi = (int(v) for v in self.segments[i])
        st, o = self.loader.stores[s], slice(self.offsets[i], self.offsets[i + 1])
        if st.dtype == self.loader._buf_dtype:
            st.read_chunk(self.loader._acts[s], chunk, lo, hi, out=self.buf[o])
        else:  # mixed stores: the buffer is float32
            self.buf[o] = F.decode(st.read_chunk(self.loader._acts[s], chunk, lo, hi), st.dtype).numpy()
        for name, col in self.cols.items():
            if name == "norm":
                col[o] = st.read_chunk(F.hook_path(self.loader.hooks[s], F.NORM), chunk, lo, hi)
            else:  # an all-zero chunk of these is legitimately absent: zarr reads it as zeros
                col[o] = st.read_chunk(name, chunk, lo, hi, required=False)

    def finish(self, stop: threading.Event) -> bool:
        """Waits for the reads, applies skips and exclusion rules, and permutes the kept rows.
        False if `stop` was set first: a read stalled in storage must not hold up close()."""
        pending = self.futures
        while pending:
            if stop.is_set():
                return False
            pending = wait(pending, timeout=0.1).not_done
        ld = self.loader
        keep = np.ones(len(self.buf), dtype=bool)
        counts = dict(_NO_COUNTS)
        for i, fut in enumerate(self.futures):
            try:
                fut.result()
            except ChunkError as exc:
                if not ld.skip_corrupt:
                    raise
                log.warning("skip_corrupt: skipping the rows of a bad chunk: %s", exc)
                keep[self.offsets[i]:self.offsets[i + 1]] = False
                counts["skipped"] += 1
        if ld.exclude_positions_below > 0:
            bad = keep & (self.cols[F.POSITION] < ld.exclude_positions_below)
            counts["position"], keep = int(bad.sum()), keep & ~bad
        if ld.exclude_norm_factor is not None:
            medians = np.array([st.stats[h].median_norm for st, h in zip(ld.stores, ld.hooks)])
            norm = self.cols["norm"]
            bad = keep & (~np.isfinite(norm) | (norm > ld.exclude_norm_factor * medians[self.store]))
            counts["norm"], keep = int(bad.sum()), keep & ~bad
        self.counts = counts
        kept = np.flatnonzero(keep)
        self.perm = kept[_rng(ld.seed, _WINDOW, self.epoch, ld.dp_rank, self.index).permutation(len(kept))]
        if ld.with_ids:  # store row of each buffer row: its segment's first row + its offset in it
            seg = np.repeat(np.arange(len(self.segments)), np.diff(self.offsets))
            rows = self.segments[seg, 2] + np.arange(len(seg)) - self.offsets[seg]
            self.ids = {"tokens": self.cols[F.TOKENS], "contexts": self.cols[F.CONTEXT],
                        "positions": self.cols[F.POSITION], "stores": self.store, "rows": rows}
        return True


def deal(rows: np.ndarray, rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits items (chunks, in order, with `rows` rows each) among `size` ranks.

    Rounds of `size` items of equal length give rank r their r-th item. Other rounds are split
    by rows, the odd rows going to the ranks with the fewest so far, so that the ranks' totals
    differ by at most one. Returns `rank`'s segments as [n, 3] (item, first row, end row inside
    the item), in order, and every rank's total rows.
    """
    n_rounds = -(-len(rows) // size)
    table = np.zeros(n_rounds * size, dtype=np.int64)
    table[:len(rows)] = rows
    table = table.reshape(n_rounds, size)
    whole = (table == table[:, :1]).all(1) & (table[:, 0] > 0)
    rounds = np.flatnonzero(whole)
    segs = [np.stack([rounds * size + rank, np.zeros_like(rounds), table[rounds, rank]], 1)]
    keys = [rounds]
    totals = table[whole].sum(0)
    split_totals = np.zeros(size, dtype=np.int64)
    for r in np.flatnonzero(~whole):  # few: those holding a short chunk, and the last
        counts = table[r][:len(rows) - r * size]  # the last round may be incomplete
        base, extra = divmod(int(counts.sum()), size)
        share = np.full(size, base, dtype=np.int64)
        share[np.argsort(split_totals, kind="stable")[:extra]] += 1
        split_totals += share
        start = int(share[:rank].sum())
        stop = start + int(share[rank])
        edges = np.concatenate([[0], np.cumsum(counts)])
        for j in range(len(counts)):
            lo, hi = max(start, edges[j]), min(stop, edges[j + 1])
            if lo < hi:
                segs.append(np.array([[r * size + j, lo - edges[j], hi - edges[j]]]))
                keys.append(np.array([r]))
    order = np.argsort(np.concatenate(keys), kind="stable")
    return np.concatenate(segs).astype(np.int64)[order], totals + split_totals


class _Buffers:
    """Window buffers for reuse: the first write to a fresh buffer takes a page fault every 4 KiB,
    which cost more than decompressing into it (measured here)."""

    def __init__(self, rows: int, d_model: int, dtype: str):
        self.shape, self.dtype, self.free = (rows, d_model), dtype, []

    def get(self, n: int) -> np.ndarray:
        return (self.free.pop() if self.free else np.empty(self.shape, self.dtype))[:n]

    def put(self, view: np.ndarray) -> None:
        self.free.append(view.base)


def _release(live: deque, buffers: _Buffers, keep: bool) -> None:
    """Returns the buffers of windows that no batch will read again: all but the newest, which
    `keep` says may still be read."""
    while len(live) > int(keep):
        buffers.put(live.popleft().buf)


class _ReadPool:
    """Daemon threads running reads. ThreadPoolExecutor's threads are joined when the interpreter
    exits, so one read stalled in storage (a hung mount or connection) would keep a trainer that
    was told to stop from ever exiting; a daemon thread is left behind instead."""

    def __init__(self, n: int, name: str):
        self.n, self.tasks = n, queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        fut = Future()
        self.tasks.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            fut, fn, args = task
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:
                    fut.set_exception(exc)

    def shutdown(self) -> None:
        """Cancels the reads not started; each thread ends after its current one."""
        while True:  # only the loader thread submits, and it is the one shutting down
            try:
                self.tasks.get_nowait()[0].cancel()
            except queue.Empty:
                break
        for _ in range(self.n):
            self.tasks.put(None)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    """Puts unless the consumer went away; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _check_stores(stores: list[ActivationStore], d_model: int | None, dtype: str | None) -> int:
    for st in stores:
        if d_model is not None and st.d_model != d_model:
            raise ConfigError(
                f"the store at {st.url!r} holds activations of width d_model={st.d_model}, but the trainer "
                f"expects d_model={d_model}. Fix: set the SAE's d_model to {st.d_model}, or read a store "
                f"cached from a model (hook) of width {d_model}")
        if dtype is not None and st.dtype != dtype:
            raise ConfigError(
                f"the store at {st.url!r} holds {st.dtype} activations, but {dtype} is expected. Fix: "
                f"expect {st.dtype}, or re-cache the store with store.dtype={dtype}")
    widths = {st.url: st.d_model for st in stores}
    if len(set(widths.values())) != 1:
        raise ConfigError(f"the stores hold activations of different widths {widths}; a loader mixes "
                          "stores of one d_model. Fix: train one SAE per width")
    return stores[0].d_model


def _check_args(*, n_stores: int, weights, epochs, exclude_norm_factor, **positive) -> None:
    minimum = {"seed": 0, "dp_rank": 0, "exclude_positions_below": 0}
    for name, value in positive.items():
        if not isinstance(value, int) or value < minimum.get(name, 1):
            raise ConfigError(f"{name}={value!r} must be an integer >= {minimum.get(name, 1)}")
    if positive["dp_rank"] >= positive["dp_size"]:
        raise ConfigError(f"dp_rank={positive['dp_rank']} must be below dp_size={positive['dp_size']}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"epochs={epochs!r} must be a positive integer, or None to repeat forever")
    if exclude_norm_factor is not None and not exclude_norm_factor > 0:
        raise ConfigError(f"exclude_norm_factor={exclude_norm_factor!r} must be positive, or None for no rule")
    if weights is not None and (len(weights) != n_stores or not all(w > 0 for w in weights)):
        raise ConfigError(f"weights={list(weights)!r} must hold one positive weight per store ({n_stores} stores)")


__all__ = ["ActivationLoader", "Batch", "deal"]
