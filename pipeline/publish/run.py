"""Stage 4: build a release folder from exported SAEs and their evaluation, then upload it."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import ConfigError, InputNotFoundError, UserError
from pipeline.publish import card, hub, target
from pipeline.publish.config import PublishConfig
from pipeline.analysis.release import CARD, HISTOGRAM, MANIFEST, METRICS, is_release
from pipeline.publish.release import SAESource, parse_size, sae_id_for, write_sae_folder
from pipeline.sae.checkpoint import read_config

log = logging.getLogger("pipeline.publish")
DENSITY_FILES = ("feature_density.safetensors", "feature_density.npy")
"""Per-feature densities from evaluation, if not in metrics.json under feature_density."""


class MissingMetricsError(InputNotFoundError):
    """A checkpoint has no evaluation metrics to publish with it."""


class OutDirNotEmptyError(UserError, FileExistsError):
    """out_dir holds files that are not a release: rebuilding the release there would delete them."""


@dataclass
class PublishResult:
    folder: Path
    sae_ids: list[str]
    hub: hub.HubPlan | None = None
    target: target.CopyPlan | None = None
    operations: list[str] = field(default_factory=list)


def eval_candidates(checkpoint: Path) -> list[Path]:
    return [checkpoint, checkpoint / "eval", checkpoint / "evaluate", checkpoint.parent / "eval",
            checkpoint.parent / "evaluate", checkpoint.parent]


def find_dashboard(checkpoint: Path, eval_dir: Path | None, dashboard_dir: str | None) -> Path | None:
    if dashboard_dir:
        d = Path(dashboard_dir)
        if not (d / "index.html").is_file():
            raise InputNotFoundError(f"dashboard_dirs entry {dashboard_dir!r} has no index.html. Fix: point it at "
                                     "the out_dir of `python -m pipeline.interpret`, or leave dashboard_dirs empty")
        return d
    for d in ([eval_dir / "dashboard"] if eval_dir else []) + [checkpoint.parent / "interpret",
                                                                checkpoint.parent / "dashboard"]:
        if (d / "index.html").is_file():
            return d
    return None


def find_source(checkpoint: str, eval_dir: str | None, require_metrics: bool,
                dashboard_dir: str | None = None) -> SAESource:
    ckpt = Path(checkpoint)
    if not (ckpt / "cfg.json").is_file():
        raise InputNotFoundError(f"no exported SAE at {checkpoint!r} (cfg.json is missing). Fix: point checkpoints "
                                 "at a training run's export folder, e.g. checkpoints=[runs/demo/train/topk/sae]")
    dirs = [Path(eval_dir)] if eval_dir else eval_candidates(ckpt)
    where = next((d for d in dirs if (d / METRICS).is_file()), None)
    if where is None:
        if require_metrics:
            raise MissingMetricsError(
                f"checkpoint {checkpoint!r} has no evaluation metrics: no {METRICS} in "
                f"{', '.join(str(d) for d in dirs)}. Fix: evaluate it first (python -m pipeline.evaluate), pass "
                "eval_dirs=[<folder with metrics.json>], or publish without metrics with require_metrics=false")
        log.warning("publishing %s without evaluation metrics (require_metrics=false)", checkpoint)
        return SAESource(ckpt, None, None, find_dashboard(ckpt, None, dashboard_dir), None)
    metrics = json.loads((where / METRICS).read_text())
    pngs = sorted(p for p in where.glob("*.png") if "dens" in p.name or "hist" in p.name)
    return SAESource(ckpt, metrics, pngs[0] if pngs else None, find_dashboard(ckpt, where, dashboard_dir),
                     _density(metrics, where))


def _density(metrics: dict, where: Path) -> torch.Tensor | None:
    for scope in (metrics, *(v for v in metrics.values() if isinstance(v, dict))):
        if isinstance(scope.get("feature_density"), list):
            return torch.tensor(scope["feature_density"], dtype=torch.float64)
    if (where / DENSITY_FILES[0]).is_file():
        from safetensors.torch import load_file
        tensors = load_file(str(where / DENSITY_FILES[0]))
        return tensors.get("density", next(iter(tensors.values())))
    if (where / DENSITY_FILES[1]).is_file():
        import numpy as np
        return torch.from_numpy(np.load(where / DENSITY_FILES[1]))
    return None


def build(cfg: PublishConfig) -> tuple[Path, list[dict]]:
    """Write the release folder (replacing a previous release there); returns it and its SAEs."""
    sources = [find_source(c, cfg.eval_dirs[i] if cfg.eval_dirs else None, cfg.require_metrics,
                           cfg.dashboard_dirs[i] if cfg.dashboard_dirs else None)
               for i, c in enumerate(cfg.checkpoints)]
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()) and not list(out.glob(f"*/{MANIFEST}")) and not (out / CARD).exists():
        raise OutDirNotEmptyError(f"out_dir={cfg.out_dir!r} holds files that are not a release, and the release "
                                  "folder is rebuilt (emptied) on every run. Fix: choose an empty or new out_dir")
    seen: dict[str, tuple[str, str | None]] = {}  # sae_id -> (checkpoint, hook)
    for src in sources:
        if is_release(src.checkpoint):  # release.load reads a release folder too; its cfg.json is SAELens's
            hook = json.loads((src.checkpoint / "cfg.json").read_text()).get("hook")
        else:  # an export: its format and version checked before anything is written
            hook = read_config(src.checkpoint).get("hook")
        sid = src.sae_id or sae_id_for(hook)
        if sid in seen:
            raise ConfigError(f"checkpoints {seen[sid][0]!r} (hook {seen[sid][1]!r}) and {str(src.checkpoint)!r} "
                              f"(hook {hook!r}) both go to the release folder {sid!r}: a release holds one SAE "
                              "per hook. Fix: remove one from checkpoints, or publish them as separate releases "
                              "(another out_dir and path_in_repo or target)")
        seen[sid] = (str(src.checkpoint), hook)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saes = []
    for src, sid in zip(sources, seen):
        manifest = write_sae_folder(src, tmp / sid, parse_size(cfg.max_shard_size), cfg.context_size,
                                    cfg.datasets[0] if cfg.datasets else None)
        doc = json.loads((tmp / sid / "pipeline.json").read_text())
        saes.append({"sae_id": sid, "doc": doc, "metrics": src.metrics, "has_histogram": HISTOGRAM in manifest["files"],
                     "has_dashboard": src.dashboard is not None, "sharded": len(doc["release"]["weights"]) > 1})
    location = cfg.target if not cfg.repo_id else None
    (tmp / CARD).write_text(card.render(saes, repo_id=cfg.repo_id, path_in_repo=cfg.path_in_repo,
                                        location=location, license=cfg.license, base_model=cfg.base_model,
                                        datasets=cfg.datasets, tags=cfg.tags, title=cfg.title))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out, saes


def run(cfg: PublishConfig) -> PublishResult:
    folder, saes = build(cfg)
    res = PublishResult(folder, [s["sae_id"] for s in saes])
    log.info("release folder %s: %s", folder, ", ".join(res.sae_ids))
    message = cfg.commit_message or f"Publish {', '.join(res.sae_ids)} with pipeline"
    if cfg.repo_id:
        res.hub = hub.publish(folder, cfg.repo_id, revision=cfg.revision, path_in_repo=cfg.path_in_repo,
                              private=cfg.private, endpoint=cfg.endpoint,
                              single_commit=parse_size(cfg.single_commit_size), commit_size=parse_size(cfg.commit_size),
                              commit_message=message, dry_run=cfg.dry_run, progress=cfg.progress)
        res.operations += res.hub.describe(cfg.repo_id, cfg.revision)
    if cfg.target:
        res.target = target.copy(folder, cfg.target, cfg.storage_options, dry_run=cfg.dry_run)
        res.operations += res.target.describe(cfg.target)
    if not cfg.repo_id and not cfg.target:
        res.operations.append(f"no repo_id or target: the release is the folder {folder}")
    if cfg.dry_run:
        print(f"dry run: wrote {folder}; would do:")
        print("\n".join(res.operations))
    return res
