"""The training loop: one flat function, the same on 1 process or under torchrun/deepspeed/srun."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, NonFiniteLossError
from pipeline.parallel import Mesh, init_distributed
from pipeline.sae import SAEConfig, checkpoint as export
from pipeline.store import ActivationStore
from pipeline.train.checkpoint import Checkpoints
from pipeline.train import heldout
from pipeline.train.config import TrainConfig
from pipeline.train.data import RankBatches
from pipeline.train.engine import build_engine, precision, sparsity_scale
from pipeline.train.metrics import Logger, step_stats


def train(cfg: TrainConfig) -> Path | None:
    """Train (or resume) the SAE of `cfg`; returns the export folder, or None when stopped by a signal."""
    if cfg.dry_run:
        from pipeline.train.dry_run import dry_run
        dry_run(cfg)
        return None
    # every check that needs no process group comes first, so that bad input fails fast everywhere
    cfg.parallel.validate(int(os.environ.get("WORLD_SIZE", "1")), cfg.sae.n_features)
    if (done := heldout.finished(cfg)) is not None:  # a finished sweep point: nothing to do
        return done
    store = ActivationStore.open(cfg.data.url, cfg.data.storage_options)
    hook = store.hook(cfg.data.hook)
    sae_cfg = with_d_model(cfg.sae, store)
    stats = store.stats[hook]
    scale = math.sqrt(store.d_model / stats.mean_sq_norm)  # so that E||x||^2 = d_model

    device = init_distributed()
    mesh = Mesh(cfg.parallel, device)
    sae = mesh.build_sae(sae_cfg, cfg.seed, mean=stats.mean * scale)
    engine = build_engine(cfg, sae, mesh, device)
    dtype = torch.bfloat16 if precision(cfg, device) == "bf16" else torch.float32
    batches = RankBatches(store, hook, cfg, mesh.dp_rank, cfg.parallel.data_parallel, device)
    out_dir = Path(cfg.out_dir)
    ckpts = Checkpoints(out_dir / "checkpoints", mesh, cfg.keep_checkpoints)
    start = ckpts.resume(engine, batches) if cfg.resume else 0
    if start and mesh.rank == 0:
        print(f"resumed from {ckpts.root / ckpts.latest()} at step {start}", flush=True)
    log = Logger(out_dir, mesh, sae, cfg.steps, start, cfg.batch_size, cfg.log_every, cfg.dense_fraction,
                 cfg.progress)
    stop = _StopSignals()
    try:
        for step in range(start, cfg.steps):
            before = batches.state_dict()  # a checkpoint of the state before this step resumes with this batch
            x = next(batches).to(device, non_blocking=True).mul_(scale).to(dtype)
            out = engine(x, sparsity_scale=sparsity_scale(cfg, step))
            s = step_stats(out, x, stop.received, mesh)
            if s["nonfinite"]:
                folder = ckpts.save(engine, before, step, step * cfg.batch_size)
                raise NonFiniteLossError(
                    f"the loss is {s['loss']} at step {step} (mse {s['mse']}, sparsity {s['sparsity']}, aux "
                    f"{s['aux']}); stopped, and saved the last finite state to {folder}. Fix: lower optim.lr "
                    "or the sparsity coefficient, check the store for non-finite rows, or train in fp32")
            engine.backward(out.loss)
            engine.step()
            log.step(step, s, out.fired)
            done = step + 1
            if s["stop"] or done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                ckpts.save(engine, batches.state_dict(), done, done * cfg.batch_size)
            if s["stop"]:
                if mesh.rank == 0:
                    print(f"stopped by a signal after step {done}; saved {ckpts.root / ckpts.latest()}. Rerun "
                          "the same command to resume", flush=True)
                return None
    finally:
        stop.restore()
        log.close()
        batches.close()
    if not cfg.export:
        return None
    folder = out_dir / "sae"
    if mesh.dp_rank == 0:
        export.save_shard(engine.module, folder, scale, mesh.fp_rank, cfg.parallel.feature_parallel)
    dist.barrier()
    if mesh.rank == 0:
        shards = [cfg.parallel.feature_range(sae_cfg.n_features, r) for r in range(cfg.parallel.feature_parallel)]
        export.save_config(folder, sae_cfg, shards, scale, export_meta(cfg, store, hook, stats, log.last))
        print(f"exported {sae_cfg.architecture} SAE ({sae_cfg.n_features} features) to {folder}", flush=True)
    dist.barrier()
    if cfg.heldout_url:
        heldout.evaluate(engine.module, cfg, hook, scale, dtype, device)
    return folder


def with_d_model(sae: SAEConfig, store: ActivationStore) -> SAEConfig:
    if sae.d_model is not None and sae.d_model != store.d_model:
        raise ConfigError(f"sae.d_model={sae.d_model}, but the store at {store.url!r} holds activations of "
                          f"width {store.d_model}. Fix: drop sae.d_model (it is taken from the store) or "
                          "train on a store of that width")
    return replace(sae, d_model=store.d_model)


def export_meta(cfg: TrainConfig, store: ActivationStore, hook: str, stats, last: dict) -> dict:
    model = store.meta.get("model", {})
    return {"hook": hook, "model": {"id": model.get("id"), "revision": model.get("revision")},
            "store": store.url,
            "normalization": {"mean_sq_norm": stats.mean_sq_norm, "rule": "x * sqrt(d_model / mean_sq_norm)"},
            "training": {"steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size, "batch_size": cfg.batch_size,
                         "seed": cfg.seed, "data_parallel": cfg.parallel.data_parallel,
                         "feature_parallel": cfg.parallel.feature_parallel, "final": last}}


class _StopSignals:
    """SIGTERM and SIGUSR1 (cluster pre-emption) ask for a checkpoint and a clean stop after the
    current step; the flag is shared through the per-step all-reduce, so all ranks stop together."""

    def __init__(self):
        self.received = False
        self.old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        self.received = True

    def restore(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
