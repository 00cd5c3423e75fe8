"""The training loop: one flat function, the same on 1 process or under torchrun/deepspeed/srun."""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import identity
from pipeline.device import resolve_device
from pipeline.errors import NonFiniteLossError
from pipeline.heldout import CHECKPOINTS_DIR, EXPORT_DIR
from pipeline.parallel import Mesh, init_distributed
from pipeline.sae import checkpoint as export
from pipeline.store import ActivationStore
from pipeline.store.loader import Interrupted
from pipeline.train.checkpoint import Checkpoints, tag
from pipeline.train import heldout, recipe
from pipeline.train.config import TrainConfig
from pipeline.train.data import RankBatches, with_d_model
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
    device = resolve_device(cfg.device, "device")
    if (done := heldout.finished(cfg)) is not None:  # a finished sweep point: nothing to do
        return done
    store = ActivationStore.open(cfg.data.url, cfg.data.storage_options)
    hook = store.hook(cfg.data.hook)
    sae_cfg = recipe.sae_config(with_d_model(cfg.sae, store), cfg)
    stats = store.stats[hook]
    scale = math.sqrt(store.d_model / stats.mean_sq_norm)  # so that E||x||^2 = d_model

    with ExitStack() as cleanup:
        stop = cleanup.enter_context(_StopSignals())  # from here on a signal asks for a stop, never kills
        device = init_distributed(device)
        mesh = Mesh(cfg.parallel, device)
        # before the engine: a batch larger than an epoch is refused without waiting for DeepSpeed
        batches = RankBatches(store, hook, cfg, mesh.dp_rank, cfg.parallel.data_parallel, device, stop.event)
        cleanup.callback(batches.close)
        sae = mesh.build_sae(sae_cfg, cfg.seed, mean=stats.mean * scale)
        try:  # before the engine copies the weights; the architecture reads the sample only if it needs one
            sae.init_from_data(lambda: batches.sample().to(device).mul_(scale))
        except Interrupted:
            pass  # a signal: the first step's agreement below stops the run
        engine = build_engine(cfg, sae, mesh, device)
        dtype = torch.bfloat16 if precision(cfg, device) == "bf16" else torch.float32
        out_dir = Path(cfg.out_dir)
        ckpts = Checkpoints(out_dir / CHECKPOINTS_DIR, mesh, sae_cfg, cfg.keep_checkpoints)
        start = ckpts.resume(engine, batches) if cfg.resume else 0
        if mesh.rank == 0:
            o = recipe.resolved(cfg)
            scaled = "".join(f", {len(g['params'])} tensor(s) at {g['lr_scale']:g}x that rate"
                             for g in sae.param_groups() if g["lr_scale"] != 1)
            print(f"optimizer: Adam lr {o['lr']:.3g} ({o['rule']}){scaled}, betas {tuple(o['betas'])}, warm-up "
                  f"{o['lr_warmup_steps']} of {cfg.steps} steps, linear decay over the last "
                  f"{o['lr_decay_fraction']:.0%}; a latent is dead after {sae_cfg.dead_tokens:,} tokens without firing",
                  flush=True)
            if start:
                print(f"resumed from {ckpts.root / ckpts.latest()} at step {start}", flush=True)
        log = Logger(out_dir, mesh, sae, cfg.steps, start, cfg.batch_size, cfg.log_every, cfg.dense_fraction,
                     cfg.progress)
        cleanup.callback(log.close)
        saved = start  # the step of the newest checkpoint (0: none)
        for step in range(start, cfg.steps):
            before = batches.state_dict()  # a checkpoint of the state before this step resumes with this batch
            try:
                x = next(batches)
            except Interrupted:  # a signal ended the wait for data
                x = None
            if stop.agreed(device):
                if step > saved:
                    ckpts.save(engine, before, step, step * cfg.batch_size)
                    saved = step
                if mesh.rank == 0:
                    where = f"checkpoint {ckpts.root / tag(saved)}" if saved else "no step was done, nothing to save"
                    print(f"stopped by a signal after step {step}; {where}. Rerun the same command to resume",
                          flush=True)
                return None
            x = x.to(device, non_blocking=True).mul_(scale).to(dtype)
            out = engine(x, sparsity_scale=sparsity_scale(cfg, step))
            s = step_stats(out, x, mesh)
            if s["nonfinite"]:
                folder = ckpts.save(engine, before, step, step * cfg.batch_size)
                raise nonfinite_loss(s, step, folder, batches, before, store.url)
            engine.backward(out.loss)
            s["lr"] = float(engine.get_lr()[0])  # this step's rate (torchao keeps it as a tensor)
            engine.step()
            log.step(step, s, out.fired)
            done = step + 1
            if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                ckpts.save(engine, batches.state_dict(), done, done * cfg.batch_size)
                saved = done
    if not cfg.export:
        return None
    folder = out_dir / EXPORT_DIR
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


def export_meta(cfg: TrainConfig, store: ActivationStore, hook: str, stats, last: dict) -> dict:
    return {"hook": hook, **identity.export_identity(store.meta, hook), "store": store.url,
            "normalization": {"mean_sq_norm": stats.mean_sq_norm, "rule": "x * sqrt(d_model / mean_sq_norm)"},
            "training": {"steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size, "batch_size": cfg.batch_size,
                         "seed": cfg.seed, "data_parallel": cfg.parallel.data_parallel,
                         "feature_parallel": cfg.parallel.feature_parallel, "optim": recipe.resolved(cfg),
                         "final": last}}


def nonfinite_loss(s: dict, step: int, folder: Path, batches: RankBatches, state: dict,
                   url: str) -> NonFiniteLossError:
    """The error for a non-finite loss at `step`, naming the store rows of its global batch (the
    one after loader state `state`) that hold NaN or infinite values, if any. Collective: each
    rank reads its share of the batch again."""
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, batches.nonfinite_rows(state))
    rows = sorted(set().union(*shares))  # feature-parallel ranks share their rows
    if rows:
        listed = ", ".join(map(str, rows[:20])) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
        cause = f"the batch holds NaN or infinite input values in store rows {listed} of {url}"
        fix = "re-cache the store (data.exclude_norm_factor also drops rows whose stored norm is not finite)"
    else:
        cause = "every input row of the batch is finite"
        fix = "lower optim.lr or the sparsity coefficient, or train in fp32"
    return NonFiniteLossError(
        f"the loss is {s['loss']} at step {step} (mse {s['mse']}, sparsity {s['sparsity']}, aux {s['aux']}); "
        f"{cause}; stopped, and saved the last finite state to {folder}. Fix: {fix}")


class _StopSignals:
    """SIGTERM and SIGUSR1 (a scheduler's pre-emption; slurm/train.sbatch sends USR1) ask for a
    checkpoint of the last step and a stop with exit status 0, which the batch script takes as
    "requeue me". The handler only sets an event, which ends a wait for data within a second
    (RankBatches) and which every rank reads at the same point of each step, before the step's
    collectives, in one all-reduce (`agreed`): all ranks stop at the same step, also when the
    signal found some of them waiting for data and others waiting in that all-reduce. A step
    under way is finished first: one rank cannot leave its collectives halfway."""

    def __init__(self):
        self.event = threading.Event()

    def __enter__(self) -> "_StopSignals":
        self.old = {sig: signal.signal(sig, lambda signum, frame: self.event.set())
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a signal. Collective; the same code on gloo and NCCL."""
        if dist.get_world_size() == 1:
            return self.event.is_set()
        flag = torch.tensor([float(self.event.is_set())], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
