"""The caching stage end to end: values, object storage, resumption, parallel writers, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import CacheConfig, StoreConfig, WorkerConfig, run
from pipeline.data import DataConfig
from pipeline.errors import (EmptyDataError, HookNotFoundError, StorageAccessError,
                             StoreIncompleteError, StoreMismatchError)
from pipeline.models import ModelConfig
from pipeline.store import ActivationStore

ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(model_dir, text_dir, url, **kw) -> CacheConfig:
    store = StoreConfig(url=url, dtype=kw.pop("dtype", "float32"), chunk_contexts=2, shard_contexts=4,
                        storage_options=kw.pop("storage_options", {}), overwrite=kw.pop("overwrite", False))
    data = kw.pop("data", DataConfig(source="files", path=[f"{text_dir}/*"], split="all"))
    return CacheConfig(model=ModelConfig(name=str(model_dir), device="cpu"), data=data, store=store,
                       hooks=kw.pop("hooks", ["layers.2"]), context_size=kw.pop("context_size", 32),
                       n_tokens=kw.pop("n_tokens", 1000), batch_size=3, progress=False, **kw)


def read_all(url, storage_options=None):
    s = ActivationStore.open(url, storage_options)
    return s, {h: s.acts(0, s.n_tokens, h) for h in s.hooks}, s.tokens(), s.contexts(), s.positions()


def assert_same_store(a, b):
    sa, acts_a, *rest_a = read_all(a)
    sb, acts_b, *rest_b = read_all(b)
    assert sa.n_tokens == sb.n_tokens
    for h in acts_a:
        assert torch.equal(acts_a[h], acts_b[h])
    for x, y in zip(rest_a, rest_b):
        np.testing.assert_array_equal(x, y)


def test_smollm2_layer15_values_equal_a_plain_hook_on_the_full_model(tmp_path, smollm2_dir):
    """The acceptance check on the real embedded model: stored rows == a forward hook's output."""
    from transformers import AutoModelForCausalLM
    url = str(tmp_path / "store")
    cfg = CacheConfig(model=ModelConfig(name="embedded:smollm2-135m", device="cpu"),
                      data=DataConfig(source="embedded", languages=["en", "de"]),
                      store=StoreConfig(url=url, dtype="float16", chunk_contexts=2, shard_contexts=2),
                      hooks=["model.layers.15"], n_tokens=6 * 63, context_size=64, progress=False)
    run(cfg)
    store, acts, tokens, contexts, positions = read_all(url)
    assert store.n_tokens == 6 * 63 and store.d_model == 576
    assert store.meta["model"]["id"] == "embedded:smollm2-135m" and store.meta["dtype"] == "float16"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    seen = {}
    model.model.layers[15].register_forward_hook(lambda m, i, o: seen.update(x=o[0] if isinstance(o, tuple) else o))
    ids = torch.full((6, 64), model.config.bos_token_id)
    ids[contexts, positions] = torch.from_numpy(tokens).long()
    with torch.no_grad():
        model(ids)
    expected = seen["x"][:, 1:].reshape(-1, 576)
    assert (positions >= 1).all(), "BOS positions must be dropped"
    torch.testing.assert_close(acts["model.layers.15"], expected.half().float(), rtol=2e-3, atol=0.15)
    st = store.stats["model.layers.15"]
    assert st.count + st.n_outliers == store.n_tokens
    assert st.mean_sq_norm > 0 and st.mean.shape == (576,)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_store_round_trip_and_stats(tiny_model_dir, text_dir, dtype):
    url = f"memory://cache-{dtype}/store"
    run(tiny_cfg(tiny_model_dir, text_dir, url, dtype=dtype, hooks=["layers.1", "model.layers.3"]))
    store, acts, tokens, contexts, positions = read_all(url)
    assert store.hooks == ["layers.1", "model.layers.3"] and store.dtype == dtype
    assert store.n_tokens == 1023  # ceil(1000 / 31) contexts x 31 rows
    x = acts["layers.1"]
    st = store.stats["layers.1"]
    kept = x[x.norm(dim=1) <= 8 * st.median_norm]
    torch.testing.assert_close(st.mean, kept.mean(0), rtol=1e-4, atol=1e-5)
    assert abs(st.mean_sq_norm - float((kept ** 2).sum(1).mean())) < 1e-3 * st.mean_sq_norm
    # every (context, position) exactly once, contexts in order
    pairs = set(zip(contexts.tolist(), positions.tolist()))
    assert len(pairs) == store.n_tokens and set(positions.tolist()) == set(range(1, 32))


