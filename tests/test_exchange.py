"""Stores to and from SAELens's cached-activation datasets (pipeline/cache/saelens_dataset.py).

Our store -> SAELens dataset -> store is bit for bit, for every store dtype, two hooks and a
vision-language store's modality. SAELens's own writer (CacheActivationsRunner over a tiny random
TransformerLens model; its model loader is replaced, so nothing is downloaded) -> our store ->
dataset is bit for bit too, and SAELens's own reader (ActivationsStore over cached_activations_path)
reads every export as the store's values. The SAELens side runs in .venv-saelens (tests/saelens_venv.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.exchange import ExchangeConfig, ExchangeStoreConfig, run
from pipeline.cache.saelens_dataset import HEADER_FIELDS, arrow_numpy
from pipeline.errors import ConfigError
from pipeline.store import ActivationStore, ActivationStoreWriter, StoreLayout, commit

sys.path.insert(0, str(Path(__file__).parent))
from saelens_venv import run_saelens  # noqa: E402

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parent.parent
RPC, D, N_CTX = 6, 8, 7  # rows per context, width, contexts: two shards of 4, chunks of 2 (the last short)
HOOKS = ("model.layers.1", "model.layers.3")
TL_NAME = "blocks.1.hook_resid_post"  # model.layers.3 has none in the header: its column keeps our name


def make_store(url: str, dtype: str, modality: bool = False) -> ActivationStore:
    layout = StoreLayout(HOOKS, D, dtype, N_CTX, RPC, shard_contexts=4, chunk_contexts=2, modality=modality)
    header = {"fingerprint": f"test-{dtype}", "context_size": RPC + 1, "drop_positions": 1, "dtype": dtype,
              "hooks": list(HOOKS), "d_model": D,
              "model": {"id": "org/tiny", "revision": "abc123", "dtype": "float32", "architecture": "LlamaForCausalLM"},
              "tokenizer": {"name": "org/tiny", "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 100},
              "data": {"source": "test"}, "hook_modules": list(HOOKS),
              "hook_points": {HOOKS[0]: {"module": HOOKS[0], "transformer_lens": TL_NAME, "meaning": "test"},
                              HOOKS[1]: {"module": HOOKS[1], "transformer_lens": None, "meaning": "test"}}}
    writer = ActivationStoreWriter(url, layout, header)
    g = torch.Generator().manual_seed(1)
    for k in range(layout.n_shards):
        span = layout.shard_contexts_range(k)
        n = len(span) * RPC
        writer.begin_shard(k)
        writer.append({h: torch.randn(n, D, generator=g) * 4 for h in HOOKS}, torch.randint(0, 100, (n,), generator=g),
                      torch.arange(span.start, span.stop, dtype=torch.int32).repeat_interleave(RPC),
                      torch.arange(1, RPC + 1, dtype=torch.int16).repeat(len(span)),
                      torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) if modality else None)
        writer.end_shard(len(span))
    writer.close()
    commit(writer)
    return ActivationStore.open(url)


def arrays(store: ActivationStore) -> dict[str, np.ndarray]:
    """Every array of a store as stored (raw dtype: bfloat16 as its uint16 bits)."""
    names = ["tokens", "context", "position"] + (["modality"] if store.has_modality else []) + \
        [f"hooks/{h}/{leaf}" for h in store.hooks for leaf in ("acts", "norm")]
    return {n: store.array(n)[:] for n in names}


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    xa, xb = arrays(a), arrays(b)
    assert xa.keys() == xb.keys()
    for name in xa:
        assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), f"{name} differs"
    for key in ("dtype", "hooks", *HEADER_FIELDS):
        assert a.meta.get(key) == b.meta.get(key), key
    assert (a.n_tokens, a.n_contexts, a.meta["layout"]["rows_per_context"]) == \
        (b.n_tokens, b.n_contexts, b.meta["layout"]["rows_per_context"])


def dataset_arrays(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A saved dataset's features and its columns in their stored dtype."""
    ds = datasets.load_from_disk(str(path))
    table = ds.with_format("arrow")[:]
    return ds.features.to_dict(), {c: arrow_numpy(table.column(c)) for c in ds.column_names}


def exchange(direction: str, store_url: str, dataset: Path, **kw) -> None:
    run(ExchangeConfig(direction=direction, dataset=str(dataset), store=ExchangeStoreConfig(url=store_url), **kw))


