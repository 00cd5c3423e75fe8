"""Stage 3c: generate with SAE features clamped (Scaling Monosemanticity's feature steering).

    python -m pipeline.steer prompt="Tell me about yourself." 'clamp=["123:10x"]'

Prints the clean and the steered continuation side by side; writes <out_dir>/generations.json."""

from pipeline.steer.config import Clamp, SteerConfig
from pipeline.analysis.steering import clamp_fn
from pipeline.steer.run import generate, resolve_clamps, run

__all__ = ["Clamp", "SteerConfig", "clamp_fn", "generate", "resolve_clamps", "run"]
