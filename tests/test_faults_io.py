"""Faults of the machinery around the data: object storage that fails requests while a store is
cached and while it is trained on (the moto server behind tests/faulty_proxy.py), and kill -9 of a
3-shard training, again and again.

What must hold: a run either finishes with exactly what a run without faults gives, or stops with
a StoreError that names the store; a rerun without faults then completes it to the same result
(every array, every weight bit-equal). Never a different store, never different weights."""

from __future__ import annotations

import json
import random
import re
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
import zarr

from faulty_proxy import KINDS, FaultyProxy
from pipeline.cache import run
from pipeline.errors import USER_ERROR_EXIT, StoreError
from pipeline.store import ActivationStore
from test_cache import tiny_cfg
from test_train import _kill_9, _launch, run_train, synthetic_store, tiny, weights

pytestmark = pytest.mark.slow


def contents(url: str, storage_options: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """A committed store's attributes (header, commit record with the statistics) and every array."""
    group = ActivationStore.open(url, storage_options).group
    with warnings.catch_warnings():  # about _pipeline/, the markers' folder: not a zarr node, as meant
        warnings.filterwarnings("ignore", "Object at _pipeline is not recognized")
        members = list(group.members(max_depth=None))
    return dict(group.attrs), {name: a[:] for name, a in members if isinstance(a, zarr.Array)}


def assert_same_contents(got: tuple[dict, dict], expected: tuple[dict, dict]) -> None:
    assert got[0] == expected[0]
    assert got[1].keys() == expected[1].keys()
    for name, a in expected[1].items():
        np.testing.assert_array_equal(got[1][name], a, err_msg=name, strict=True)


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


def via(proxy: FaultyProxy, opts: dict) -> dict:
    """The storage options that send s3fs through the proxy instead of straight to moto."""
    return {**opts, "endpoint_url": proxy.url}


def stopped_naming(url: str, call) -> bool:
    """Runs `call`: True if it raised the error a storage failure must give (a StoreError that
    names the store), False if it finished. Any other exception fails the test as it is."""
    try:
        call()
    except StoreError as exc:
        assert url in str(exc), exc
        return True
    return False


# -- caching to flaky object storage -------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, tiny_model_dir, text_dir):
    """The store a run without faults writes (on a local disk: the bytes do not depend on where)."""
    url = str(tmp_path_factory.mktemp("reference") / "store")
    run(tiny_cfg(tiny_model_dir, text_dir, url))
    return contents(url)


def test_cache_to_flaky_s3_writes_the_same_store(tiny_model_dir, text_dir, s3_bucket, reference_store):
    """A quarter of the tries fail, in all five ways (faulty_proxy.KINDS); botocore's and s3fs's retries must hide
    them or the run must stop naming the store, and a rerun completes it."""
    bucket, opts = s3_bucket
    url = f"s3://{bucket}/acts"
    with FaultyProxy(opts["endpoint_url"], rate=0.25, seed=0) as proxy:
        stopped = stopped_naming(url, lambda: run(tiny_cfg(tiny_model_dir, text_dir, url,
                                                           storage_options=via(proxy, opts))))
    assert set(proxy.faults) == set(KINDS), proxy.faults  # the run met every kind of fault
    if stopped:
        run(tiny_cfg(tiny_model_dir, text_dir, url, storage_options=opts))
    assert_same_contents(contents(url, opts), reference_store)


# Points of a caching run, named by the request at which the storage goes down for good.
OUTAGES = {
    "creating": lambda method, path: method == "PUT" and "/hooks/" in path,  # the hook arrays' metadata
    "writing": lambda method, path: method == "PUT" and path.endswith("/_pipeline/shards/000003.json"),
    "committing": lambda method, path: method == "PUT" and path.endswith("/_pipeline/COMMITTED.json"),
}


@pytest.mark.parametrize("point", OUTAGES)
def test_cache_stopped_by_an_s3_outage_names_the_store_and_a_rerun_completes_it(
        tiny_model_dir, text_dir, s3_bucket, reference_store, point):
    bucket, opts = s3_bucket
    url = f"s3://{bucket}/acts"
    with FaultyProxy(opts["endpoint_url"], outage=OUTAGES[point]) as proxy:
        with pytest.raises(StoreError, match=re.escape(url)):
            run(tiny_cfg(tiny_model_dir, text_dir, url, storage_options=via(proxy, opts)))
    assert proxy.down
    run(tiny_cfg(tiny_model_dir, text_dir, url, storage_options=opts))
    assert_same_contents(contents(url, opts), reference_store)


# -- training from flaky object storage ------------------------------------------------------------
@pytest.fixture(scope="module")
def train_store(tmp_path_factory) -> str:
    return synthetic_store(str(tmp_path_factory.mktemp("store") / "acts"))


def train_args(store: str, out: Path, storage_options: dict | None = None) -> list[str]:
    # One 256-row chunk per shuffle window: the loader reads all through the run, not once an epoch.
    # skip_corrupt on: a storage failure taken for a corrupt chunk would be skipped, and the weights differ.
    return tiny(store, out, "n_tokens=6400", "data.shuffle_buffer=256", "data.skip_corrupt=true",
                "checkpoint_every=100", "log_every=10",
                *[f"+data.storage_options.{k}={v}" for k, v in (storage_options or {}).items()])


@pytest.fixture(scope="module")
def straight(train_store, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of a run without faults (from a local disk: the batches do not depend on where)."""
    out = tmp_path_factory.mktemp("straight")
    run_train(train_args(train_store, out), timeout=600)
    return weights(out / "sae")


def drain(p: subprocess.Popen) -> list[str]:
    """Reads a launched run's output as it comes, so that a chatty run never blocks on a full pipe."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True).start()
    return lines


def wait_until(condition, p: subprocess.Popen, lines: list[str], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert p.poll() is None, "the run ended first:\n" + "".join(lines)[-3000:]
        assert time.time() < deadline, "no progress:\n" + "".join(lines)[-3000:]
        time.sleep(0.02)


def latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().split("-")[1]) if latest.exists() else 0


def test_training_from_flaky_then_failed_s3_resumes_to_the_same_weights(train_store, s3_bucket, straight, tmp_path):
    """A quarter of the loader's tries fail until the first checkpoint, then the storage goes down:
    the run stops naming the store (the command line's answer to a StoreError), and a rerun
    without faults resumes to the weights of a run that never met a fault."""
    bucket, opts = s3_bucket
    s3fs.S3FileSystem(**opts).put(train_store, f"{bucket}/acts", recursive=True)
    url = f"s3://{bucket}/acts"
    with FaultyProxy(opts["endpoint_url"], rate=0.25, seed=0) as proxy:
        p = _launch(train_args(url, tmp_path, via(proxy, opts)), 1)
        lines = drain(p)
        # (a run that the faults alone stop is fine too, if it names the store: checked below)
        wait_until(lambda: latest_step(tmp_path) > 0 or p.poll() is not None, p, lines)
        proxy.down = True
        p.wait(timeout=300)
    log = "".join(lines)
    assert p.returncode == USER_ERROR_EXIT and url in log, f"exit {p.returncode}\n{log[-4000:]}"
    assert "ChunkError" not in log and "skipping" not in log, log[-4000:]  # not the chunk's fault
    assert set(proxy.faults) - {"outage"}, "no try failed before the outage: the test proves nothing"
    stopped_at = latest_step(tmp_path)
    assert not (tmp_path / "sae").exists()
    resumed = run_train(train_args(url, tmp_path, opts), timeout=600)
    assert f"at step {stopped_at}" in resumed.stdout or stopped_at == 0
    assert_same_weights(weights(tmp_path / "sae"), straight)


# -- kill -9, again and again ----------------------------------------------------------------------
def last_logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    complete = [line for line in lines if line.endswith("\n")]  # rank 0 may be writing the last one
    return json.loads(complete[-1])["step"] if complete else 0


def test_kill_9_of_a_3_shard_training_again_and_again_ends_bit_equal(train_store, tmp_path):
    steps, every = 60, 5

    def args(out):
        return tiny(train_store, out, f"n_tokens={32 * steps}", "log_every=1", f"checkpoint_every={every}",
                    "keep_checkpoints=0", "parallel.feature_parallel=3")
    run_train(args(tmp_path / "straight"), nproc=3, timeout=600)

    out, rng = tmp_path / "killed", random.Random(15)
    resumed = logged = 0
    for _ in range(2):
        # A random step past the next checkpoint, and past what the last run logged (metrics.jsonl
        # keeps those lines until the new run has resumed and rewrites them).
        target = max(logged, resumed + every) + rng.randint(1, 8)
        p = _launch(args(out), 3)
        lines = drain(p)
        wait_until(lambda: last_logged_step(out) >= target, p, lines)
        _kill_9(p)
        p.wait()
        logged, checkpointed = last_logged_step(out), latest_step(out)
        assert resumed < checkpointed < steps, "".join(lines)[-3000:]
        assert not (out / "sae").exists()
        resumed = checkpointed

    final = run_train(args(out), nproc=3, timeout=600)
    assert f"at step {resumed}" in final.stdout
    assert_same_weights(weights(out / "sae"), weights(tmp_path / "straight" / "sae"))
