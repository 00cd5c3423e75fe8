"""Held-out metrics of a finished training run, written to out_dir/heldout.json: the number a
scaling-law sweep fits (pipeline/scaling). The file, its keys and its reader: pipeline/heldout.py.

With `heldout_url` set (a store cached from held-out text, e.g. `python -m pipeline.cache
data.split=test`), the trainer calls `evaluate` after the export: every rank reads the same first
`heldout_tokens` rows of that store (the training store's hook, exclusion rules and input scale)
and runs the trained module itself, so a feature-sharded SAE is evaluated by its own shards. A
rerun whose out_dir already holds heldout.json for the same configuration returns at once
(`finished`): that is how a killed sweep skips its finished points.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.heldout import EXPORT_DIR, FORMAT_NAME, FORMAT_VERSION, HELDOUT_FILE, read, write


def point(cfg) -> dict:
    """What makes a run this run (a TrainConfig), as JSON would give it back."""
    doc = {"sae": asdict(cfg.sae), "n_tokens": cfg.n_tokens, "batch_size": cfg.batch_size, "seed": cfg.seed,
           "data_url": cfg.data.url, "hook": cfg.data.hook, "optim": asdict(cfg.optim),
           "heldout_url": cfg.heldout_url, "heldout_tokens": cfg.heldout_tokens}
    return json.loads(json.dumps(doc))


def finished(cfg) -> Path | None:
    """The export folder when out_dir already holds this configuration's heldout.json (nothing to
    do), else None. Every rank reads the file and decides the same. resume=false trains again."""
    if not cfg.heldout_url or not cfg.resume:
        return None
    try:
        doc = read(cfg.out_dir)
    except ValueError:  # a truncated file (killed while writing): evaluate again
        return None
    if doc is None:
        return None
    if doc.get("point") != point(cfg):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{Path(cfg.out_dir) / HELDOUT_FILE} was written for another configuration; training this one",
                  flush=True)
        return None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{Path(cfg.out_dir) / HELDOUT_FILE} exists for this configuration (held-out FVU {doc['fvu']:.4g}): "
              "finished, nothing to do. Delete it to evaluate again", flush=True)
    return Path(cfg.out_dir) / EXPORT_DIR


@torch.no_grad()
def evaluate(sae, cfg, hook: str, scale: float, dtype: torch.dtype, device: torch.device) -> dict:
    """Collective (every rank of the run): held-out metrics of the trained module `sae` (this rank's
    shard); rank 0 writes out_dir/heldout.json. Returns the metrics on every rank."""
    from pipeline.store import ActivationLoader

    loader = ActivationLoader(cfg.heldout_url, cfg.batch_size, hook=hook, seed=cfg.seed, epochs=1,
                              shuffle_buffer=cfg.data.shuffle_buffer, device=device,
                              expected_d_model=sae.cfg.d_model, storage_options=cfg.data.storage_options,
                              exclude_positions_below=cfg.data.exclude_positions_below,
                              exclude_norm_factor=cfg.data.exclude_norm_factor)
    was_training = sae.training
    sae.eval()
    n, sse, sum_sq, l0, sparsity = 0, 0.0, 0.0, 0.0, 0.0
    sum_x = torch.zeros(sae.cfg.d_model, dtype=torch.float64, device=device)
    fired = torch.zeros(len(sae.features), dtype=torch.int64, device=device)
    try:
        for x in loader:
            x = x[:cfg.heldout_tokens - n].to(device).mul_(scale).to(dtype)
            out = sae(x)
            xd = x.double()
            sse += float((xd - out.x_hat.double()).pow(2).sum())
            sum_sq += float(xd.pow(2).sum())
            sum_x += xd.sum(0)
            l0 += float(out.l0) * len(x)
            sparsity += float(out.sparsity) * len(x)
            fired += out.fired.to(fired.device).long()
            n += len(x)
            if n >= cfg.heldout_tokens:
                break
    finally:
        loader.close()
        sae.train(was_training)
    if n == 0:
        from pipeline.errors import ConfigError
        raise ConfigError(f"heldout_url={cfg.heldout_url!r} gave no rows after the exclusion rules. Fix: point it "
                          "at a store of held-out activations (python -m pipeline.cache data.split=test ...)")
    dead = int(sae.comm.sum_features((fired == 0).sum()))
    variance = sum_sq - float(sum_x.pow(2).sum()) / n
    mse = sse / n
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
           "architecture": sae.cfg.architecture, "n_features": sae.cfg.n_features, "k": sae.cfg.k,
           "d_model": sae.cfg.d_model, "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size,
           "batch_size": cfg.batch_size, "hook": hook, "heldout_url": cfg.heldout_url, "n_rows": n,
           "excluded_rows": loader.excluded, "input_scale": scale,
           "mse": mse, "fvu": sse / variance if variance > 0 else math.nan, "nmse": sse / sum_sq,
           "l0": l0 / n, "sparsity": sparsity / n, "proxy_loss": mse + sparsity / n,
           "dead_fraction": dead / sae.cfg.n_features, "point": point(cfg)}
    if torch.distributed.get_rank() == 0:
        path = write(cfg.out_dir, doc)
        print(f"held-out ({n} rows of {cfg.heldout_url}): FVU {doc['fvu']:.4g}  MSE {mse:.4g}  L0 {doc['l0']:.1f}  "
              f"dead {doc['dead_fraction']:.1%}; wrote {path}", flush=True)
    return doc