@pytest.mark.parametrize("dtype,modality", [("float32", False), ("float16", True), ("bfloat16", False)])
def test_store_round_trips_through_a_saelens_dataset(tmp_path, dtype, modality):
    store = make_store(str(tmp_path / "store"), dtype, modality)
    exchange("export", store.url, tmp_path / "ds")
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    column_dtype = "float32" if dtype == "bfloat16" else dtype
    assert ds.column_names == [TL_NAME, HOOKS[1], "token_ids"] + (["modality"] if modality else [])
    assert {c: (ds.features[c].shape, ds.features[c].dtype) for c in (TL_NAME, HOOKS[1])} == \
        {c: ((RPC, D), column_dtype) for c in (TL_NAME, HOOKS[1])}
    assert ds.features["token_ids"] == datasets.Sequence(datasets.Value("int32"), length=RPC)
    rows = dataset_arrays(tmp_path / "ds")[1]
    for column, hook in ((TL_NAME, HOOKS[0]), (HOOKS[1], HOOKS[1])):
        assert rows[column].dtype == np.dtype(column_dtype)
        assert np.array_equal(rows[column].reshape(-1, D), store.acts(0, store.n_tokens, hook).to(
            getattr(torch, column_dtype)).numpy())
    assert np.array_equal(rows["token_ids"].reshape(-1), store.tokens())

    exchange("import", str(tmp_path / "back"), tmp_path / "ds")
    back = ActivationStore.open(str(tmp_path / "back"))
    assert_same_store(store, back)
    assert back.meta["imported_from"]["store_fingerprint"] == store.meta["fingerprint"]


def test_exchange_refuses_what_it_cannot_convert(tmp_path):
    store = make_store(str(tmp_path / "store"), "float32")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty.*Fix"):
        exchange("export", store.url, tmp_path / "full")
    datasets.Dataset.from_dict({"blocks.0.hook_resid_post": np.zeros((2, RPC, D), np.float32).tolist()},
                               features=datasets.Features({"blocks.0.hook_resid_post": datasets.Array2D(
                                   shape=(RPC, D), dtype="float32")})).save_to_disk(str(tmp_path / "no-tokens"))
    with pytest.raises(ConfigError, match="no 'token_ids' column.*Fix"):
        exchange("import", str(tmp_path / "imported"), tmp_path / "no-tokens")
    with pytest.raises(ConfigError, match="say import or export"):
        ExchangeConfig(direction="sideways", dataset="x")


