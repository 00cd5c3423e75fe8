"""Text sources and context packing."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.data import DataConfig, iter_documents, pack_contexts
from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_contexts_start_with_bos_and_concatenate_documents_with_eos(tok):
    docs = ["alpha beta gamma " * 20, "delta epsilon " * 30, "short"]
    ctxs = list(pack_contexts(iter(docs), tok, 16))
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ctxs) == len(stream) // 15
    assert all(c[0] == tok.bos_token_id and len(c) == 16 for c in ctxs)
    np.testing.assert_array_equal(np.concatenate([c[1:] for c in ctxs]), stream[:15 * len(ctxs)])


def test_embedded_corpus_is_multilingual_and_splits_are_disjoint():
    test = set(iter_documents(DataConfig(source="embedded", split="test")))
    train = list(iter_documents(DataConfig(source="embedded", split="train", languages=["de", "it"])))
    assert 100 < len(test) and not test & set(train)
    assert any("der" in d.split() for d in train) and any("che" in d.split() for d in train)
    again = list(iter_documents(DataConfig(source="embedded", split="train", languages=["de", "it"])))
    assert again == train  # deterministic shuffle


def test_hf_datasets_streaming_source_with_local_files(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": f"text number {i}"}) + "\n" for i in range(5)))
    cfg = DataConfig(source="hf", path=["json"], data_files=[str(path)], text_column="body", split="all")
    assert list(iter_documents(cfg)) == [f"text number {i}" for i in range(5)]
    with pytest.raises(ConfigError, match="'text' is not a column.*body"):
        list(iter_documents(DataConfig(source="hf", path=["json"], data_files=[str(path)], split="all")))


def test_bad_source_and_language():
    with pytest.raises(ConfigError, match="data.source='web'"):
        DataConfig(source="web")
    with pytest.raises(ConfigError, match=r"\['xx'\].*en"):
        list(iter_documents(DataConfig(languages=["xx"])))
