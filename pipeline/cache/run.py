"""The caching loop: contexts -> truncated forward pass -> background store writer."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from itertools import islice

import numpy as np
import torch
from tqdm import tqdm

from pipeline import identity
from pipeline.cache.config import CacheConfig
from pipeline.vision import (batch_inputs, image_token_id, manifest_digest, modality_of, pack_vision_contexts,
                                   read_manifest)
from pipeline.data import iter_documents, pack_contexts
from pipeline.errors import ConfigError, EmptyDataError
from pipeline.models import ActivationCapture, load_model
from pipeline.store import ActivationStoreWriter, StoreLayout, commit
from pipeline.store import format as F


def fingerprint(cfg: CacheConfig, layout: StoreLayout, manifest: str | None = None) -> tuple[str, dict]:
    """What decides a store's contents; a rerun with the same fingerprint resumes the store.
    `manifest`: the digest of a vision manifest and its images."""
    desc = {"model": {"name": cfg.model.name, "revision": cfg.model.revision, "dtype": cfg.model.dtype},
            "data": asdict(cfg.data), "hooks": list(cfg.hooks), "context_size": cfg.context_size,
            "drop_positions": cfg.drop_positions,
            # not the planned size: a store can be extended, or committed early, under one fingerprint;
            # modality and checksum only when set, so that text stores, and stores without checksums,
            # keep the fingerprint they had before these existed (an old store resumes with checksum=false)
            "layout": {k: v for k, v in asdict(layout).items()
                       if k != "n_contexts" and (k not in ("modality", "checksum") or v)}}
    if manifest is not None:
        desc["manifest"] = {"path": cfg.manifest, "digest": manifest, "image_splitting": cfg.image_splitting}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16], desc


@dataclass
class CacheResult:
    url: str
    tokens: int     # rows this worker wrote (per hook)
    seconds: float  # wall time of the caching loop, including the final flush
    committed: bool

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def run(cfg: CacheConfig) -> CacheResult:
    """Cache this worker's shards of the store at cfg.store.url."""
    index, count = cfg.worker.resolve()
    items = read_manifest(cfg.manifest) if cfg.manifest else None  # a bad manifest fails before loading
    loaded = load_model(cfg.model)
    capture = ActivationCapture(loaded, cfg.hooks)  # unknown hooks fail here, before any I/O
    image_id = image_token_id(loaded)  # None: a text model, whose store has no modality array
    if items is not None:
        if image_id is None:
            raise ConfigError(f"manifest={cfg.manifest!r} holds images, but model.name={cfg.model.name!r} is a text "
                              "model. Fix: a vision-language model (e.g. model.name=HuggingFaceTB/SmolVLM-256M-Instruct"
                              ") or no manifest")
        contexts = pack_vision_contexts(items, loaded, cfg.context_size, cfg.image_splitting)
    else:
        contexts = pack_contexts(iter_documents(cfg.data), loaded.tokenizer, cfg.context_size)
    first = next(contexts, None)
    if first is None:
        raise EmptyDataError(f"data source {cfg.data.source!r} (path={cfg.data.path}, split={cfg.data.split!r}) "
                             f"yields no context of {cfg.context_size} tokens. Fix: point data at non-empty "
                             "text or lower context_size")
    first_ids, first_extra = batch_inputs([first])
    probe = capture(first_ids, **first_extra)
    widths = {h: a.shape[-1] for h, a in probe.items()}
    if len(set(widths.values())) != 1:
        raise ConfigError(f"hooks have different widths {widths}; cache them into separate stores")

    rows_per_context = cfg.context_size - cfg.drop_positions
    layout = StoreLayout(tuple(cfg.hooks), next(iter(widths.values())), cfg.store.dtype,
                         math.ceil(cfg.n_tokens / rows_per_context), rows_per_context,
                         cfg.store.shard_contexts, cfg.store.chunk_contexts, cfg.store.compressor,
                         modality=image_id is not None, checksum=cfg.store.checksum)
    fp, desc = fingerprint(cfg, layout, manifest_digest(cfg.manifest, items) if items is not None else None)
    tok = loaded.tokenizer
    header = {"fingerprint": fp, "config": desc, "d_model": layout.d_model, "hooks": list(cfg.hooks),
              "hook_modules": capture.names, "dtype": cfg.store.dtype, "context_size": cfg.context_size,
              "drop_positions": cfg.drop_positions,
              "model": identity.model_record(cfg.model, loaded),
              "hook_points": identity.hook_points(loaded, cfg.hooks, capture.names),
              "tokenizer": {"name": getattr(tok, "name_or_path", None), "bos_token_id": tok.bos_token_id,
                            "eos_token_id": tok.eos_token_id, "vocab_size": len(tok)},
              "data": asdict(cfg.data)}
    if image_id is not None:
        header["modality"] = {"values": {str(k): v for k, v in F.MODALITIES.items()}, "image_token_id": image_id,
                              "manifest": cfg.manifest, "image_splitting": cfg.image_splitting}
    writer = ActivationStoreWriter(cfg.store.url, layout, header, storage_options=cfg.store.storage_options,
                                   overwrite=cfg.store.overwrite, outlier_factor=cfg.outlier_factor)
    if writer.is_committed():
        writer.close()
        print(f"store {cfg.store.url} is already complete", flush=True)
        return CacheResult(cfg.store.url, 0, 0.0, True)

    done = writer.finished_shards()
    mine = [k for k in range(layout.n_shards) if k % count == index and k not in done] \
        if not cfg.commit_only else []
    total = sum(len(layout.shard_contexts_range(k)) for k in mine) * rows_per_context
    print(f"worker {index}/{count}: {len(mine)} of {layout.n_shards} shards to write "
          f"({len(done)} already done) -> {cfg.store.url}", flush=True)
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not cfg.progress or not total,
               desc=f"cache {index}/{count}", smoothing=0.1, mininterval=2)
    stream = _Stream(first, contexts)
    start, written = time.perf_counter(), 0
    try:
        for k in mine:
            span = layout.shard_contexts_range(k)
            batch_ctx = stream.take(span.start, len(span))
            writer.begin_shard(k)
            for b in range(0, len(batch_ctx), cfg.batch_size):
                ids, extra = batch_inputs(batch_ctx[b:b + cfg.batch_size])
                acts = capture(ids, **extra)
                d = cfg.drop_positions
                n, t = ids.shape[0], ids.shape[1] - d
                ctx_index = torch.arange(span.start + b, span.start + b + n, dtype=torch.int32)
                writer.append({h: a[:, d:].reshape(n * t, -1) for h, a in acts.items()},
                              ids[:, d:].reshape(-1), ctx_index[:, None].expand(n, t).reshape(-1),
                              torch.arange(d, ids.shape[1])[None].expand(n, t).reshape(-1),
                              modality_of(ids[:, d:], image_id).reshape(-1) if image_id is not None else None)
                bar.update(n * t)
                written += n * t
            writer.end_shard(len(batch_ctx))
        writer.close()
    finally:
        bar.close()
    result = CacheResult(cfg.store.url, written, time.perf_counter() - start, False)
    if result.tokens:
        print(f"cached {result.tokens} tokens in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tokens/s)")
    record = None
    if cfg.commit or cfg.commit_only:
        record = commit(writer)
        if record is None:
            missing = layout.n_shards - len(writer.finished_shards())
            print(f"{missing} shard(s) still being written by other workers; the last one commits", flush=True)
        else:
            print(f"committed {record['n_tokens']} tokens x {len(cfg.hooks)} hook(s) to {cfg.store.url}", flush=True)
    result.committed = record is not None
    return result


class _Stream:
    """The deterministic context stream, consumed forward only: a worker skips other workers' shards."""

    def __init__(self, first: np.ndarray, rest):
        self.pos, self.first, self.rest = 0, first, rest

    def take(self, start: int, n: int) -> list[np.ndarray]:
        if start < self.pos:
            raise RuntimeError("shards must be taken in increasing order")
        it = self.rest if self.first is None else _prepend(self.first, self.rest)
        self.first = None
        for _ in islice(it, start - self.pos):
            pass
        out = list(islice(it, n))
        self.pos = start + len(out)
        self.rest = it
        return out


def _prepend(x, it):
    yield x
    yield from it
