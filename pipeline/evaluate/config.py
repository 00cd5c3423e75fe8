"""Configuration of the evaluation stage (`python -m pipeline.evaluate`, conf/evaluate.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig

ABLATIONS = ("zero", "mean")
MEAN_SOURCES = ("eval", "store")


def _test_split() -> DataConfig:
    return DataConfig(split="test")


@dataclass
class EvalConfig:
    checkpoint: str = "runs/demo/train/topk/sae"
    """The exported SAE (the trainer's <out_dir>/sae folder, docs in pipeline/sae/checkpoint.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model the SAE is spliced into: the one whose activations it was trained on."""
    data: DataConfig = field(default_factory=_test_split)
    """Held-out text: split=test is hash-disjoint from the training split of local sources."""
    hook: str | None = None
    """The hook the SAE reads; default: the hook named in the checkpoint's cfg.json."""
    context_size: int = 128
    n_tokens: int = 50_000
    """Evaluation positions (contexts x context_size), fewer if the held-out data runs out."""
    batch_size: int = 8
    """Contexts per forward pass."""
    exclude_positions_below: int = 1
    """Positions below this keep their clean activation and are not scored (position 0 is BOS,
    which the store never holds: the SAE never saw it). Cross-entropy and KL are measured on the
    predictions made at the spliced positions, with BOS and padding targets masked."""
    exclude_norm_factor: float | None = 8.0
    """Reconstruction metrics (MSE, FVU, cosine, L0, density) leave out rows whose norm exceeds this
    multiple of the batch's median norm (the massive first-token activations); metrics.json reports
    how many. They are still spliced for the downstream loss. null keeps every row."""
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    """Baselines for the downstream loss: zero (the hook's output replaced by 0) and mean (by the
    mean activation). CE loss recovered needs zero."""
    mean_source: str = "eval"
    """Where the mean for mean-ablation comes from: eval (a truncated pass over the evaluation
    tokens first) or store (the SAE's training store, cfg.json's `store`, or store_url)."""
    store_url: str | None = None
    """The activation store for mean_source=store (default: the one named in the checkpoint)."""
    dense_threshold: float = 0.1
    """A feature firing on more than this fraction of tokens counts as dense."""
    allow_training_split: bool = False
    """Allow data.split=train or all (the SAE's training tokens: the figures are then not held-out)."""
    out_dir: str = "runs/demo/evaluate"
    """metrics.json and density_histogram.png are written here (any local path)."""
    progress: bool = True

    def __post_init__(self):
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ConfigError(f"ablations={list(self.ablations)} has {bad}; allowed: {list(ABLATIONS)}")
        if self.mean_source not in MEAN_SOURCES:
            raise ConfigError(f"mean_source={self.mean_source!r} is not one of {list(MEAN_SOURCES)}")
        if not 0 <= self.exclude_positions_below < self.context_size:
            raise ConfigError(f"exclude_positions_below={self.exclude_positions_below} must be in "
                              f"[0, context_size={self.context_size})")
        if self.n_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"n_tokens={self.n_tokens} and batch_size={self.batch_size} must be positive")
        if self.exclude_norm_factor is not None and self.exclude_norm_factor <= 1:
            raise ConfigError(f"exclude_norm_factor={self.exclude_norm_factor} must be > 1 (or null to keep all rows)")
        if self.data.split != "test" and self.data.source != "hf" and not self.allow_training_split:
            raise ConfigError(f"data.split={self.data.split!r} includes the SAE's training tokens; evaluation must "
                              "use held-out text. Fix: data.split=test (hash-disjoint from train), or set "
                              "allow_training_split=true to measure on training text knowingly")
