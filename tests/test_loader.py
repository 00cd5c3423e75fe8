"""The activation loader on small synthetic stores whose token ids are the row numbers, so that
every yielded row can be traced back to the store."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, StoreIncompleteError
from pipeline.store import (ActivationLoader, ActivationStore, ActivationStoreWriter, ChunkError,
                            StoreLayout, commit)
from pipeline.store.loader import deal

RPC = 16          # rows per context
CHUNK_CTX = 4     # contexts per chunk: 64 rows
N_CTX = 46        # 736 rows: 11 whole chunks and a short one of 32 rows
D = 8


def make_store(url: str, n_contexts: int = N_CTX, *, token_offset: int = 0, dtype: str = "float16",
               storage_options: dict | None = None, commit_it: bool = True, seed: int = 0, **layout) -> str:
    """Token id = token_offset + row; every 5th context has a massive activation at position 2.
    `layout`: more StoreLayout fields (compressor, checksum, modality: position 1 is then an image row)."""
    layout = StoreLayout(("h",), D, dtype, n_contexts, RPC, shard_contexts=2 * CHUNK_CTX, chunk_contexts=CHUNK_CTX,
                         **layout)
    writer = ActivationStoreWriter(url, layout, {"fingerprint": "x"}, storage_options=storage_options)
    gen = torch.Generator().manual_seed(seed)
    for k in range(layout.n_shards):
        span = layout.shard_contexts_range(k)
        ctx = torch.arange(span.start, span.stop, dtype=torch.int32).repeat_interleave(RPC)
        pos = torch.arange(1, RPC + 1, dtype=torch.int16).repeat(len(span))
        x = torch.randn(len(ctx), D, generator=gen) + 0.5
        x[(pos == 2) & (ctx % 5 == 0)] *= 100
        writer.begin_shard(k)
        writer.append({"h": x}, torch.arange(len(ctx)) + span.start * RPC + token_offset, ctx, pos,
                      (pos == 1).to(torch.int8) if layout.modality else None)
        writer.end_shard(len(span))
    writer.close()
    if commit_it:
        commit(writer)
    return url


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return make_store(str(tmp_path_factory.mktemp("loader") / "store"))


@pytest.fixture(scope="module")
def store(store_url) -> ActivationStore:
    return ActivationStore.open(store_url)


def run(loader: ActivationLoader, limit: int | None = None) -> list:
    """The batches of one iteration (at most `limit`), as (acts, tokens, contexts, stores) numpy."""
    out = []
    for b in loader:
        out.append(tuple(t.numpy().copy() for t in (b.acts, b.tokens, b.contexts, b.stores)))
        if limit is not None and len(out) == limit:
            break
    loader.close()
    return out


def tokens(batches) -> np.ndarray:
    return np.concatenate([b[1] for b in batches]) if batches else np.array([], dtype=np.int32)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_every_row_once_per_epoch_across_ranks(store, dp_size):
    everything, counts = [], []
    for rank in range(dp_size):
        loader = ActivationLoader(store, 50, seed=3, dp_rank=rank, dp_size=dp_size, shuffle_buffer=150,
                                  with_ids=True)
        batches = run(loader)
        assert len(batches) == loader.batches_in_epoch(0)
        assert all(len(b[1]) == 50 for b in batches[:-1])
        for acts, tok, _, _ in batches:  # the rows are the store's rows, converted exactly
            assert acts.dtype == np.float32 and np.array_equal(acts, store.acts(0, store.n_tokens)[tok].numpy())
        everything.append(tokens(batches))
        counts.append(len(everything[-1]))
    assert np.array_equal(np.sort(np.concatenate(everything)), np.arange(store.n_tokens))
    assert max(counts) - min(counts) <= 1  # ranks stay in step


def test_deal_splits_rows_exactly_and_evenly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = rng.integers(1, 9, size=rng.integers(1, 25))
        size = int(rng.integers(1, 6))
        edges = np.concatenate([[0], np.cumsum(rows)])
        seen = np.zeros(edges[-1], dtype=int)
        totals = []
        for rank in range(size):
            segs, rank_rows = deal(rows, rank, size)
            for item, lo, hi in segs:
                seen[edges[item] + lo:edges[item] + hi] += 1
            totals.append(int((segs[:, 2] - segs[:, 1]).sum()))
            assert totals[-1] == rank_rows[rank]
        assert (seen == 1).all() and max(totals) - min(totals) <= 1


def test_drop_last_keeps_ranks_in_step(store):
    lens = [[len(b[1]) for b in run(ActivationLoader(store, 60, seed=1, dp_rank=r, dp_size=3, drop_last=True,
                                                     with_ids=True))] for r in range(3)]
    assert len({len(x) for x in lens}) == 1 and all(n == 60 for x in lens for n in x)


def test_feature_parallel_ranks_get_identical_batches(store):
    def batches(seed, **kw):
        return [b.numpy() for b in ActivationLoader(store, 64, seed=seed, dp_rank=1, dp_size=2,
                                                    shuffle_buffer=200, **kw)]
    a, b = batches(7), batches(7, num_workers=1, prefetch=3)  # threads and read-ahead change nothing
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], batches(8)[0])


def test_epochs_repeat_with_a_new_order(store):
    batches = run(ActivationLoader(store, 100, seed=0, epochs=2, with_ids=True))
    first = tokens(batches[:len(batches) // 2])
    second = tokens(batches[len(batches) // 2:])
    for epoch in (first, second):
        assert np.array_equal(np.sort(epoch), np.arange(store.n_tokens))
    assert not np.array_equal(first, second)


def test_resume_yields_exactly_the_remaining_batches(store):
    settings = dict(seed=5, dp_rank=1, dp_size=2, shuffle_buffer=100, epochs=2, with_ids=True,
                    exclude_norm_factor=8.0)
    whole = ActivationLoader(store, 48, **settings)
    full = run(whole)
    assert whole.excluded["norm"] > 0
    for stop in (1, 3, len(full) // 2, len(full) // 2 + 1, len(full) - 1):
        first = ActivationLoader(store, 48, **settings)
        run(first, limit=stop)
        state = json.loads(json.dumps(first.state_dict()))  # it goes into a checkpoint as JSON
        resumed = ActivationLoader(store, 48, **settings)
        resumed.load_state_dict(state)
        rest = run(resumed)
        assert len(rest) == len(full) - stop
        for x, y in zip(full[stop:], rest):
            assert all(np.array_equal(u, v) for u, v in zip(x, y))
        assert resumed.excluded == whole.excluded  # counted once, across the interruption


def test_resume_with_other_settings_is_refused(store):
    loader = ActivationLoader(store, 48, seed=5)
    next(iter(loader))
    other = ActivationLoader(store, 48, seed=6)
    with pytest.raises(ConfigError, match="seed: saved 5, now 6"):
        other.load_state_dict(loader.state_dict())


def test_shuffle_mixes_contexts_like_a_uniform_shuffle(store):
    """Adjacent rows of a batch share a context about as often as under a uniform shuffle of the
    rows of their window, (RPC - 1) / (window rows - 1), against (RPC - 1) / RPC = 94% for rows in
    store order. A window as large as the store is a uniform shuffle of the whole store."""
    for shuffle_buffer in (store.n_tokens, 4 * CHUNK_CTX * RPC):
        same = pairs = 0
        expected = []
        for seed in range(20):
            loader = ActivationLoader(store, 64, seed=seed, shuffle_buffer=shuffle_buffer, with_ids=True)
            plan = loader.plan(0)
            seg_rows = plan.segments[:, 3] - plan.segments[:, 2]
            window_rows = np.add.reduceat(seg_rows, plan.windows[:-1])
            expected.append(len(window_rows) * (RPC - 1) / (window_rows - 1).sum())  # pair-weighted mean
            for b in loader:
                same += int((b.contexts[1:] == b.contexts[:-1]).sum())
                pairs += len(b.contexts) - 1
        p = float(np.mean(expected))
        assert abs(same / pairs - p) < 4 * (p * (1 - p) / pairs) ** 0.5, (shuffle_buffer, same / pairs, p)
    assert p < 0.1


def test_exclusion_rules_drop_and_count_rows(store):
    loader = ActivationLoader(store, 64, exclude_positions_below=2, exclude_norm_factor=8.0, with_ids=True)
    kept = tokens(run(loader))
    positions = store.positions()
    contexts = store.contexts()
    outlier = (positions == 2) & (contexts % 5 == 0)
    assert loader.excluded == {"position": int((positions < 2).sum()), "norm": int(outlier.sum())}
    assert np.array_equal(np.sort(kept), np.flatnonzero((positions >= 2) & ~outlier))


def test_weights_mix_stores(tmp_path, store):
    other = ActivationStore.open(make_store(str(tmp_path / "other"), token_offset=10_000, seed=1))
    loader = ActivationLoader([store, other], 64, weights=[3, 1], epochs=2, with_ids=True)
    batches = run(loader)
    from_store = np.concatenate([b[3] for b in batches])
    assert abs((from_store == 0).mean() - 0.75) < 0.05
    tok = tokens(batches)
    assert set(tok[from_store == 1]) <= set(range(10_000, 10_000 + other.n_tokens))
    plain = tokens(run(ActivationLoader([store, other], 64, with_ids=True)))  # no weights: each row once
    assert np.array_equal(np.sort(plain), np.concatenate([np.arange(store.n_tokens),
                                                          10_000 + np.arange(other.n_tokens)]))


def test_bfloat16_store(tmp_path):
    st = ActivationStore.open(make_store(str(tmp_path / "bf16"), n_contexts=8, dtype="bfloat16"))
    batches = run(ActivationLoader(st, 32, with_ids=True))
    assert all(np.array_equal(b[0], st.acts(0, st.n_tokens)[b[1]].numpy()) for b in batches)


@pytest.fixture
def damaged(tmp_path, store_url):
    url = str(tmp_path / "damaged")
    shutil.copytree(store_url, url)
    return url


def test_corrupt_chunk_names_its_key_or_is_skipped(damaged):
    st = ActivationStore.open(damaged)
    key = st.chunk_key("hooks/h/acts", 3)
    with open(f"{damaged}/{key}", "wb") as f:
        f.write(b"not zstd" * 100)
    with pytest.raises(ChunkError, match=r"chunk 'hooks/h/acts/c/3/0' .* \(rows 192\.\.255\) is corrupt"):
        run(ActivationLoader(st, 64))
    loader = ActivationLoader(st, 64, skip_corrupt=True, with_ids=True)
    got = tokens(run(loader))
    assert loader.skipped == 1
    assert np.array_equal(np.sort(got), np.setdiff1d(np.arange(st.n_tokens), np.arange(192, 256)))


def test_missing_chunk_names_its_key(damaged):
    st = ActivationStore.open(damaged)
    os.remove(f"{damaged}/{st.chunk_key('hooks/h/acts', 11)}")
    with pytest.raises(ChunkError, match=r"chunk 'hooks/h/acts/c/11/0' .* \(rows 704\.\.735\) is missing"):
        run(ActivationLoader(st, 64))


def test_uncommitted_store_is_refused(tmp_path):
    url = make_store(str(tmp_path / "partial"), n_contexts=8, commit_it=False)
    with pytest.raises(StoreIncompleteError, match="not committed"):
        ActivationLoader(url, 64)


def test_width_and_dtype_mismatch_name_both_values(store):
    with pytest.raises(ConfigError, match=r"d_model=8, but the trainer expects d_model=576. Fix"):
        ActivationLoader(store, 64, expected_d_model=576)
    with pytest.raises(ConfigError, match=r"holds float16 activations, but bfloat16 is expected"):
        ActivationLoader(store, 64, expected_dtype="bfloat16")


def test_breaking_out_stops_the_threads(store):
    loader = ActivationLoader(store, 8, shuffle_buffer=64)
    next(iter(loader))
    thread = loader._running[1]
    loader.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 server (moto) on a free loopback port, with a bucket."""
    import s3fs
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**options).mkdir("loader-test")
    yield options
    server.stop()


def test_store_on_s3_reads_correctly(s3):
    url = make_store("s3://loader-test/store", storage_options=s3)
    loader = ActivationLoader(url, 64, storage_options=s3, dp_rank=0, dp_size=2, with_ids=True)
    other = ActivationLoader(url, 64, storage_options=s3, dp_rank=1, dp_size=2, with_ids=True)
    batches = run(loader) + run(other)
    st = loader.stores[0]
    assert np.array_equal(np.sort(tokens(batches)), np.arange(st.n_tokens))
    everything = st.acts(0, st.n_tokens).numpy()  # read through zarr, not through the loader's path
    assert all(np.array_equal(b[0], everything[b[1]]) for b in batches)
