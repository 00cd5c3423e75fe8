"""What every analysis stage reads, as one typed section: `input` in the evaluate, interpret, steer
and audit configs (conf/input/ holds its model and data groups: `input/data=files`).

    python -m pipeline.evaluate input.checkpoint=runs/sae input.n_tokens=20000

A stage uses the fields it needs (steering reads no corpus) and sets its own defaults through the
default factory of its `input` field (evaluation: held-out text; interpretation: a larger sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig


@dataclass
class InputConfig:
    checkpoint: str = demo.SAE
    """The dictionary: an export (the trainer's <out_dir>/sae folder, pipeline/sae/checkpoint.py), a
    release folder or hf://owner/repo[/sae_id][@revision] (pipeline/analysis/release.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model the dictionary is spliced into: the one whose activations it was trained on."""
    hook: str | None = None
    """The hook the dictionary reads; default: the hook named in the checkpoint's cfg.json."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text streamed through model and dictionary."""
    context_size: int = 128
    n_tokens: int = 50_000
    """Positions streamed (contexts x context_size), fewer if the text runs out."""
    batch_size: int = 8
    """Contexts per forward pass."""
    exclude_positions_below: int = 1
    """Positions below this are never scored nor examples (position 0 is BOS, which the store never
    holds: the dictionary never saw it)."""
    exclude_norm_factor: float | None = 8.0
    """Rows whose norm exceeds this multiple of the batch's median norm (the massive activations of
    the first tokens, 10-100x the typical norm) are left out of reconstruction metrics, densities
    and example lists; null keeps every row."""

    def __post_init__(self):
        if self.n_tokens < 1 or self.batch_size < 1 or self.context_size < 2:
            raise ConfigError(f"input.n_tokens={self.n_tokens} and input.batch_size={self.batch_size} must be positive "
                              f"and input.context_size={self.context_size} at least 2")
        if not 0 <= self.exclude_positions_below < self.context_size:
            raise ConfigError(f"input.exclude_positions_below={self.exclude_positions_below} must be in "
                              f"[0, input.context_size={self.context_size})")
        if self.exclude_norm_factor is not None and self.exclude_norm_factor <= 1:
            raise ConfigError(f"input.exclude_norm_factor={self.exclude_norm_factor} must be > 1 (or null to keep "
                              "all rows)")