def test_s3_store_on_loopback_moto(tiny_model_dir, text_dir, s3_bucket):
    bucket, opts = s3_bucket
    url = f"s3://{bucket}/acts"
    run(tiny_cfg(tiny_model_dir, text_dir, url, storage_options=opts))
    local = str(Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"cmp-{os.getpid()}")
    run(tiny_cfg(tiny_model_dir, text_dir, local, overwrite=True))
    s3, acts_s3, tok_s3, *_ = read_all(url, opts)
    loc, acts_loc, tok_loc, *_ = read_all(local)
    assert s3.n_tokens == loc.n_tokens
    assert torch.equal(acts_s3["layers.2"], acts_loc["layers.2"])
    np.testing.assert_array_equal(tok_s3, tok_loc)


def cache_cmd(model_dir, text_dir, url, *extra):
    return [sys.executable, "-m", "pipeline.cache", f"model.name={model_dir}", "model.device=cpu",
            "data=files", f"data.path=[{text_dir}/*]", "hooks=[layers.2]", "context_size=32",
            "n_tokens=2400", "store.dtype=float32", "store.chunk_contexts=2", "store.shard_contexts=4",
            f"store.url={url}", "progress=false", "batch_size=2", *extra]


def test_kill_9_midway_then_rerun_completes_exactly_once(tiny_model_dir, text_dir, tmp_path):
    env = {**os.environ, "PIPELINE_RUNS": str(tmp_path / "runs")}
    ref, url = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(cache_cmd(tiny_model_dir, text_dir, ref), check=True, env=env, cwd=ROOT)
    proc = subprocess.Popen(cache_cmd(tiny_model_dir, text_dir, url), env=env, cwd=ROOT)
    markers = Path(url) / "_pipeline" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.json")))
    assert 0 < done < 20, f"expected a part-way kill, {done} of 20 shards were done"
    with pytest.raises(StoreIncompleteError):
        ActivationStore.open(url)
    out = subprocess.run(cache_cmd(tiny_model_dir, text_dir, url), check=True, env=env, cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert f"({done} already done)" in out or f"({done + 1} already done)" in out
    assert_same_store(url, ref)
    store = ActivationStore.open(url)
    pairs = list(zip(store.contexts().tolist(), store.positions().tolist()))
    assert len(pairs) == len(set(pairs)) == store.n_tokens


def test_two_concurrent_workers_equal_one_worker(tiny_model_dir, text_dir, tmp_path):
    env = {**os.environ, "PIPELINE_RUNS": str(tmp_path / "runs")}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    procs = [subprocess.Popen(cache_cmd(tiny_model_dir, text_dir, two, f"worker.index={i}", "worker.count=2"),
                              env=env, cwd=ROOT) for i in range(2)]
    run(tiny_cfg(tiny_model_dir, text_dir, one, n_tokens=2400))
    assert [p.wait() for p in procs] == [0, 0]
    assert_same_store(one, two)


def test_data_shorter_than_requested_commits_what_exists(tiny_model_dir, text_dir, tmp_path):
    url = str(tmp_path / "short")
    result = run(tiny_cfg(tiny_model_dir, text_dir, url, n_tokens=20_000))
    store = ActivationStore.open(url)
    assert 0 < store.n_tokens == result.tokens < 20_000 and store.n_tokens % 31 == 0
    assert store.array("hooks/layers.2/acts").shape == (store.n_tokens, 32)


# -- bad input: a clear error, and nothing existing damaged -------------------------------------
def test_unknown_hook_fails_before_touching_storage(tiny_model_dir, text_dir, tmp_path):
    url = tmp_path / "never"
    with pytest.raises(HookNotFoundError, match=r"model\.layers\.0 \.\.\. model\.layers\.3"):
        run(tiny_cfg(tiny_model_dir, text_dir, str(url), hooks=["model.layer.2"]))
    assert not url.exists()


def test_config_mismatch_is_refused_and_data_kept(tiny_model_dir, text_dir, tmp_path):
    url = str(tmp_path / "store")
    run(tiny_cfg(tiny_model_dir, text_dir, url))
    before = read_all(url)[1]["layers.2"]
    with pytest.raises(StoreMismatchError, match="context_size: store has 32, config has 16.*overwrite=true"):
        run(tiny_cfg(tiny_model_dir, text_dir, url, context_size=16))
    assert torch.equal(read_all(url)[1]["layers.2"], before)
    run(tiny_cfg(tiny_model_dir, text_dir, url, context_size=16, overwrite=True))
    assert ActivationStore.open(url).meta["context_size"] == 16


def test_rerun_of_a_complete_store_is_a_no_op(tiny_model_dir, text_dir, tmp_path, capsys):
    url = str(tmp_path / "store")
    run(tiny_cfg(tiny_model_dir, text_dir, url))
    run(tiny_cfg(tiny_model_dir, text_dir, url))
    assert "already complete" in capsys.readouterr().out


def test_empty_data_source(tiny_model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EmptyDataError, match="empty.txt|yields no context"):
        run(tiny_cfg(tiny_model_dir, tmp_path, str(tmp_path / "s"),
                     data=DataConfig(source="files", path=[str(tmp_path / "empty.txt")])))
    with pytest.raises(EmptyDataError, match="matches no files"):
        run(tiny_cfg(tiny_model_dir, tmp_path, str(tmp_path / "s"),
                     data=DataConfig(source="files", path=[str(tmp_path / "nothing*.txt")])))


def test_unreachable_s3_endpoint(tiny_model_dir, text_dir):
    from conftest import free_port
    opts = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"}
    t = time.time()
    with pytest.raises(StorageAccessError, match=r"cannot reach.*127\.0\.0\.1.*endpoint_url"):
        run(tiny_cfg(tiny_model_dir, text_dir, "s3://bucket/acts", storage_options=opts))
    assert time.time() - t < 60


def test_missing_credentials(tiny_model_dir, text_dir, s3_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    opts = {"endpoint_url": s3_server["endpoint_url"], "skip_instance_cache": True}
    with pytest.raises(StorageAccessError, match="AWS_ACCESS_KEY_ID"):
        run(tiny_cfg(tiny_model_dir, text_dir, "s3://nocreds/acts", storage_options=opts))


def test_extend_a_complete_store_and_commit_a_partial_one_early(tiny_model_dir, text_dir, tmp_path):
    """Shards do not depend on the planned size: a finished store grows with a larger n_tokens
    (only the new shards are computed), and an unfinished one can be committed at a smaller size."""
    grown, fresh = str(tmp_path / "grown"), str(tmp_path / "fresh")
    run(tiny_cfg(tiny_model_dir, text_dir, grown, n_tokens=5 * 124))
    result = run(tiny_cfg(tiny_model_dir, text_dir, grown, n_tokens=10 * 124))
    assert result.committed and result.tokens == 5 * 124
    run(tiny_cfg(tiny_model_dir, text_dir, fresh, n_tokens=10 * 124))
    assert_same_store(grown, fresh)
    with pytest.raises(StoreMismatchError, match="would discard data"):
        run(tiny_cfg(tiny_model_dir, text_dir, grown, n_tokens=124))

    early, small = str(tmp_path / "early"), str(tmp_path / "small")
    half = run(tiny_cfg(tiny_model_dir, text_dir, early, n_tokens=10 * 124, worker=WorkerConfig(0, 2)))
    assert not half.committed  # odd shards are missing
    stopped = run(tiny_cfg(tiny_model_dir, text_dir, early, n_tokens=124))
    assert stopped.committed and stopped.tokens == 0  # shard 0 was done: commit at once
    run(tiny_cfg(tiny_model_dir, text_dir, small, n_tokens=124))
    assert_same_store(early, small)
    # committing early deleted the rows of the even shards beyond it: extending again recomputes
    # them (their markers went with their rows) and gives the store a fresh run of that size writes
    regrown = run(tiny_cfg(tiny_model_dir, text_dir, early, n_tokens=10 * 124))
    assert regrown.committed and regrown.tokens == 9 * 124
    assert_same_store(early, fresh)
