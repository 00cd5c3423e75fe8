"""Text sources, tokenisation and packing into fixed-length contexts that start with BOS."""

from __future__ import annotations

import glob
import hashlib
import json
import random
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import ConfigError, EmptyDataError

SOURCES = ("embedded", "files", "hf")
SPLITS = ("train", "test", "all")


@dataclass
class DataConfig:
    source: str = "embedded"
    """embedded (the offline multilingual corpus), files (.txt or .jsonl globs) or hf (a Hugging Face dataset, streamed)."""
    path: list[str] = field(default_factory=list)
    """files: glob patterns; hf: [dataset name] (a hub id or a local builder such as `json`)."""
    data_files: list[str] = field(default_factory=list)
    """hf only: the data_files argument of datasets.load_dataset."""
    hf_name: str | None = None
    """hf only: the dataset's configuration name."""
    hf_split: str = "train"
    text_column: str = "text"
    languages: list[str] = field(default_factory=lambda: ["en", "de", "es", "it"])
    """embedded only: which languages of the corpus to use."""
    split: str = "train"
    """train, test or all: local documents are assigned to test by a hash of their text (or of their
    JSONL `group` field where they have one: the translations of a passage share a group, so they
    fall on the same side), so the held-out set never overlaps the training set whatever the shuffle."""
    test_fraction: float = 0.02
    shuffle_seed: int | None = 0
    """Seeded document shuffle for local sources (mixes languages and files); null keeps file order."""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} is not one of {SOURCES}")
        if self.split not in SPLITS:
            raise ConfigError(f"data.split={self.split!r} is not one of {SPLITS}")


def in_split(key: str, split: str, fraction: float) -> bool:
    """Whether a document whose split key (its text, or its group) is `key` belongs to `split`."""
    if split == "all":
        return True
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
    return (h < fraction) == (split == "test")


def _read_local(files: list[Path], column: str) -> Iterator[tuple[str, str]]:
    """(text, split key) of each document."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        row = json.loads(line)
                        yield row[column], row.get("group") or row[column]
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            yield text, text


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of the configured source and split, in a deterministic order."""
    if cfg.source == "hf":
        if not cfg.path:
            raise ConfigError("data.source=hf needs data.path=[<dataset name>]")
        import datasets
        ds = datasets.load_dataset(cfg.path[0], cfg.hf_name, split=cfg.hf_split, streaming=True,
                                   data_files=cfg.data_files or None)
        for row in ds:
            if cfg.text_column not in row:
                raise ConfigError(f"data.text_column={cfg.text_column!r} is not a column of {cfg.path[0]}; "
                                  f"columns: {sorted(row)}")
            yield row[cfg.text_column]
        return
    if cfg.source == "embedded":
        from pipeline.corpus import LANGUAGES, corpus_dir
        bad = [x for x in cfg.languages if x not in LANGUAGES]
        if bad:
            raise ConfigError(f"data.languages has {bad}; the embedded corpus has {list(LANGUAGES)}")
        root = corpus_dir()
        files = [root / f"{lang}.jsonl" for lang in cfg.languages]
        if not all(f.exists() for f in files):
            raise EmptyDataError(f"the embedded corpus is not in {root}. Fix: make setup "
                                 "(or python -m pipeline.corpus)")
    else:
        files = sorted({Path(p) for pat in cfg.path for p in glob.glob(pat, recursive=True)})
        if not files:
            raise EmptyDataError(f"data.path={cfg.path} matches no files. Fix: give existing .txt or "
                                 ".jsonl files or glob patterns")
    docs = [d for d, key in _read_local(files, cfg.text_column) if d.strip() and
            in_split(key, cfg.split, cfg.test_fraction)]
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(docs)
    yield from docs


def pack_contexts(docs: Iterator[str], tokenizer, context_size: int, batch_docs: int = 256) -> Iterator[np.ndarray]:
    """Concatenate documents (each followed by EOS) and cut the stream into contexts of
    `context_size` tokens, each starting with BOS; the tail shorter than a context is dropped."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    if bos is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    body = context_size - 1
    buf: list[int] = []
    docs = iter(docs)
    while batch := list(islice(docs, batch_docs)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            if eos is not None:
                buf.append(eos)
        n = len(buf) // body
        for i in range(n):
            yield np.array([bos] + buf[i * body:(i + 1) * body], dtype=np.int64)
        buf = buf[n * body:]


def source_description(cfg: DataConfig) -> dict:
    """What the store records as its data source."""
    from dataclasses import asdict
    return asdict(cfg)
