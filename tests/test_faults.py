"""The fault suite of the activation store: a damaged chunk or metadata file, or a non-finite row
given to the writer, always stops with an error that names it and the fix, and is never read or
written as wrong values (docs/store-format.md: Checksums, Unreadable metadata, Writing rules)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache import run as cache
from pipeline.errors import StoreError
from pipeline.store import (ActivationLoader, ActivationStore, ActivationStoreWriter, ChunkError, StoreLayout,
                            commit)
from pipeline.store import format as F
from test_cache import assert_same_store, tiny_cfg
from test_loader import CHUNK_CTX, D, RPC, make_store, run, tokens

ARRAYS = (F.TOKENS, F.CONTEXT, F.POSITION, F.MODALITY, F.hook_path("h", F.ACTS), F.hook_path("h", F.NORM))
N_CTX = 2 * CHUNK_CTX  # two chunks in one shard


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, ActivationStore]:
    """One committed store per compressor the writer offers, each with every array it makes."""
    root = tmp_path_factory.mktemp("faults")
    return {c: ActivationStore.open(make_store(str(root / c), N_CTX, compressor=c, modality=True))
            for c in F.COMPRESSORS}


def chunk_file(store: ActivationStore, name: str, chunk: int) -> Path:
    return Path(store.storage.path(store.chunk_key(name, chunk)))


def read_every_way(store: ActivationStore, name: str, chunk: int) -> None:
    """Reads a chunk as the loader does (read_chunk) and as the range readers do."""
    store.read_chunk(name, chunk)
    span = store.chunk_span(chunk)
    ranged = {F.TOKENS: store.tokens, F.CONTEXT: store.contexts, F.POSITION: store.positions,
              F.MODALITY: store.modality, F.hook_path("h", F.ACTS): store.acts}
    if name in ranged:
        ranged[name](span.start, span.stop)


def assert_named(exc: ChunkError, store: ActivationStore, name: str, chunk: int, problem: str) -> None:
    span = store.chunk_span(chunk)
    assert (exc.key, exc.rows) == (store.chunk_key(name, chunk), span)
    message = str(exc)
    for part in (repr(exc.key), repr(store.url), f"rows {span.start}..{span.stop - 1}", problem,
                 F.shard_marker(0), F.COMMIT_MARKER, "data.skip_corrupt=true"):
        assert part in message, (part, message)


@pytest.mark.parametrize("compressor", F.COMPRESSORS)
@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_corrupt_bytes_anywhere_in_any_chunk_are_detected(stores, compressor, data):
    """Any run of up to 64 changed bytes, anywhere in a chunk of any array: without the checksum,
    most such changes in raw or lz4 chunks decoded to wrong values."""
    store = stores[compressor]
    name = data.draw(st.sampled_from(ARRAYS), label="array")
    chunk = data.draw(st.integers(0, store.n_chunks - 1), label="chunk")
    path = chunk_file(store, name, chunk)
    good = path.read_bytes()
    start = data.draw(st.integers(0, len(good) - 1), label="start")
    mask = data.draw(st.binary(min_size=1, max_size=min(64, len(good) - start)).filter(any), label="xor")
    bad = bytearray(good)
    bad[start:start + len(mask)] = bytes(a ^ b for a, b in zip(good[start:], mask))
    path.write_bytes(bytes(bad))
    try:
        with pytest.raises(ChunkError) as e:
            read_every_way(store, name, chunk)
        assert_named(e.value, store, name, chunk, "is corrupt")
    finally:
        path.write_bytes(good)


@pytest.mark.parametrize("compressor", F.COMPRESSORS)
def test_truncated_and_missing_chunk_files_are_detected(stores, compressor):
    """Every array, cut at lengths around the codec's headers and the checksum, or deleted (a
    missing id or modality chunk no longer reads as zeros). acts() once decoded a truncated chunk
    in 4 of 9 runs: each cut is read 3 times."""
    store = stores[compressor]
    for name in ARRAYS:
        path = chunk_file(store, name, 1)
        good = path.read_bytes()
        try:
            for cut in sorted({0, 1, 3, 4, 5, 16, len(good) // 2, len(good) - 5, len(good) - 4, len(good) - 1}
                              & set(range(len(good)))):
                path.write_bytes(good[:cut])
                for _ in range(3):
                    with pytest.raises(ChunkError) as e:
                        read_every_way(store, name, 1)
                    assert_named(e.value, store, name, 1, "is corrupt")
            path.unlink()
            with pytest.raises(ChunkError) as e:
                read_every_way(store, name, 1)
            assert_named(e.value, store, name, 1, "is missing")
        finally:
            path.write_bytes(good)
        read_every_way(store, name, 1)  # restored: reads again


def test_loader_stops_on_a_bad_id_chunk_or_skips_it_and_says_so(stores, caplog):
    store = stores["blosc-lz4"]
    path = chunk_file(store, F.POSITION, 0)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    try:
        with pytest.raises(ChunkError, match="position/c/0' .* is corrupt"):
            run(ActivationLoader(store, 32, with_ids=True))
        loader = ActivationLoader(store, 32, with_ids=True, skip_corrupt=True)
        with caplog.at_level(logging.WARNING, "pipeline.store"):
            got = tokens(run(loader))
    finally:
        path.write_bytes(good)
    assert loader.skipped == 1 and np.array_equal(np.sort(got), np.arange(CHUNK_CTX * RPC, store.n_tokens))
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.store"]
    assert len(said) == 1 and said[0].startswith("skip_corrupt: skipping the rows of a bad chunk: chunk 'position/c/0'")


def test_the_named_fix_rewrites_a_damaged_chunk(tiny_model_dir, text_dir, tmp_path):
    """Delete the two markers that the error names and rerun the caching command: it rewrites
    the one shard, and the store equals an undamaged copy."""
    url, pristine = str(tmp_path / "store"), str(tmp_path / "pristine")
    cfg = tiny_cfg(tiny_model_dir, text_dir, url)
    cache(cfg)
    shutil.copytree(url, pristine)
    store = ActivationStore.open(url)
    chunk_file(store, F.hook_path(store.hooks[0], F.ACTS), 5).write_bytes(b"\0" * 100)
    with pytest.raises(ChunkError) as e:
        store.acts(0, store.n_tokens)
    markers = re.search(r"Fix: delete '([^']+)' and '([^']+)', then rerun the caching command", str(e.value))
    assert markers.group(1).endswith(F.shard_marker(5 * cfg.store.chunk_contexts // cfg.store.shard_contexts))
    for path in markers.groups():
        os.remove(path)
    assert cache(cfg).tokens == cfg.store.shard_contexts * (cfg.context_size - cfg.drop_positions)
    assert_same_store(url, pristine)


def test_a_store_without_checksums_reads_and_says_so_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "pipeline.store"):
        store = ActivationStore.open(make_store(str(tmp_path / "old"), N_CTX, checksum=False))
        assert store.acts(0, store.n_tokens).shape == (N_CTX * RPC, D)
        assert len(tokens(run(ActivationLoader(store, 32, with_ids=True, exclude_norm_factor=8.0)))) > 0
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.store"]
    assert len(said) == 1 and "has no chunk checksums" in said[0] and str(tmp_path / "old") in said[0]
    assert "crc32c" not in (tmp_path / "old" / "tokens" / "zarr.json").read_text()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "pipeline.store"):
        ActivationStore.open(make_store(str(tmp_path / "new"), N_CTX)).acts(0, 10)
    assert not [r for r in caplog.records if r.name == "pipeline.store"]


def test_a_truncated_blosc_chunk_is_refused_without_a_checksum_too(tmp_path):
    """Blosc takes a chunk's size from its header and decoded a truncated one by reading past its
    end: the reader checks that size, for stores written before checksums."""
    store = ActivationStore.open(make_store(str(tmp_path / "old"), N_CTX, checksum=False))
    path = chunk_file(store, F.hook_path("h", F.ACTS), 0)
    good = path.read_bytes()
    for cut in range(0, len(good), 7):
        path.write_bytes(good[:cut])
        with pytest.raises(ChunkError, match="is corrupt"):
            store.acts(0, store.chunk_rows)


# -- metadata --------------------------------------------------------------------------------------

DAMAGE = {"truncated": lambda b: b[:len(b) // 2], "empty": lambda b: b"",
          "not UTF-8": lambda b: b"\xff\xfe\x00" + b, "not zarr": lambda b: b"[]", "missing": None}


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return make_store(str(tmp_path_factory.mktemp("meta") / "store"), N_CTX)


@pytest.mark.parametrize("file, damage", [
    (file, damage) for file in ("zarr.json", "tokens/zarr.json", "hooks/h/acts/zarr.json", F.COMMIT_MARKER)
    for damage in DAMAGE  # a missing commit marker is an incomplete store (test_loader); [] is valid JSON
    if file != F.COMMIT_MARKER or damage not in ("missing", "not zarr")])
def test_unreadable_metadata_names_the_file(store_url, tmp_path, file, damage):
    url = str(tmp_path / "store")
    shutil.copytree(store_url, url)
    path = Path(url, file)
    if DAMAGE[damage] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(StoreError) as e:
        store = ActivationStore.open(url)
        store.acts(0, store.n_tokens)
        store.tokens()
    assert repr(str(path)) in str(e.value) and "Fix:" in str(e.value), str(e.value)
    assert not isinstance(e.value, ChunkError)


def test_resuming_a_store_with_unreadable_metadata_names_the_file(store_url, tmp_path):
    url = str(tmp_path / "store")
    shutil.copytree(store_url, url)
    path = Path(url, "zarr.json")
    path.write_text('{"zarr_format": 3, "node_ty')
    with pytest.raises(StoreError, match=re.escape(f"{path}' of the store at {url!r} is unreadable (JSONDecodeError")):
        make_store(url, N_CTX)


def test_workers_creating_one_store_at_once_all_open_it(tmp_path):
    """Workers of one store start together: each checks for the group, finds none, creates it; all
    but the first find it made in between and must open it (as cache workers started by one sbatch do)."""
    layout = StoreLayout(("h",), D, "float32", 2 * N_CTX, RPC, shard_contexts=N_CTX, chunk_contexts=CHUNK_CTX)
    for attempt in range(8):
        url, start, errors = str(tmp_path / f"store{attempt}"), threading.Barrier(4), []

        def open_writer():
            start.wait()
            try:
                ActivationStoreWriter(url, layout, {"fingerprint": "x"}).close()
            except Exception as exc:  # noqa: BLE001 -- collected and asserted below
                errors.append(exc)
        threads = [threading.Thread(target=open_writer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert zarr.open_group(url, mode="r").attrs[F.HEADER_ATTR]["fingerprint"] == "x"


# -- non-finite rows -------------------------------------------------------------------------------

def write(url: str, rows: dict[int, float], dtype: str = "float32") -> ActivationStoreWriter:
    """Two shards of finite rows, but `rows` (store row: value) set in column 3."""
    layout = StoreLayout(("h",), D, dtype, 2 * N_CTX, RPC, shard_contexts=N_CTX, chunk_contexts=CHUNK_CTX)
    writer = ActivationStoreWriter(url, layout, {"fingerprint": "x"})
    x = torch.randn(layout.n_rows, D, generator=torch.Generator().manual_seed(0))
    for row, value in rows.items():
        x[row, 3] = value
    for k in range(layout.n_shards):
        span = layout.shard_contexts_range(k)
        r = slice(span.start * RPC, span.stop * RPC)
        writer.begin_shard(k)
        writer.append({"h": x[r]}, torch.arange(r.start, r.stop), torch.arange(r.start, r.stop) // RPC,
                      torch.arange(r.start, r.stop) % RPC)
        writer.end_shard(len(span))
    writer.close()
    return writer


@pytest.mark.parametrize("value, dtype, cause", [
    (math.nan, "float32", "already in the model's output). Fix: run the model in float32"),
    (-math.inf, "bfloat16", "already in the model's output"),
    (1e5, "float16", "finite in the model's output, out of the range of store.dtype=float16). Fix: store.dtype=bf")])
def test_non_finite_rows_are_refused_naming_shard_rows_and_hook(tmp_path, value, dtype, cause):
    url = str(tmp_path / "store")
    first = N_CTX * RPC  # shard 1, its first chunk
    bad = [first + r for r in (5, 6, 20, 21, 30, 40, 63)]
    with pytest.raises(StoreError) as e:
        write(url, {r: value for r in bad}, dtype)
    message = str(e.value)
    assert f"shard 1 of the store at {url!r} was not written: hook 'h' gave 7 row(s) with a NaN or infinite " \
           f"value among store rows {first}..{first + CHUNK_CTX * RPC - 1} ({', '.join(map(str, bad[:5]))}, ...; " \
           f"{cause}" in message, message
    assert os.path.exists(f"{url}/{F.shard_marker(0)}") and not os.path.exists(f"{url}/{F.shard_marker(1)}")
    with pytest.raises(StoreError, match="not committed"):
        ActivationStore.open(url)


def test_stats_are_finite_and_an_old_nan_median_is_refused_at_commit(tmp_path):
    url = str(tmp_path / "store")
    writer = write(url, {3: 1e4})  # a massive but finite row: an outlier, not a refusal
    record = commit(writer)
    assert record["stats"]["h"]["n_outliers"] == 1
    assert all(np.isfinite(v).all() for v in record["stats"]["h"].values())
    # a shard marker as a version that accepted NaN rows wrote it
    path = Path(url, F.shard_marker(1))
    marker = json.loads(path.read_text())
    marker["stats"]["h"]["median_norm"] = math.nan
    path.write_text(json.dumps(marker))
    with pytest.raises(StoreError, match=rf"shard\(s\) \[1\] .* median norm .* Fix: delete {re.escape(str(path))} "):
        commit(writer)


def test_an_old_store_with_inf_rows_has_them_excluded_and_says_so(tmp_path, caplog):
    """A store from a version that accepted non-finite rows: its median norm NaN, an inf row."""
    url = make_store(str(tmp_path / "old"), N_CTX, checksum=False)
    zarr.open_array(f"{url}/{F.hook_path('h', F.ACTS)}", mode="r+")[7] = np.full(D, np.inf, np.float16)
    zarr.open_array(f"{url}/{F.hook_path('h', F.NORM)}", mode="r+")[7] = np.inf
    group = zarr.open_group(url, mode="r+")
    record = dict(group.attrs[F.COMMIT_ATTR])
    record["stats"]["h"]["median_norm"] = math.nan
    group.attrs[F.COMMIT_ATTR] = record
    with caplog.at_level(logging.WARNING, "pipeline.store"):
        loader = ActivationLoader(url, 32, with_ids=True, exclude_norm_factor=8.0)
    assert any("non-finite statistics for hook 'h' (median_norm=nan" in r.getMessage() for r in caplog.records)
    batches = run(loader)
    assert 7 not in tokens(batches) and all(np.isfinite(b[0]).all() for b in batches)
    assert loader.excluded["norm"] == 1