def test_command_line_exports_and_imports(tmp_path):
    store = make_store(str(tmp_path / "store"), "float16")
    env = {**os.environ, "PIPELINE_RUNS": str(tmp_path / "runs"), "HF_DATASETS_OFFLINE": "1"}
    said = []
    for args in (["export", f"store.url={store.url}", f"dataset={tmp_path / 'ds'}"],
                 ["import", f"dataset={tmp_path / 'ds'}", f"store.url={tmp_path / 'back'}"]):
        p = subprocess.run([sys.executable, "-m", "pipeline.cache.exchange", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        said.append(p.stdout)
    assert f"exported {N_CTX} contexts" in said[0] and f"imported {N_CTX * RPC} tokens" in said[1]
    assert_same_store(store, ActivationStore.open(str(tmp_path / "back")))


# --- against SAELens's own writer and reader ---------------------------------------------------------

SAELENS_CTX, SAELENS_SEQS = 9, 40
WRITE = """
import json, sys, torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig
import sae_lens.cache_activations_runner as runner
from sae_lens.config import CacheActivationsRunnerConfig
args = json.loads(sys.argv[1])
model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=args["d"], d_head=4, n_heads=2,
                                                  n_ctx=args["ctx"], d_vocab=50, act_fn="relu", seed=0))
runner.load_model = lambda **kwargs: model  # the runner loads its model by name from the Hub
ids = torch.randint(0, 50, (args["n"], args["ctx"]), generator=torch.Generator().manual_seed(0))
for dtype, path in args["out"].items():
    rows = args["ctx"] - 1
    cfg = CacheActivationsRunnerConfig(
        dataset_path="in-memory", model_name="tiny", hook_name="blocks.0.hook_resid_post", d_in=args["d"],
        context_size=args["ctx"], seqpos_slice=(1, None), training_tokens=args["n"] * rows, model_batch_size=4,
        buffer_size_gb=8 * rows * args["d"] * torch.empty(0, dtype=getattr(torch, dtype)).element_size() / 1e9,
        streaming=False, new_cached_activations_path=path, dtype=dtype, device="cpu", prepend_bos=False)
    runner.CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"input_ids": ids.tolist()})).run()
"""
READ = """
import json, sys, torch
from safetensors.torch import save_file
from sae_lens.training.activations_store import ActivationsStore
args = json.loads(sys.argv[1])
out = {}
for tag, r in args["read"].items():
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=r["hook"], hook_head_index=None, context_size=r["rows"],
        d_in=r["d"], n_batches_in_buffer=1, total_training_tokens=r["n"] * r["rows"], store_batch_size_prompts=1,
        train_batch_size_tokens=r["rows"], prepend_bos=False, normalize_activations="none", device="cpu",
        dtype=r["dtype"], cached_activations_path=r["path"])
    acts, tokens = [], []
    while True:
        try:
            a, t = store.get_raw_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            break
        acts.append(a)
        tokens.append(t)
    out[tag + "/acts"], out[tag + "/tokens"] = torch.cat(acts).contiguous(), torch.cat(tokens).contiguous()
save_file(out, args["out"])
"""




def test_saelens_writer_and_reader_agree_with_our_store(tmp_path):
    """SAELens's runner writes float32 and float16 datasets (seqpos_slice (1, None), several arrow
    files each); each imports into a store with exactly its values, which exports back to the same dataset; and
    SAELens's reader reads the exports (and one of a bfloat16 store of ours) as the stores hold them."""
    written = {dtype: tmp_path / f"saelens-{dtype}" for dtype in ("float32", "float16")}
    run_saelens(WRITE, {"d": D, "ctx": SAELENS_CTX, "n": SAELENS_SEQS, "out": {k: str(v) for k, v in written.items()}})
    rows, hook = SAELENS_CTX - 1, "blocks.0.hook_resid_post"
    read, stores = {}, {}
    for dtype, path in written.items():
        exchange("import", str(tmp_path / f"store-{dtype}"), path, model="tiny", first_position=1)
        store = stores[dtype] = ActivationStore.open(str(tmp_path / f"store-{dtype}"))
        features, theirs = dataset_arrays(path)
        assert len(list(path.glob("data-*.arrow"))) > 1
        assert store.dtype == dtype and store.hooks == [hook] and store.n_contexts == len(theirs["token_ids"])
        raw = store.array(f"hooks/{hook}/acts")[:]
        assert raw.dtype == theirs[hook].dtype and np.array_equal(raw, theirs[hook].reshape(-1, D))
        assert np.array_equal(store.tokens(), theirs["token_ids"].reshape(-1))
        assert np.array_equal(store.positions(), np.tile(np.arange(1, SAELENS_CTX), store.n_contexts))
        assert store.meta["model"]["id"] == "tiny" and store.meta["drop_positions"] == 1

        exchange("export", store.url, tmp_path / f"export-{dtype}")
        features_back, back = dataset_arrays(tmp_path / f"export-{dtype}")
        assert features_back == features and back.keys() == theirs.keys()
        for column in theirs:
            assert back[column].dtype == theirs[column].dtype and np.array_equal(back[column], theirs[column]), column
        for tag, where in (("theirs", path), ("ours", tmp_path / f"export-{dtype}")):
            read[f"{tag}-{dtype}"] = {"path": str(where), "hook": hook, "rows": rows, "d": D, "n": store.n_contexts,
                                      "dtype": dtype}
    bf16 = stores["bfloat16"] = make_store(str(tmp_path / "store-bfloat16"), "bfloat16")
    exchange("export", bf16.url, tmp_path / "export-bfloat16")
    read["ours-bfloat16"] = {"path": str(tmp_path / "export-bfloat16"), "hook": TL_NAME, "rows": RPC, "d": D,
                             "n": N_CTX, "dtype": "float32"}
    run_saelens(READ, {"read": read, "out": str(tmp_path / "read.safetensors")})
    got = load_file(str(tmp_path / "read.safetensors"))
    for tag, r in read.items():
        store = stores[tag.split("-")[1]]
        want = store.acts(0, store.n_tokens, store.hooks[0]).to(getattr(torch, r["dtype"]))
        assert got[f"{tag}/acts"].dtype == want.dtype and torch.equal(got[f"{tag}/acts"], want), tag
        assert torch.equal(got[f"{tag}/tokens"].long(), torch.from_numpy(store.tokens()).long()), tag
