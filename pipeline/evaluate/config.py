"""Configuration of the evaluation stage (`python -m pipeline.evaluate`, conf/evaluate.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.analysis.config import InputConfig
from pipeline.analysis.metrics import ABLATIONS, MEAN_SOURCES
from pipeline.data import DataConfig
from pipeline.errors import ConfigError



@dataclass
class EvalConfig:
    input: InputConfig = field(default_factory=lambda: InputConfig(data=DataConfig(split="test")))
    """The dictionary, its model and the held-out text (pipeline/analysis/config.py): data.split=test
    is hash-disjoint from the training split of local sources. Cross-entropy and KL are measured on
    the predictions made at the spliced positions, with BOS and padding targets masked; positions
    below exclude_positions_below keep their clean activation. Rows beyond exclude_norm_factor are
    left out of the reconstruction metrics (metrics.json reports how many) but still spliced."""
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
    out_dir: str = demo.EVALUATE
    """metrics.json and density_histogram.png are written here (any local path)."""
    progress: bool = True

    def __post_init__(self):
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ConfigError(f"ablations={list(self.ablations)} has {bad}; allowed: {list(ABLATIONS)}")
        if self.mean_source not in MEAN_SOURCES:
            raise ConfigError(f"mean_source={self.mean_source!r} is not one of {list(MEAN_SOURCES)}")
        data = self.input.data
        if data.split != "test" and data.source != "hf" and not self.allow_training_split:
            raise ConfigError(f"input.data.split={data.split!r} includes the SAE's training tokens; evaluation must "
                              "use held-out text. Fix: input.data.split=test (hash-disjoint from train), or set "
                              "allow_training_split=true to measure on training text knowingly")
