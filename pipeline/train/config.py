"""Configuration of the training stage (`python -m pipeline.train`, conf/train.yaml).

The defaults are the ones below: conf/train.yaml repeats none of them (it picks the sae group and
spells out_dir as a Hydra interpolation), so `train(TrainConfig())` trains what `python -m
pipeline.train` does (tests/test_faults_config.py checks it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.device import check_device
from pipeline.errors import ConfigError
from pipeline.parallel import ParallelDims
from pipeline.step import ActivationDataConfig, DeepSpeedConfig, OptimConfig, StepConfig

__all__ = ["ActivationDataConfig", "DeepSpeedConfig", "OptimConfig", "TrainConfig"]


@dataclass
class TrainConfig(StepConfig):
    """The step's sections (data, sae, optim, deepspeed, batch_size: pipeline/step.py, shared with the
    planner) and the run's own settings below."""

    parallel: ParallelDims = field(default_factory=ParallelDims)
    device: str = "auto"
    """auto (cuda where torch sees a GPU, else cpu), cpu or cuda (pipeline/device.py). On cuda each
    process trains on the GPU of its LOCAL_RANK; `auto` precision is bf16 there, fp32 on the CPU."""
    n_tokens: int = 2_000_000
    """Training tokens; steps = n_tokens // batch_size."""
    seed: int = 0
    """Seeds the initialisation (identical at every layout) and the data order."""
    out_dir: str | None = None
    """Checkpoints (checkpoints/step-N), TensorBoard logs (tb/), metrics.jsonl and the export (sae/).
    None: runs/demo/train/<sae.architecture>, which conf/train.yaml spells as the interpolation
    runs/demo/train/${sae.architecture} so that Hydra's saved config names the folder."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (also written at the end, and on SIGTERM/SIGUSR1 when a step was done
    since the last one: slurm/README.md, pre-emption); 0: only those."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (0 keeps all)."""
    resume: bool = True
    """Continue from the newest checkpoint in out_dir/checkpoints if there is one."""
    log_every: int = 10
    """Steps between log lines (console, TensorBoard, metrics.jsonl)."""
    dense_fraction: float = 0.1
    """A latent firing on more than this fraction of the tokens of a log window counts as dense."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    export: bool = True
    """Write the consolidated, framework-free dictionary to out_dir/sae at the end."""
    heldout_url: str | None = None
    """A store of held-out activations (python -m pipeline.cache data.split=test ...): after the export,
    held-out FVU, MSE, L0 and loss go to out_dir/heldout.json (pipeline/train/heldout.py), and a rerun
    finding that file for the same configuration does nothing (sweeps skip finished points)."""
    heldout_tokens: int = 100_000
    """Rows of heldout_url evaluated (fewer if the store is smaller)."""
    dry_run: bool = False
    """Build the sharded layout for data_parallel x feature_parallel on the meta device in this
    one process, print per-rank parameters and bytes checked against the planner, and stop."""

    def __post_init__(self):
        check_device(self.device, "device")
        if self.out_dir is None:
            self.out_dir = demo.train_dir(self.sae.architecture)
        if self.batch_size < 1 or self.n_tokens < self.batch_size:
            raise ConfigError(f"batch_size={self.batch_size} must be positive and at most n_tokens={self.n_tokens}")
        if self.batch_size % self.parallel.data_parallel:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by parallel.data_parallel="
                              f"{self.parallel.data_parallel} (each replica gets an equal share)")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 0 and log_every="
                              f"{self.log_every} >= 1")

    @property
    def steps(self) -> int:
        return self.n_tokens // self.batch_size
