"""Stage 4: build a release folder from exported SAEs and their evaluation, then upload it.

Publish reads only what it is given: each checkpoint (an export), the evaluation stage's out_dir for
it (eval_dirs), the interpretation stage's (dashboard_dirs) and, for a Neuronpedia export, the audit
stage's (neuronpedia.audit_dirs), each file by the name its producing
stage's contract gives it (pipeline/analysis/metrics.py METRICS_FILE, HISTOGRAM_FILE;
pipeline/analysis/html.py INDEX_FILE). It looks for nothing anywhere else; a missing input is an
error naming the path and the stage that writes it."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.analysis.html import INDEX_FILE
from pipeline.analysis.metrics import HISTOGRAM_FILE, METRICS_FILE
from pipeline.analysis.release import CARD, MANIFEST, PIPELINE_CONFIG, SAELENS_CFG, is_release
from pipeline.errors import ConfigError, InputNotFoundError, UserError
from pipeline.heldout import EXPORT_DIR
from pipeline.publish import card, hub, target
from pipeline.publish.config import PublishConfig
from pipeline.publish.neuronpedia import NeuronpediaExport
from pipeline.publish.release import SAESource, parse_size, sae_id_for, write_sae_folder
from pipeline.sae.checkpoint import CONFIG_FILE, read_config

log = logging.getLogger("pipeline.publish")


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


def read_dashboard(checkpoint: str, dashboard_dir: str | None) -> Path | None:
    """The interpretation stage's out_dir given for `checkpoint` (None when none is given)."""
    if not dashboard_dir:
        return None
    d = Path(dashboard_dir)
    if not (d / INDEX_FILE).is_file():
        raise InputNotFoundError(f"dashboard_dirs entry {dashboard_dir!r} holds no dashboard: {d / INDEX_FILE} is "
                                 f"missing. Fix: write it (python -m pipeline.interpret input.checkpoint={checkpoint} "
                                 f"out_dir={dashboard_dir}), point the entry at the out_dir of the run that did, or "
                                 "leave the entry empty to publish without a dashboard")
    return d


def find_source(checkpoint: str, eval_dir: str | None, require_metrics: bool,
                dashboard_dir: str | None = None) -> SAESource:
    """What goes into one SAE folder: the export at `checkpoint` and what publish is given for it."""
    ckpt = Path(checkpoint)
    if not (ckpt / CONFIG_FILE).is_file():
        raise InputNotFoundError(f"no exported SAE at {checkpoint!r} ({ckpt / CONFIG_FILE} is missing). Fix: point "
                                 "checkpoints at a training run's export (python -m pipeline.train writes it to "
                                 f"<out_dir>/{EXPORT_DIR}), e.g. checkpoints=[<out_dir>/{EXPORT_DIR}]")
    dashboard = read_dashboard(checkpoint, dashboard_dir)
    evaluate = f"python -m pipeline.evaluate input.checkpoint={checkpoint} out_dir={eval_dir or '<folder>'}"
    if not eval_dir:
        if require_metrics:
            raise MissingMetricsError(
                f"checkpoint {checkpoint!r} has no evaluation metrics: eval_dirs names no folder for it, and publish "
                f"reads {METRICS_FILE} only from the folder it is given. Fix: evaluate it ({evaluate}) and pass "
                "eval_dirs=[<folder>] (one per checkpoint), or publish without metrics with require_metrics=false")
        log.warning("publishing %s without evaluation metrics (require_metrics=false)", checkpoint)
        return SAESource(ckpt, None, None, dashboard, None)
    where = Path(eval_dir)
    if not (where / METRICS_FILE).is_file():
        raise MissingMetricsError(
            f"checkpoint {checkpoint!r} has no evaluation metrics: {where / METRICS_FILE} is missing. Fix: evaluate "
            f"it ({evaluate}), pass eval_dirs=[<the out_dir of the evaluation that did>], or leave its entry empty "
            "and publish without metrics with require_metrics=false")
    metrics = json.loads((where / METRICS_FILE).read_text())
    histogram = where / HISTOGRAM_FILE
    density = metrics.get("feature_density")
    return SAESource(ckpt, metrics, histogram if histogram.is_file() else None, dashboard,
                     torch.tensor(density, dtype=torch.float64) if isinstance(density, list) else None)


def build(cfg: PublishConfig) -> tuple[Path, list[dict]]:
    """Write the release folder (replacing a previous release there); returns it and its SAEs."""
    sources = [find_source(c, cfg.eval_dirs[i] if cfg.eval_dirs else None, cfg.require_metrics,
                           cfg.dashboard_dirs[i] if cfg.dashboard_dirs else None)
               for i, c in enumerate(cfg.checkpoints)]
    if cfg.neuronpedia.source_set is not None:
        audits = cfg.neuronpedia.audit_dirs or [""] * len(sources)
        for src, audit in zip(sources, audits):
            src.neuronpedia = NeuronpediaExport(cfg.neuronpedia, src.dashboard, Path(audit) if audit else None,
                                                str(src.checkpoint), cfg.repo_id, cfg.path_in_repo)
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()) and not list(out.glob(f"*/{MANIFEST}")) and not (out / CARD).exists():
        raise OutDirNotEmptyError(f"out_dir={cfg.out_dir!r} holds files that are not a release, and the release "
                                  "folder is rebuilt (emptied) on every run. Fix: choose an empty or new out_dir")
    seen: dict[str, tuple[str, str | None]] = {}  # sae_id -> (checkpoint, hook)
    for i, src in enumerate(sources):
        if is_release(src.checkpoint):  # release.load reads a release folder too; its cfg.json is SAELens's
            hook = json.loads((src.checkpoint / SAELENS_CFG).read_text()).get("hook")
        else:  # an export: its format and version checked before anything is written
            hook = read_config(src.checkpoint).get("hook")
        sid = (cfg.sae_ids[i] if cfg.sae_ids else None) or src.sae_id or sae_id_for(hook)
        if sid in seen:
            raise ConfigError(f"checkpoints {seen[sid][0]!r} (hook {seen[sid][1]!r}) and {str(src.checkpoint)!r} "
                              f"(hook {hook!r}) both go to the release folder {sid!r}: a release holds one SAE "
                              "per folder, named after its hook unless sae_ids names them. Fix: sae_ids=[...] "
                              "(one folder name per checkpoint), or remove one from checkpoints")
        seen[sid] = (str(src.checkpoint), hook)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saes = []
    for src, sid in zip(sources, seen):
        manifest = write_sae_folder(src, tmp / sid, parse_size(cfg.max_shard_size), cfg.context_size,
                                    cfg.datasets[0] if cfg.datasets else None)
        doc = json.loads((tmp / sid / PIPELINE_CONFIG).read_text())
        saes.append({"sae_id": sid, "doc": doc, "metrics": src.metrics, "has_histogram": HISTOGRAM_FILE in manifest["files"],
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
