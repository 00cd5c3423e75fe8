"""What one training step is: the sections of the training configuration that the trainer
(pipeline/train) and the cost model (pipeline/cost_model.py: the planner, the dry run, the scaling
fit) share, so that each setting and its default is declared once.

TrainConfig (pipeline/train/config.py) and PlanConfig (pipeline/cost_model.py) both extend
StepConfig: a plan takes the trainer's own keys (`sae.n_features=...`, `batch_size=...`,
`optim.state_dtype=fp8`, `deepspeed.zero_stage=2`), and the dry run hands a TrainConfig's sections
to the cost model as they are. A lower layer: it imports no stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.errors import ConfigError
from pipeline.sae import SAEConfig


@dataclass
class ActivationDataConfig:
    """What training reads (the YAML key `data`): an activation store, not text (that is
    pipeline.data.DataConfig, the caching and analysis stages' `data`)."""

    url: str = demo.ACTIVATIONS
    """The activation store (any fsspec URL) written by the caching stage."""
    storage_options: dict = field(default_factory=dict)
    """Passed to fsspec, e.g. {endpoint_url: ..., key: ..., secret: ...} for S3."""
    hook: str | None = None
    """Which hook of the store to train on; may be omitted when the store holds one."""
    shuffle_buffer: int = 131072
    """Rows shuffled together by the loader (a window; it holds two in host memory: the one being
    batched and the next being read)."""
    exclude_positions_below: int = 0
    """Drop rows at context positions below this (the massive first-token activations)."""
    exclude_norm_factor: float | None = 8.0
    """Drop rows whose norm exceeds this multiple of the store's median norm (None keeps all): the
    massive first-token activations (FACTS: ~1e-5 of rows, a quarter of the variance)."""
    skip_corrupt: bool = False
    """Train on without the rows of a store chunk that is missing or fails its checksum (each
    skipped chunk is logged with its key and rows) instead of stopping with an error naming it.
    Off: a damaged store stops training, and the error says how to rewrite the chunk."""
    same_batches_at_any_layout: bool = False
    """Every data-parallel rank reads the whole global batch and keeps its slice, so the batches,
    and the trajectory, do not depend on data_parallel (costs data_parallel x the reads). The
    equivalence tests use it; off, each rank reads only its own rows."""


def check_precision(precision: str, zero_stage: int) -> None:
    """bf16 needs ZeRO >= 1: only its optimizers keep fp32 master weights (see the top of pipeline/train/engine.py)."""
    if precision == "bf16" and zero_stage == 0:
        raise ConfigError("deepspeed.precision=bf16 with deepspeed.zero_stage=0: ZeRO-0 keeps no fp32 master "
                          "weights, so bf16 updates smaller than a bf16 ulp of a weight would be lost (DeepSpeed "
                          "also rejects bf16 with fp32 gradient accumulation there). Fix: deepspeed.zero_stage=1 "
                          "(or 2), or deepspeed.precision=fp32")


STATE_DTYPES = ("fp32", "fp8", "int8")


@dataclass
class OptimConfig:
    lr: float | None = None
    """Adam's learning rate; null: the default recipe's rate for the dictionary's width
    (pipeline/train/recipe.py: 1/sqrt(n_features) scaling, measured in BENCHMARKS.md). The resolved
    value is printed at the start and written to the export's cfg.json (training.optim)."""
    betas: list[float] = field(default_factory=lambda: [0.8, 0.999])
    """Adam's (beta1, beta2). beta1 0.8 rather than torch's 0.9: at 4,096 latents held-out FVU 0.1923 ->
    0.1854 at 400k tokens (97 steps) and 0.1439 -> 0.1420 at 2M, at 16,384 x 400k 0.2009 -> 0.1908,
    with fewer dead latents each time (0.7 measured within 1.5% of 0.8, 0.5 worse, 0: much worse;
    BENCHMARKS.md "Recipe v4"): a shorter momentum suits the recipe's high, short-run rates."""
    eps: float = 1e-8
    """Adam epsilon (Gao et al. use 6.25e-10)."""
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    """Clip the global gradient norm (over all shards) to this; 0 turns clipping off."""
    lr_warmup_steps: int | None = None
    """Linear learning-rate warm-up from 0; null: the recipe's 5% of the steps, at most 1000 (Gemma
    Scope's)."""
    lr_decay_fraction: float = 0.2
    """The learning rate decays linearly to 0 over this last fraction of the steps."""
    sparsity_warmup_fraction: float = 0.05
    """lambda (relu_l1, jumprelu) grows linearly from 0 over this first fraction of the steps."""
    state_dtype: str = "fp32"
    """Adam's m and v: fp32 (torch's fused Adam, 8 bytes per parameter), or block-quantised by
    torchao with an fp32 scale per 256 values (~2 bytes per parameter): fp8 (AdamFp8, e4m3) or
    int8 (Adam8bit, bitsandbytes' dynamic code; ~3x slower than fp8 on CPU). The low-bit states
    fit 2-3x larger dictionaries per rank (BENCHMARKS.md); tensors under 4096 values keep fp32.
    Their first step compiles the update (torch.compile; on CPU it needs a C++ compiler)."""

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(f"optim.state_dtype={self.state_dtype!r} must be one of {list(STATE_DTYPES)}")
        if (self.lr is not None and not self.lr > 0) or (self.lr_warmup_steps or 0) < 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive and optim.lr_warmup_steps={self.lr_warmup_steps} "
                              ">= 0 (null: the default recipe's, pipeline/train/recipe.py)")
        for name in ("lr_decay_fraction", "sparsity_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1]")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """0: plain data parallelism; 1: optimizer state partitioned over data-parallel ranks; 2: and
    gradients. (3 is not supported: feature sharding already partitions the weights.)"""
    precision: str = "auto"
    """auto (bf16 with fp32 master weights on GPU, fp32 on CPU), bf16 or fp32. bf16 casts the weights
    and inputs (no autocast) and needs zero_stage >= 1 for its fp32 masters (pipeline/train/engine.py)."""
    overrides: dict = field(default_factory=dict)
    """Merged last into the generated DeepSpeed config (pipeline/train/engine.py), for experts."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1 or 2")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"deepspeed.precision={self.precision!r} must be auto, bf16 or fp32")
        check_precision(self.precision, self.zero_stage)  # fail fast; `auto` is checked once resolved


@dataclass
class StepConfig:
    """The sections of a training configuration that set what one step computes and costs."""

    data: ActivationDataConfig = field(default_factory=ActivationDataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    batch_size: int = 4096
    """Global batch in tokens (rows), split over the data-parallel ranks; each rank's share must fit in
    the rows one epoch of the store gives that rank after the exclusion rules (else refused)."""
