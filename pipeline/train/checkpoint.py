"""Training checkpoints: all state needed to continue the same trajectory, in step-N folders.

    <out_dir>/checkpoints/latest                      the newest complete tag, written last
    <out_dir>/checkpoints/step-N/trainer.json         step, tokens, layout, dictionary shape (rank 0)
    <out_dir>/checkpoints/step-N/loader-rankRRRRR.json  each rank's loader position
    <out_dir>/checkpoints/step-N/mp_rank_XX_model_states.pt, zero_pp_rank_*_optim_states.pt
                                                      DeepSpeed: weights, buffers, Adam, LR schedule

A step-N folder without `latest` pointing at it (or a newer one) may be incomplete and is never
resumed from. The folder must be on storage every rank sees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from pipeline.errors import ConfigError
from pipeline.parallel import Mesh
from pipeline.sae import SAEConfig

LATEST = "latest"
TRAINER_STATE = "trainer.json"
SHAPE = ("architecture", "n_features", "d_model")
"""The SAEConfig fields that shape a checkpoint's tensors: a resume must match them."""


def tag(step: int) -> str:
    return f"step-{step}"


def loader_file(rank: int) -> str:
    return f"loader-rank{rank:05d}.json"


class Checkpoints:
    def __init__(self, root: str | Path, mesh: Mesh, sae: SAEConfig, keep: int = 2):
        self.root, self.mesh, self.sae, self.keep = Path(root), mesh, sae, keep

    def latest(self) -> str | None:
        f = self.root / LATEST
        return f.read_text().strip() if f.exists() else None

    def save(self, engine, loader_state: dict, step: int, tokens: int) -> Path:
        """Collective: every rank calls it with its own loader state."""
        name = tag(step)
        engine.save_checkpoint(str(self.root), tag=name, client_state={"step": step}, save_latest=False)
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / loader_file(self.mesh.rank)).write_text(json.dumps(loader_state))
        dist.barrier()
        if self.mesh.rank == 0:
            dims = self.mesh.dims
            state = {"step": step, "tokens": tokens, "world_size": dims.world_size,
                     "data_parallel": dims.data_parallel, "feature_parallel": dims.feature_parallel,
                     "shape": self._shape()}
            (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            _write_atomic(self.root / LATEST, name)
            self._prune(step)
        dist.barrier()
        return folder

    def resume(self, engine, loader) -> int:
        """Load the newest checkpoint into the engine and the loader; the step to continue from
        (0 when there is none)."""
        name = self.latest()
        if name is None:
            return 0
        folder = self.root / name
        state = json.loads((folder / TRAINER_STATE).read_text())
        self._check_shape(folder, state)
        path, _ = engine.load_checkpoint(str(self.root), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {folder}")
        loader.load_state_dict(json.loads((folder / loader_file(self.mesh.rank)).read_text()))
        return int(state["step"])

    def _shape(self) -> dict:
        """What this run's checkpoint tensors are shaped by, under the config keys that set it."""
        dims = self.mesh.dims
        return {"parallel.data_parallel": dims.data_parallel, "parallel.feature_parallel": dims.feature_parallel,
                **{f"sae.{k}": getattr(self.sae, k) for k in SHAPE}}

    def _check_shape(self, folder: Path, state: dict) -> None:
        """Refuse a checkpoint whose tensors this run's dictionary and layout cannot hold, naming
        both settings, before DeepSpeed fails on the first mismatched tensor."""
        saved = state.get("shape") or {  # checkpoints written before the shape was recorded: the layout
            "parallel.data_parallel": state["data_parallel"], "parallel.feature_parallel": state["feature_parallel"]}
        now = self._shape()
        differ = [k for k in saved if saved[k] != now[k]]
        if differ:
            raise ConfigError(
                f"the checkpoint {folder} was written with {', '.join(f'{k}={saved[k]}' for k in differ)}; this "
                f"run has {', '.join(f'{k}={now[k]}' for k in differ)}, so it cannot continue from it. Fix: "
                f"resume with {' '.join(f'{k}={saved[k]}' for k in differ)}, or set out_dir to a new folder to "
                "train this configuration from the start")

    def _prune(self, newest: int) -> None:
        if self.keep <= 0:
            return
        steps = sorted(int(p.name.split("-")[1]) for p in self.root.glob("step-*") if p.name.split("-")[1].isdigit())
        for s in steps[:-self.keep]:
            if s != newest:
                shutil.rmtree(self.root / tag(s), ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
